import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover import models
from jaxrecover.checkpoint import CheckpointError, load_metadata
from jaxrecover.data import Dataset
from jaxrecover.training import TrainConfig, load_trained, train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(mnist):
    return Dataset("mnist", mnist.split, mnist.train_images[:256], mnist.train_labels[:256],
                   mnist.test_images[:64], mnist.test_labels[:64])


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_one_epoch_on_tiny_data_learns_and_keeps_float32(tmp_path, tiny, name):
    cfg = TrainConfig(model=name, epochs=1, batch_size=32, seed=0)
    before = models.init_variables(name, jax.random.key(0))
    out = train_and_evaluate(cfg, tmp_path, dataset=tiny, progress=False)
    v = out["variables"]
    assert models.tree_dtypes(v) == {jnp.dtype(jnp.float32)}  # x64 is on in tests: nothing was promoted
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before["params"], v["params"])
    assert all(jax.tree.leaves(changed))
    meta = out["metadata"]
    for key in ("model", "dataset", "split", "seed", "epochs", "test_accuracy", "version"):
        assert key in meta
    assert meta["epochs"] == 1
    # it learns: the training loss (inference mode, no augmentation) falls below the initial one
    from jaxrecover.data import normalize

    x = jnp.asarray(normalize(tiny.train_images, np.float32))
    f = models.make_batched_logit_fn(name)

    def loss(variables):
        logits = f(variables, x)
        return float(jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(len(x)), tiny.train_labels]))

    assert loss(v) < loss(before), (loss(v), loss(before))


def test_a_few_epochs_beat_chance_by_far(tmp_path, tiny):
    out = train_and_evaluate(TrainConfig(model="twolayer", epochs=4, batch_size=32, seed=0), tmp_path, dataset=tiny,
                             progress=False)
    assert out["metadata"]["test_accuracy"] > 0.6  # chance is 0.1 (10 classes); 256 training images


def test_checkpoint_round_trip_and_resume(tmp_path, tiny):
    cfg = TrainConfig(model="twolayer", epochs=2, batch_size=32, seed=3)
    first = train_and_evaluate(cfg, tmp_path, dataset=tiny, progress=False)
    name, variables, meta = load_trained(tmp_path)
    assert name == "twolayer" and meta["epochs"] == 2
    jax.tree.map(np.testing.assert_array_equal, variables, first["variables"])
    # resuming with more epochs continues from epoch 2 and ends at 3
    cont = train_and_evaluate(TrainConfig(model="twolayer", epochs=3, batch_size=32, seed=3), tmp_path,
                              dataset=tiny, progress=False)
    assert cont["metadata"]["epochs"] == 3
    # resuming a finished run trains nothing and returns the stored parameters
    again = train_and_evaluate(TrainConfig(model="twolayer", epochs=3, batch_size=32, seed=3), tmp_path,
                               dataset=tiny, progress=False)
    jax.tree.map(np.testing.assert_array_equal, again["variables"], cont["variables"])
    assert again["metadata"]["epochs"] == 3
    assert not list(Path(tmp_path).glob("checkpoint.tmp-*"))


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny):
    cfg = TrainConfig(model="twolayer", epochs=2, batch_size=32, seed=5)
    full = train_and_evaluate(cfg, tmp_path / "full", dataset=tiny, progress=False)
    # simulate a run stopped after epoch 1: train 2 epochs' schedule but stop early
    import jaxrecover.training as T

    orig = T.save_checkpoint
    calls = {"n": 0}

    def save_then_stop(*args, **kwargs):
        orig(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt

    T.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_and_evaluate(cfg, tmp_path / "part", dataset=tiny, progress=False)
    finally:
        T.save_checkpoint = orig
    assert load_metadata(tmp_path / "part")["epochs"] == 1
    resumed = train_and_evaluate(cfg, tmp_path / "part", dataset=tiny, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 resumed["variables"], full["variables"])


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_trained(tmp_path / "nothing")
    train_and_evaluate(TrainConfig(model="twolayer", epochs=1, batch_size=32), tmp_path, dataset=tiny, progress=False)
    meta = tmp_path / "checkpoint" / "metadata.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_trained(tmp_path)
    meta.write_text(good)
    for f in (tmp_path / "checkpoint" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="could not be restored"):
        load_trained(tmp_path)
    m = json.loads(good)
    m["model"] = "lenet"
    meta.write_text(json.dumps(m))
    with pytest.raises(CheckpointError):
        load_trained(tmp_path)


def test_resume_refuses_another_model(tmp_path, tiny):
    train_and_evaluate(TrainConfig(model="twolayer", epochs=1, batch_size=32), tmp_path, dataset=tiny, progress=False)
    with pytest.raises(CheckpointError, match="model='twolayer'"):
        train_and_evaluate(TrainConfig(model="twolayer_nobias", epochs=1), tmp_path, dataset=tiny, progress=False)


def test_cli_unknown_model_and_dataset(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "vgg", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "twolayer_nobias" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "twolayer", "--dataset", "cifar",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "idx:<dir>" in r.stderr


def test_cli_trains_and_writes_a_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "twolayer_nobias", "--epochs", "1",
                        "--max-train", "512", "--quiet", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    assert load_metadata(tmp_path)["max_train"] == 512


def test_adversarial_training_attacks_inside_the_ball_and_is_recorded(tmp_path, tiny):
    from jaxrecover.data import normalize
    from jaxrecover.search import InputBox
    from jaxrecover.training import make_adversary

    name, eps = "twolayer", 0.5
    variables = models.init_variables(name, jax.random.key(1))
    x = jnp.asarray(normalize(tiny.train_images[:32], np.float32))
    y = jnp.asarray(tiny.train_labels[:32], jnp.int32)
    box = InputBox.mnist()
    z = make_adversary(models.get_model(name), eps, 5)(variables, x, y, jax.random.key(0))
    assert z.dtype == jnp.float32 and z.shape == x.shape
    r = jnp.sqrt(jnp.sum((z - x).reshape(32, -1) ** 2, axis=1))
    assert float(jnp.max(r)) <= eps * box.scale * (1 + 1e-5) and float(jnp.min(r)) > 0
    assert float(jnp.min(z)) >= box.lower - 1e-6 and float(jnp.max(z)) <= box.upper + 1e-6
    f = models.make_batched_logit_fn(name)

    def losses(inp):
        logits = f(variables, inp)
        return jax.nn.logsumexp(logits, -1) - logits[jnp.arange(32), y]

    assert float(jnp.mean(losses(z))) > float(jnp.mean(losses(x)))  # PGD ascends the loss
    out = train_and_evaluate(TrainConfig(model=name, epochs=1, batch_size=32, adv_eps=eps, adv_steps=3), tmp_path,
                             dataset=tiny, progress=False)
    assert out["metadata"]["adv_eps"] == eps and out["metadata"]["adv_steps"] == 3
    with pytest.raises(CheckpointError, match="adv_eps"):
        train_and_evaluate(TrainConfig(model=name, epochs=2, batch_size=32), tmp_path, dataset=tiny, progress=False)
    with pytest.raises(ValueError, match="adv_eps"):
        TrainConfig(adv_eps=-1.0)


def test_training_gives_the_same_weights_whatever_the_x64_setting(tmp_path, tiny):
    """Studies and evaluate turn x64 on, train.py does not: a declared TrainConfig must mean one set of weights."""
    from jaxrecover.checkpoint import load_metadata
    from jaxrecover.training import TrainConfig, train_and_evaluate

    cfg = TrainConfig(model="twolayer", epochs=1, batch_size=32)
    with jax.enable_x64(True):
        train_and_evaluate(cfg, tmp_path / "on", dataset=tiny, progress=False)
    with jax.enable_x64(False):
        train_and_evaluate(cfg, tmp_path / "off", dataset=tiny, progress=False)
    on, off = (load_metadata(tmp_path / k)["state_sha256"] for k in ("on", "off"))
    assert on == off
    assert jax.config.jax_enable_x64  # the caller's setting is restored
