"""The benchmark still runs (tiny configuration); speed itself is never asserted in tests."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ops_benchmark_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--smoke"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| lenet conv1 | float32 |" in r.stdout and "| lenet maxpool 2x2 | float64 |" in r.stdout


def test_benchmark_smoke_prints_its_tables():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ig.py"), "--smoke"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "| twolayer | float32 |" in out and "| lenet | float32 |" in out
    assert "gradient evals / image" in out and "| lenet | float32 | shared | 8 |" in out
    assert "XLA temp memory" in out


def test_batch_benchmark_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), "--smoke"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| lenet | 8 |" in r.stdout and "minor page faults / call" in r.stdout
    assert "| lenet | 2 | - (one vmap) |" in r.stdout


def test_roofline_benchmark_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_roofline.py"), "--models", "lenet",
                        "--dtypes", "float32", "--n", "2", "--steps", "2", "--rounds", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attainable float32:" in r.stdout and "| lenet | float32 |" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("| lenet | float32 |"))
    # XLA's count of one LeNet explanation with m = 2: about 48 MFLOP per path point (conv2's forward and input
    # gradient dominate), so about 0.1 GFLOP
    assert 0.05 <= float(row.split("|")[3]) <= 0.2, row
    assert row.split("|")[4].strip() == "sparse", row  # the native path runs wherever a compiler is


def test_profile_script_names_the_expensive_thunks():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_ig.py"), "--model", "lenet",
                        "--dtype", "float64", "--n", "1", "--steps", "2", "--top", "3", "--dense"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| thunk")]
    assert len(rows) == 3, r.stdout
    assert any("conv_general_dilated" in row for row in rows), r.stdout  # conv2 dominates LeNet
    assert all(float(row.split("|")[2]) > 0 for row in rows), r.stdout


def test_sparse_primitives_benchmark_checks_its_identity_and_prints_the_table():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sparse_primitives.py"), "--switching", "16",
                        "--repeats", "1", "--dtypes", "float64"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 50 transposed convs (today's backward) |" in r.stdout and "| gather 16 patches + dot |" in r.stdout


def test_switching_backward_benchmark_is_exact_and_prints_its_table():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_switching_backward.py"), "--n", "1",
                        "--rounds", "1", "--checkpoint", "none", "--capacity", "21632"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    err = float(r.stdout.split("relative error against jr.IG: ")[1].split()[0])
    assert err <= 1e-12, r.stdout  # the one-transposed-convolution backward is IG to round-off (float64)
    assert "| switching backward |" in r.stdout and "| engine IG (jr.explain, affine stem) |" in r.stdout


def test_torchserve_benchmark_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_torchserve.py"), "--smoke", "--random"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| twolayer | random init (seed 0) | batch_size 1, delay 0 ms | 2 |" in r.stdout
    assert "| twolayer | random init (seed 0) | batch_size 8, delay 5 ms | 1 |" in r.stdout


def test_sparse_precision_benchmark_prints_both_paths_against_float64():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sparse_precision.py"), "--n", "2",
                        "--steps", "8"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| random weights")]
    assert len(rows) == 2, r.stdout
    medians = [float(cell.split("/")[0]) for row in rows for cell in row.split("|")[2:4]]
    assert all(0 <= m < 1e-2 for m in medians), r.stdout  # float32 against float64: round-off, not garbage
