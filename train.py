"""Train one of the paper's models. Thin CLI over jaxrecover.training.train_and_evaluate.

Example:
    python train.py --model lenet_nobias --dataset mnist --epochs 15 --seed 0 --out checkpoints/lenet_nobias
"""

import argparse
import sys

from jaxrecover.checkpoint import CheckpointError
from jaxrecover.data import DATASETS, DataError
from jaxrecover.models import MODEL_NAMES
from jaxrecover.training import DEFAULT_EPOCHS, TrainConfig, train_and_evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"one of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--dataset", default="mnist", help=f"one of: {', '.join(DATASETS)} (default: mnist)")
    p.add_argument("--epochs", type=int, default=None, help=f"default per model: {DEFAULT_EPOCHS}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam, cosine decay)")
    p.add_argument("--no-augment", action="store_true", help="turn off random 2-pixel shifts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first k training images")
    p.add_argument("--out", required=True, help="checkpoint directory (resumed when it holds a checkpoint)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.model not in MODEL_NAMES:
        print(f"error: unknown model {a.model!r}; choose one of: {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    cfg = TrainConfig(model=a.model, dataset=a.dataset, epochs=a.epochs, batch_size=a.batch_size,
                      learning_rate=a.lr, augment=not a.no_augment, seed=a.seed, max_train=a.max_train)
    try:
        result = train_and_evaluate(cfg, a.out, resume=not a.no_resume, progress=not a.quiet)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result["metadata"]
    print(f"{m['model']} on {m['dataset']} ({m['split']}): test accuracy {100 * m['test_accuracy']:.2f}% "
          f"after {m['epochs']} epochs, checkpoint in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
