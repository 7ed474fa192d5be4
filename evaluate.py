"""Reproduce the paper's Tables 1-4 and Figures 4-5. Thin CLI over jaxrecover.evaluation.evaluate.

Examples:
    python evaluate.py                                   # all five models, whole test split, float32 and float64
    python evaluate.py --models lenet resnet18 --n 200 --dtype float64
    python evaluate.py --dataset fashion_mnist --out results/fashion_mnist
    python evaluate.py --report-only --out results/mnist  # rebuild report.md from the JSON files
"""

import argparse
import sys


def parse_args(argv=None):
    from jaxrecover.models import MODEL_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help=f"any of: {' '.join(MODEL_NAMES)}")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--steps", type=int, default=50, help="m, the IG step count (paper: 50)")
    p.add_argument("--a", type=float, default=0.98, help="a of Experiment C (paper: 0.98)")
    p.add_argument("--mode", choices=["faithful", "shared"], default="faithful")
    p.add_argument("--seed", type=int, default=0, help="training seed of checkpoints trained here")
    p.add_argument("--checkpoints", default="checkpoints", help="directory with one checkpoint per model")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing checkpoint")
    p.add_argument("--epochs", type=int, default=None, help="epochs for models trained because missing")
    p.add_argument("--max-train", type=int, default=None, help="training images for models trained here")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--bn-batch-stats", action="store_true",
                   help="ablation (resnet18): BatchNorm on batch statistics, as a PyTorch model left in train() mode")
    p.add_argument("--out", default=None, help="results directory (default: results/<dataset>)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md from the JSON in --out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process run: jax.distributed.initialize() (JAX's cluster auto-detection, e.g. SLURM or "
                        "Open MPI, or the three options below); each process computes a share of the images, "
                        "process 0 writes the results. Checkpoints must exist.")
    p.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import jax

    if a.distributed:
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)
    # float64 runs need x64 before any array exists; float32 runs state their dtypes
    # explicitly, and the metric is then computed in float64 for both.
    jax.config.update("jax_enable_x64", True)
    from pathlib import Path

    from jaxrecover.checkpoint import CheckpointError
    from jaxrecover.data import DataError
    from jaxrecover.evaluation import EvalConfig, evaluate, load_results, markdown_report
    from jaxrecover.fileio import atomic_write_text

    out = a.out or f"results/{a.dataset.replace(':', '_').replace('/', '_')}"
    if a.report_only:
        text = markdown_report(load_results(out))
        atomic_write_text(Path(out) / "report.md", text)
        print(text)
        return 0
    cfg = EvalConfig(models=tuple(a.models), dataset=a.dataset, dtypes=tuple(a.dtype), n=a.n, steps=a.steps, a=a.a,
                     mode=a.mode, seed=a.seed, checkpoints=a.checkpoints, out=out, train_missing=not a.no_train,
                     epochs=a.epochs, max_train=a.max_train, chunk_size=a.chunk_size, figures=not a.no_figures,
                     bn_batch_stats=a.bn_batch_stats,
                     command="python evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    try:
        evaluate(cfg, progress=not a.quiet)
    except (DataError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print((Path(out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
