import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover import models
from jaxrecover.data import normalize
from jaxrecover.protocol import EvalConfig, evaluate, load_results, markdown_report
from jaxrecover.protocol import ProtocolConfig, experiments_for, run_protocol

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("twolayer_nobias", "twolayer", "lenet_nobias", "lenet")

SCHEMA = {"model": str, "dataset": str, "split": str, "n": int, "dtype": str, "mode": str, "seed": int,
          "version": str, "wall_seconds": float, "steps": int, "a": float, "results": dict, "paper": dict,
          "machine": dict, "fig5": dict, "gradient_evaluations_per_image": int, "test_accuracy": float}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(models=SMALL, dtypes=("float32", "float64"), n=16, steps=8, checkpoints=str(root / "ckpt"),
                     out=str(root / "out"), epochs=1, max_train=512, chunk_size=8, fig5_n=8, command="pytest")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        records = evaluate(cfg, progress=False)
    return cfg, records, err.getvalue()


def test_evaluate_says_what_it_trains_and_how_long_before_starting(tiny_run):
    *_, err = tiny_run
    lines = err.splitlines()
    assert lines[0].startswith(f"{len(SMALL)} of {len(SMALL)} checkpoints missing"), err
    for i, model in enumerate(SMALL, start=1):
        assert re.fullmatch(rf"  will train {model}: 1 epochs on 512 images, about \d+\.\d min here", lines[i]), err
    assert re.fullmatch(r"  training first: about \d+\.\d min in all, then the protocol", lines[len(SMALL) + 1])
    assert lines.index(lines[len(SMALL) + 1]) < next(i for i, s in enumerate(lines) if s.startswith("no checkpoint"))


def test_evaluate_end_to_end_recovers_vg_in_float64(tiny_run):
    cfg, records, _ = tiny_run
    assert len(records) == 2 * len(SMALL)
    by = {(r["model"], r["dtype"]): r for r in records}
    for model in ("twolayer_nobias", "lenet_nobias"):
        assert by[(model, "float64")]["results"]["A"]["max"] < 1e-6
    for model in ("twolayer", "lenet"):
        assert by[(model, "float64")]["results"]["B"]["max"] < 1e-6
        assert set(by[(model, "float64")]["results"]) == {"table1", "B", "C"}
    # VG and IG are different explanations: Table 1's distances are far from 0
    assert all(r["results"]["table1"]["mean"] > 0.1 for r in records)
    # float64 recovers at least as well as float32
    for model in SMALL:
        e = "A" if model.endswith("nobias") else "B"
        assert by[(model, "float64")]["results"][e]["mean"] <= by[(model, "float32")]["results"][e]["mean"]


def test_result_json_schema_and_files(tiny_run):
    cfg, *_ = tiny_run
    out = Path(cfg.out)
    files = sorted(out.glob("*.json"))
    assert len(files) == 2 * len(SMALL)
    for f in files:
        rec = json.loads(f.read_text())
        for key, typ in SCHEMA.items():
            assert key in rec, key
            assert isinstance(rec[key], typ) or (typ is float and isinstance(rec[key], int)), key
        assert rec["n"] == 16 and rec["mode"] == "faithful" and rec["dtype"] in ("float32", "float64")
        assert set(rec["results"]) == set(experiments_for(rec["model"]))
        for stats in rec["results"].values():
            assert stats["n"] == 16 and set(stats) >= {"mean", "var", "median", "max"}
        assert len(rec["fig5"]["median"]) == 8
    from PIL import Image

    for png in ("fig4_float32.png", "fig4_float64.png", "fig5_float32.png", "fig5_float64.png"):
        with Image.open(out / png) as im:
            title = im.info["Title"]
            rgb = np.asarray(im.convert("RGB"), np.int32)
        assert png.split("_")[1].removesuffix(".png") in title
        if png.startswith("fig4"):  # the run's own m and a, not the paper's 50 / 0.98 by default
            assert "IG_8" in title and "m = 8 and 7" in title and "a = 0.98" in title
            # attribution maps drawn in the diverging map: strongly red and strongly blue pixels both present
            assert ((rgb[..., 0] > 200) & (rgb[..., 2] < 80)).sum() > 50
            assert ((rgb[..., 2] > 200) & (rgb[..., 0] < 80)).sum() > 50
            rows = 2 * 1 + 2 * 2  # a row per (no-bias model, A) and per (bias model, B or C)
            assert rgb.shape[0] > rows * 100
        else:
            assert "(i/8)" in title
    report = (out / "report.md").read_text()
    assert "Table 3: Experiment B, eq. (4), m = 8 and 7" in report and "| lenet | mnist (16) | float64 |" in report
    assert not list(out.glob("*.partial.npz")) and not list(out.glob("*.tmp"))


def test_report_is_rebuilt_from_json_only(tiny_run):
    cfg, *_ = tiny_run
    assert markdown_report(load_results(cfg.out)) == (Path(cfg.out) / "report.md").read_text()


@pytest.mark.parametrize("model", ["twolayer", "lenet"])
def test_shared_mode_matches_faithful_mode(tiny_run, model):
    cfg, *_ = tiny_run
    from jaxrecover.training import load_trained

    _, variables, _ = load_trained(Path(cfg.checkpoints) / model)
    v = models.cast_variables(variables, jnp.float64)
    from jaxrecover.data import load_dataset

    ds = load_dataset("mnist")
    x = normalize(ds.test_images[:16], np.float64)
    y = ds.test_labels[:16]
    f = models.make_model(model)
    res = {}
    for mode in ("faithful", "shared"):
        pcfg = ProtocolConfig(experiments=("table1", "B", "C"), steps=50, mode=mode)
        res[mode], _ = run_protocol(f, v, x, y, pcfg, chunk_size=8, progress=False)
    assert ProtocolConfig(mode="shared").evaluations_per_image == 99  # t = 0.98 is shared by B and C
    assert ProtocolConfig(mode="faithful").evaluations_per_image == 150
    for e in ("table1", "C"):
        np.testing.assert_allclose(res["shared"][e], res["faithful"][e], rtol=1e-9, atol=1e-12)
    # B's distances are round-off sized in both modes (stated tolerance: 1e-9 absolute)
    np.testing.assert_allclose(res["shared"]["B"], res["faithful"]["B"], rtol=0, atol=1e-9)


def test_interrupted_protocol_resumes(tmp_path):
    f, params = models.make_model("twolayer"), models.init_variables("twolayer", jax.random.key(0), jnp.float64)
    x = np.asarray(jax.random.normal(jax.random.key(1), (10, 28, 28, 1), jnp.float64))
    y = np.arange(10) % 10
    cfg = ProtocolConfig(steps=6)
    full, _ = run_protocol(f, params, x, y, cfg, chunk_size=4, progress=False)
    part = tmp_path / "p.npz"
    import jaxrecover.protocol.experiments as E

    real = E.protocol_chunk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    E.protocol_chunk = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run_protocol(f, params, x, y, cfg, chunk_size=4, partial_path=part, progress=False)
    finally:
        E.protocol_chunk = real
    with np.load(part) as z:
        assert int(z["done"]) == 4
    resumed, _ = run_protocol(f, params, x, y, cfg, chunk_size=4, partial_path=part, progress=False)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k])


def test_cli_errors_and_report_only(tmp_path, tiny_run):
    cfg, *_ = tiny_run
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--models", "vgg", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--models", "lenet", "--no-train",
                        "--checkpoints", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--n", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--report-only", "--out", cfg.out],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Table 2" in r.stdout


def test_batchnorm_ablation_breaks_eq4_even_in_float64(tmp_path):
    """In inference mode eq. (4) recovers ResNet18's VG in float64; with BatchNorm on
    batch statistics (a PyTorch model left in train mode under Captum) it cannot:
    the m and m-1 point batches are different functions."""
    common = dict(models=("resnet18",), dtypes=("float64",), n=4, steps=8, checkpoints=str(tmp_path / "ckpt"),
                  epochs=1, max_train=128, chunk_size=4, fig5_n=4, figures=False)
    inference = evaluate(EvalConfig(out=str(tmp_path / "inf"), **common), progress=False)[0]
    ablation = evaluate(EvalConfig(out=str(tmp_path / "bn"), bn_batch_stats=True, **common), progress=False)[0]
    assert inference["mode"] == "faithful" and ablation["mode"] == "bn-batch-stats"
    assert "batch statistics" in ablation["batchnorm"]
    assert inference["results"]["B"]["max"] < 1e-6
    assert ablation["results"]["B"]["mean"] > 0.1


def test_batchnorm_ablation_refuses_models_without_batchnorm(tmp_path):
    with pytest.raises(ValueError, match="BatchNorm"):
        evaluate(EvalConfig(models=("lenet",), bn_batch_stats=True, out=str(tmp_path)), progress=False)


def test_protocol_micro_batch_loop_equals_one_vmap():
    from jaxrecover import models
    from jaxrecover.protocol import ProtocolConfig, protocol_chunk

    v = models.init_variables("lenet", jax.random.key(0), jnp.float64)
    f = models.make_model("lenet")
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1), jnp.float64)
    t = jnp.asarray([1, 4, 8], jnp.int32)
    for mode in ("shared", "faithful"):
        cfg = ProtocolConfig(steps=5, mode=mode)
        ref = protocol_chunk(f, v, x, t, cfg, None)
        looped = protocol_chunk(f, v, x, t, cfg, 2)
        assert set(looped) == set(ref)
        for k in ref:
            assert looped[k].dtype == jnp.float64
            np.testing.assert_allclose(looped[k], ref[k], rtol=1e-9, atol=1e-12)


def test_stored_results_are_reused_only_for_the_same_weights_and_settings(tmp_path):
    """Issue 10/11: results are keyed by a digest of the weights and settings: a retrained checkpoint recomputes."""
    from jaxrecover.training import TrainConfig, train_and_evaluate

    ckpt = tmp_path / "ckpt"
    common = dict(models=("twolayer",), dtypes=("float64",), n=8, steps=6, checkpoints=str(ckpt),
                  out=str(tmp_path / "out"), chunk_size=8, fig5_n=4, figures=False)
    train_and_evaluate(TrainConfig(model="twolayer", epochs=1, max_train=256), ckpt / "twolayer", progress=False)
    first = evaluate(EvalConfig(**common), progress=False)[0]
    again = evaluate(EvalConfig(**common), progress=False)[0]
    assert again["finished"] == first["finished"]  # same weights and settings: reused
    other_a = evaluate(EvalConfig(**{**common, "a": 0.9}), progress=False)[0]
    assert other_a["a"] == 0.9 and other_a["results"]["C"] != first["results"]["C"]
    train_and_evaluate(TrainConfig(model="twolayer", epochs=1, max_train=256, seed=5), ckpt / "twolayer",
                       resume=False, progress=False)
    retrained = evaluate(EvalConfig(**common), progress=False)[0]
    assert retrained["settings"]["weights_sha256"] != first["settings"]["weights_sha256"]
    assert retrained["results"]["table1"] != first["results"]["table1"]


def test_resume_refuses_a_partial_file_of_other_weights(tmp_path):
    f = models.make_model("twolayer")
    p1 = models.init_variables("twolayer", jax.random.key(0), jnp.float64)
    p2 = models.init_variables("twolayer", jax.random.key(1), jnp.float64)
    x = np.asarray(jax.random.normal(jax.random.key(2), (6, 28, 28, 1), jnp.float64))
    y = np.arange(6) % 10
    cfg = ProtocolConfig(steps=6)
    part = tmp_path / "p.npz"
    run_protocol(f, p1, x, y, cfg, chunk_size=4, partial_path=part, progress=False)
    mixed, _ = run_protocol(f, p2, x, y, cfg, chunk_size=4, partial_path=part, progress=False)
    clean, _ = run_protocol(f, p2, x, y, cfg, chunk_size=4, progress=False)
    for k in clean:
        np.testing.assert_array_equal(mixed[k], clean[k])


def test_protocol_config_validates_its_settings():
    for bad in (dict(a=0.0), dict(a=1.0), dict(a=1.5), dict(a=-0.5), dict(a=float("nan")), dict(steps=1),
                dict(steps=2), dict(mode="fast"), dict(experiments=("D",))):
        with pytest.raises(ValueError):
            ProtocolConfig(**bad)
    assert ProtocolConfig(experiments=("table1", "A"), steps=2).evaluations_per_image == 3


def test_results_doc_second_dataset_section_compares_with_mnist(tmp_path):
    """jaxrecover.protocol.results_doc: the second dataset's section takes every number from the records (accuracy
    beside MNIST's, mean distances side by side) and names the models not run yet."""
    from jaxrecover.protocol import results_doc as mod

    def record(dataset, acc, mean_b):
        return {"model": "twolayer", "dataset": dataset, "dtype": "float64", "test_accuracy": acc, "train_epochs": 30,
                "command": f"python evaluate.py --dataset {dataset}", "n": 4, "mode": "faithful", "steps": 50,
                "a": 0.98, "wall_seconds": 1.0, "version": "0.2.0",
                "machine": {"processor": "x86_64", "cpu_count": 2, "jax_version": "0", "jax_backend": "cpu"},
                "results": {"B": {"mean": mean_b, "var": 0.0, "median": mean_b, "max": 2 * mean_b}}}

    second_dir = mod.ROOT / "results" / "x"
    lines = mod.second_dataset_section([record("mnist", 0.9655, 4.6e-14)], [record("idx:/nowhere", 0.8774, 4.4e-14)],
                                       second_dir)
    text = "\n".join(lines)
    assert "| twolayer | 0.8774 | 30 | 0.9655 |" in text
    assert "| twolayer | float64 | Table 3 (eq. 4) | 4.6e-14 | 4.4e-14 | 9.2e-14 | 8.8e-14 |" in text
    assert "not run yet for twolayer_nobias, lenet_nobias, lenet, resnet18" in text
    assert "idx:/nowhere n/a" in text  # a dataset that does not load is said, not guessed
    assert "ResNet18 answer" not in text
    assert "* The exact recoveries in float64 stay at round-off on both datasets (mean, twolayer eq. 4 4.6e-14 -> " \
           "4.4e-14)." in text
    # with ResNet18 (and its batch-statistics ablation) the precision study is repeated for the second dataset
    r18 = [dict(record("idx:/nowhere", 0.9, b), model="resnet18", dtype=d) for d, b in (("float32", 2e-6),
                                                                                        ("float64", 3e-14))]
    abl = [dict(r, results={"B": {"mean": 1.1, "var": 0.0, "median": 1.1, "max": 1.5}}) for r in r18]
    text = "\n".join(mod.second_dataset_section([record("mnist", 0.9655, 4.6e-14)], r18, second_dir, abl))
    assert "### The ResNet18 answer on idx:/nowhere" in text and "#### The precision study" in text
    assert "Experiment B, ResNet18: float32 mean 2e-06, float64 mean 3e-14" in text
    assert "##### Ablation: BatchNorm on batch statistics" in text and "float64 does not remove it" in text
