"""Command-line entry points: ``jaxrecover train | evaluate | study | demo`` (and ``jaxrecover-train`` ...).

``train.py`` and ``evaluate.py`` at the repository root call the same functions.
Each parses its arguments, calls one library function, and turns the library's
clear errors into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "train_main", "evaluate_main", "study_main", "demo_main", "serve_main", "audit_main"]

TRAIN_DOC = """Train one of the paper's models (jaxrecover.training.train_and_evaluate).

Example:
    python train.py --model lenet_nobias --dataset mnist --epochs 15 --seed 0 --out checkpoints/lenet_nobias
"""

EVALUATE_DOC = """Reproduce the paper's Tables 1-4 and Figures 4-5 (jaxrecover.protocol.evaluate).

Examples:
    python evaluate.py                                   # all five models, whole test split, float32 and float64
    python evaluate.py --models lenet resnet18 --n 200 --dtype float64
    python evaluate.py --dataset fashion_mnist --out results/fashion_mnist
    python evaluate.py --report-only --out results/mnist  # rebuild report.md from the JSON files
"""


def _train_parser():
    from .data import DATASETS
    from .models import EXTRA_MODEL_NAMES, MODEL_NAMES
    from .training import DEFAULT_EPOCHS

    p = argparse.ArgumentParser(prog="jaxrecover-train", description=TRAIN_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODEL_NAMES)}; extraction victims: "
                   f"{', '.join(EXTRA_MODEL_NAMES)}")
    p.add_argument("--dataset", default="mnist", help=f"one of: {', '.join(DATASETS)} (default: mnist)")
    per_model = ", ".join(f"{m} {e}" for m, e in DEFAULT_EPOCHS.items())
    p.add_argument("--epochs", type=int, default=None, help=f"default per model: {per_model}")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, AdamW with cosine decay "
                   "(default: %(default)s)")
    p.add_argument("--no-augment", action="store_true", help="turn off random 2-pixel shifts")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--max-train", type=int, default=None, help="use only the first k training images (default: all)")
    p.add_argument("--adv-eps", type=float, default=0.0,
                   help="L2 PGD adversarial training: radius in [0, 1] pixel units (default 0: standard training)")
    p.add_argument("--adv-steps", type=int, default=7, help="PGD steps per batch with --adv-eps (default 7)")
    p.add_argument("--out", required=True, help="checkpoint directory (resumed when it holds a checkpoint)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def train_main(argv=None) -> int:
    """``jaxrecover-train`` / ``python train.py``."""
    a = _train_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import EXTRA_MODEL_NAMES, MODEL_NAMES
    from .training import TrainConfig, train_and_evaluate

    if a.model not in MODEL_NAMES + EXTRA_MODEL_NAMES:
        print(f"error: unknown model {a.model!r}; choose one of: {', '.join(MODEL_NAMES + EXTRA_MODEL_NAMES)}",
              file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig(model=a.model, dataset=a.dataset, epochs=a.epochs, batch_size=a.batch_size,
                          learning_rate=a.lr, augment=not a.no_augment, seed=a.seed, max_train=a.max_train,
                          adv_eps=a.adv_eps, adv_steps=a.adv_steps)
        result = train_and_evaluate(cfg, a.out, resume=not a.no_resume, progress=not a.quiet)
    except (DataError, CheckpointError, ValueError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("interrupted: the last completed epoch's checkpoint is kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    m = result["metadata"]
    print(f"{m['model']} on {m['dataset']} ({m['split']}): test accuracy {100 * m['test_accuracy']:.2f}% "
          f"after {m['epochs']} epochs, checkpoint in {a.out}")
    return 0


def _ignore_further_interrupts() -> None:
    """A second Ctrl-C while an interrupted run reports and leaves would print a traceback: ignore it."""
    import signal
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def _evaluate_parser():
    from .models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="jaxrecover-evaluate", description=EVALUATE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help=f"any of: {' '.join(MODEL_NAMES)} (default: all five; those without a checkpoint are trained first, "
                        "and the run says how long that takes here before starting)")
    p.add_argument("--dataset", default="mnist", help="mnist, idx:<dir>, fashion_mnist or tfds:<name> (default: mnist)")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"],
                   help="attack dtypes (default: float32 float64; distances are float64 either way)")
    p.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--steps", type=int, default=50, help="m, the IG step count (paper: 50)")
    p.add_argument("--a", type=float, default=0.98, help="a of Experiment C, in (0, 1) (paper: 0.98)")
    p.add_argument("--mode", choices=["faithful", "shared"], default="faithful",
                   help="faithful: every IG query computed on its own, as a service would; shared: the queries' "
                        "path points computed once and shared (same numbers to round-off, faster) "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed of checkpoints trained here (default: 0)")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="directory with one checkpoint per model (default: %(default)s)")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing checkpoint")
    p.add_argument("--epochs", type=int, default=None, help="epochs for models trained because missing (default: per model, as train.py)")
    p.add_argument("--max-train", type=int, default=None, help="training images for models trained here (default: all)")
    p.add_argument("--chunk-size", type=int, default=16, help="test images per compiled call (default: 16)")
    p.add_argument("--no-figures", action="store_true", help="skip Figures 4-5 (PNG files in --out)")
    p.add_argument("--bn-batch-stats", action="store_true",
                   help="ablation (resnet18): BatchNorm on batch statistics, as a PyTorch model left in train() mode")
    p.add_argument("--out", default=None, help="results directory (default: results/<dataset>)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md from the JSON in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process run: jax.distributed.initialize() (JAX's cluster auto-detection, e.g. SLURM or "
                        "Open MPI, or the three options below); each process computes a share of the images, "
                        "process 0 writes the results. Checkpoints must exist.")
    p.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0 (default: detected by JAX)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed (default: detected by JAX)")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed (default: detected by JAX)")
    return p


def evaluate_main(argv=None) -> int:
    """``jaxrecover-evaluate`` / ``python evaluate.py``."""
    a = _evaluate_parser().parse_args(argv)
    import jax

    if a.distributed:
        try:
            jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                       process_id=a.process_id)
        except (ValueError, RuntimeError) as e:
            print(f"error: --distributed could not start ({str(e).splitlines()[0]}); give --coordinator HOST:PORT "
                  "--num-processes P --process-id I, or run under a cluster JAX detects (SLURM, Open MPI)",
                  file=sys.stderr)
            return 2
    # float64 runs need x64 before any array exists; float32 runs state their dtypes
    # explicitly, and the metric is then computed in float64 for both.
    jax.config.update("jax_enable_x64", True)
    from pathlib import Path

    from .checkpoint import CheckpointError
    from .data import DataError
    from .fileio import atomic_write_text
    from .protocol import EvalConfig, evaluate, load_results, markdown_report

    out = a.out or f"results/{a.dataset.replace(':', '_').replace('/', '_')}"
    try:
        if a.report_only:
            text = markdown_report(load_results(out))
            atomic_write_text(Path(out) / "report.md", text)
            print(text)
            return 0
        cfg = EvalConfig(models=tuple(a.models), dataset=a.dataset, dtypes=tuple(a.dtype), n=a.n, steps=a.steps,
                         a=a.a, mode=a.mode, seed=a.seed, checkpoints=a.checkpoints, out=out,
                         train_missing=not a.no_train, epochs=a.epochs, max_train=a.max_train,
                         chunk_size=a.chunk_size, figures=not a.no_figures, bn_batch_stats=a.bn_batch_stats,
                         command="python evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        evaluate(cfg, progress=not a.quiet)
    except (DataError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("interrupted: finished chunks are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    if jax.process_index() == 0:
        print((Path(out) / "report.md").read_text())
    return 0


def demo_main(argv=None) -> int:
    """``jaxrecover-demo`` / ``python -m jaxrecover.demo``."""
    from .demo import main

    return main(argv)


SERVE_DOC = """Serve a defended IG explanation endpoint (KServe V1 protocol, Vertex AI's response fields).

POST /v1/models/NAME:explain {"instances": [x], "parameters": {"targets": [t]}} answers IG with the rule,
step count, baseline and dtype given here, through each --defence (innermost first); :predict answers logits.
Needs the endpoints extra (pip install 'jaxrecover[endpoints]').

Examples:
    jaxrecover serve checkpoints/lenet --rule gausslegendre --steps 15
    jaxrecover serve checkpoints/twolayer --defence round:3 --budget-per-key 1000 --port 8081
"""


def serve_main(argv=None) -> int:
    """``jaxrecover serve CHECKPOINT ...``: a defended explanation endpoint (blocks until interrupted)."""
    from .services.serving import add_serve_arguments, check_config, config_from_args, serve

    p = argparse.ArgumentParser(prog="jaxrecover serve", description=SERVE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)
    a = p.parse_args(argv)
    try:
        cfg = config_from_args(a)
        check_config(cfg)
        print(f"serving {a.checkpoint} on http://{a.host}:{a.port}/v1/models/{a.name or '<model>'}:explain "
              f"({cfg.rule}, m={cfg.steps}, {'fixed' if cfg.fixed_steps else 'free'} steps, {cfg.dtype}, "
              f"baseline {cfg.baseline}, defences: {', '.join(cfg.defences) or 'none'}, "
              f"budget per key: {cfg.budget_per_key or 'none'})", flush=True)
        serve(a.checkpoint, cfg, name=a.name, host=a.host, port=a.port)
    except (ValueError, OSError, ImportError) as e:
        print(f"jaxrecover serve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


AUDIT_DOC = """Audit an IG explanation endpoint: identify it, recover VG from it, report what would stop it.

Prints a table (and with --out writes report.md and report.json there). Needs the endpoints extra.

Examples:
    jaxrecover audit http://127.0.0.1:8080/v1/models/twolayer:explain
    jaxrecover audit http://127.0.0.1:8080/explanations/lenet --budget 16384 --n 2
    jaxrecover audit http://127.0.0.1:8080 --model twolayer --protocol kserve --checkpoint checkpoints/twolayer
"""


def audit_main(argv=None) -> int:
    """``jaxrecover audit URL ...``."""
    p = argparse.ArgumentParser(prog="jaxrecover audit", description=AUDIT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the endpoint (see the examples)")
    p.add_argument("--model", default=None, help="the model's name (default: read from the URL)")
    p.add_argument("--protocol", default=None, choices=("kserve", "torchserve"),
                   help="the endpoint's protocol (default: read from the URL, else kserve)")
    p.add_argument("--budget", type=int, default=2**12, help="explanation queries per input (default: %(default)s)")
    p.add_argument("--inputs", default=None,
                   help="a .npy of inputs [N, H, W, C] in the model's scale (default: the first --n MNIST test images)")
    p.add_argument("--n", type=int, default=3, help="inputs to attack when --inputs is not given (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="the served checkpoint, for the distance to its own VG (operators; default: none)")
    p.add_argument("--api-key", default=None, help="sent as X-API-Key (default: none)")
    p.add_argument("--assume", default="auto", metavar="RULE/M",
                   help="settings to attack with when identification fails: RULE/M (a fixed m, zero baseline), "
                        "'none', or 'auto' = TorchServe VisionHandler's gausslegendre/15 for --protocol torchserve, "
                        "none otherwise (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for report.md and report.json (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        import numpy as np

        from .audit import audit_endpoint, default_inputs, parse_url, report_markdown, write_report
        url, model, protocol = parse_url(a.url, a.model, a.protocol)
        if a.inputs is not None:
            x = np.load(a.inputs)
            if x.ndim != 4:
                raise ValueError(f"--inputs must hold [N, H, W, C] inputs, got shape {x.shape}")
        else:
            x = default_inputs(a.n)
        rep = audit_endpoint(url, model, x, protocol=protocol, budget=a.budget, checkpoint=a.checkpoint,
                             api_key=a.api_key, progress=not a.quiet, assume=a.assume)
        print(report_markdown(rep), end="")
        if a.out:
            for path in write_report(rep, a.out):
                print(f"wrote {path}")
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"jaxrecover audit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


STUDY_DOC = """Run one study: the rows of a table in docs/, resumable, with provenance (jaxrecover.studies.run_study).

A study trains the checkpoints it declares when they are missing (in --checkpoints, one folder per training
config), reuses rows in --out/rows.json made from the same settings, weights and data, and prints its tables
with the command, commit, machine and each checkpoint's training config and state SHA-256 under them.

Examples:
    jaxrecover study --list
    jaxrecover study patterns --models twolayer
    jaxrecover study patterns --quick --out /tmp/patterns
    jaxrecover study boundary --docs          # also write the table into its docs file
"""


def _study_list() -> str:
    from .studies import STUDIES

    width = max(len(n) for n in STUDIES)
    return "\n".join(f"  {n:<{width}}  {s.title}" + (f"  [{s.doc}]" if s.doc else "") for n, s in STUDIES.items())


def _study_parser(study):
    import dataclasses
    import typing

    import importlib

    module_doc = importlib.import_module(type(study).__module__).__doc__ or ""
    p = argparse.ArgumentParser(prog=f"jaxrecover study {study.name}", description=f"{study.title}.\n\n{module_doc}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(study.Config)
    g = p.add_argument_group("study settings (the defaults reproduce the doc's table)")
    for f in dataclasses.fields(study.Config):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata.get('help', '')} (default: {shown})"
        if kind is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is tuple:
            item = args[0]
            conv = (lambda text, item=item: tuple(item(v.strip()) for v in text.split(",") if v.strip()))
            metavar = "A,B,..."
        elif type(None) in args:  # Optional[X]
            item = next(a for a in args if a is not type(None))
            conv = (lambda text, item=item: None if text.lower() == "none" else item(text))
            metavar = item.__name__.upper()
        else:
            conv, metavar = kind, kind.__name__.upper()
        g.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, metavar=metavar, help=help_)
    p.add_argument("--quick", action="store_true", help="a small smoke-run configuration (explicit options win)")
    p.add_argument("--out", default=study.default_out(), help="folder for rows.json and figures (default: %(default)s)")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="folder with one checkpoint per declared training config (default: %(default)s)")
    p.add_argument("--docs", nargs="?", const=study.doc or "", default=None, metavar="FILE",
                   help=f"write the table into FILE (no FILE: {study.doc or 'none'}) between its markers (default: "
                        "no doc is written)")
    p.add_argument("--no-resume", action="store_true", help="recompute every row, ignoring --out/rows.json")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def study_main(argv=None) -> int:
    """``jaxrecover study NAME [options]`` / ``jaxrecover study --list``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        if not argv or argv[0] != "--list":
            print(STUDY_DOC)
        print("studies:\n" + _study_list())
        return 0
    from .studies import get_study

    try:
        study = get_study(argv[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = vars(_study_parser(study).parse_args(argv[1:]))
    common = {k: a.pop(k) for k in ("quick", "out", "checkpoints", "docs", "no_resume", "no_train", "quiet")}
    import dataclasses

    import jax

    jax.config.update("jax_enable_x64", True)  # studies state their dtypes; float64 where they say so
    from .checkpoint import CheckpointError
    from .data import DataError
    from .studies import run_study

    try:
        base = study.quick(study.make_config()) if common["quick"] else study.make_config()
        cfg = dataclasses.replace(base, **a)
        if common["docs"] == "":
            raise ValueError(f"study {study.name} has no docs file; give --docs FILE")
        result = run_study(study, cfg, out=common["out"], checkpoints=common["checkpoints"], docs=common["docs"],
                           resume=not common["no_resume"], train=not common["no_train"],
                           progress=not common["quiet"], command="jaxrecover study " + " ".join(argv))
    except (DataError, CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("interrupted: finished units are in rows.json; rerun the same command to resume", file=sys.stderr)
        return 130
    print(result.markdown)
    print(f"\n({result.computed} units computed, {result.reused} reused from {common['out']}/rows.json)",
          file=sys.stderr)
    return 0


COMMANDS = {"train": "train_main", "evaluate": "evaluate_main", "study": "study_main", "demo": "demo_main",
            "serve": "serve_main", "audit": "audit_main"}


def main(argv=None) -> int:
    """``jaxrecover COMMAND ...``: train, evaluate, study, demo."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: jaxrecover {train,evaluate,study,demo,serve,audit} ...\n\n"
              "  train     train one of the paper's models (python train.py)\n"
              "  evaluate  the paper's Tables 1-4 and Figures 4-5 (python evaluate.py)\n"
              "  study     one table of docs/, resumable, with provenance (jaxrecover study --list)\n"
              "  demo      the main job: VG recovered from IG answers\n"
              "  serve     a defended IG explanation endpoint (KServe protocol) for a checkpoint\n"
              "  audit     identify an explanation endpoint, recover VG from it, and report what stops it\n"
              "\n'jaxrecover COMMAND --help' shows each command's options.",
              file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] in ("study", "audit"):
        _terminate_as_exit()
    return globals()[COMMANDS[argv[0]]](argv[1:])


def _terminate_as_exit() -> None:
    """SIGTERM unwinds like an exception, so the servers a study or an audit started (each in its own process
    group, stopped by its context manager) are stopped instead of outliving the run."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, _exit)
    except ValueError:  # not the main thread
        pass
