"""Issue 34's faults, tried as a hostile user would: each test fails on the code before the fix.

Numbering follows the issue (docs/RELIABILITY.md, rows 34.N).
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from conftest import _dense_net, make_net
from jaxrecover import attacks as R
from jaxrecover import services as S
from jaxrecover.checkpoint import CheckpointError, load_metadata, writer
from jaxrecover.training import TrainConfig, load_trained, train_and_evaluate

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kw)


def _one_line(stderr: str) -> bool:
    return "Traceback" not in stderr and len([ln for ln in stderr.splitlines() if ln.startswith("error")]) == 1


def _act_net(act, dtype=jnp.float64, sizes=(12, 16, 16, 5)):
    key = jax.random.key(3)
    ps = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        k1, k2, key = jax.random.split(key, 3)
        ps.append((jax.random.normal(k1, (a, b), dtype) / jnp.sqrt(jnp.asarray(a, dtype)),
                   jax.random.normal(k2, (b,), dtype) * 0.5))

    def f(p, x):
        h = x
        for i, (w, c) in enumerate(p):
            h = h @ w + c
            if i < len(p) - 1:
                h = act(h)
        return h

    return f, ps


class _Poison(S.ServiceWrapper):
    """Answers of the inner service with one NaN (or inf) in the first example, as a broken endpoint sends."""

    def __init__(self, inner, value=np.nan):
        super().__init__(inner)
        self.__dict__["value"] = value

    def __call__(self, x, target, *, steps=None):
        return self.inner(x, target, steps=steps).at[0, 3].set(self.value)


# --------------------------------------------------------------------------- crashes, hangs, lost data
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_34_1_a_nan_answer_stops_fixed_step_recovery_at_once(value):
    f, p, _ = make_net("dense2", jax.random.key(5), bias=True)
    svc = jr.SimulatedIGService(f, p, rule="gausslegendre", steps=15, fixed_steps=True)
    x = jax.random.normal(jax.random.key(6), (2, 12), jnp.float64)
    with pytest.raises(S.ServiceAnswerError, match="NaN/inf"):
        R.recover_fixed_steps(_Poison(svc, value), x, jnp.array([0, 1]))
    assert svc.queries <= 3  # the first request: before, 7 -> 131 -> 4,099 ... queries until killed


@pytest.mark.parametrize("act", [jnp.tanh, jax.nn.softplus], ids=["tanh", "softplus"])
@pytest.mark.parametrize("method", ["jumps", "kinks"])
def test_34_2_a_smooth_model_is_refused_within_a_few_dozen_queries(act, method):
    f, p = _act_net(act)
    svc = jr.SimulatedIGService(f, p, rule="gausslegendre", steps=15, fixed_steps=True)
    x = jax.random.normal(jax.random.key(6), (2, 12), jnp.float64)
    recover = R.recover_fixed_steps if method == "jumps" else R.recover_fixed_steps_from_kinks
    with pytest.raises(R.NotPiecewiseLinear, match="not piecewise linear"):
        recover(svc, x, jnp.array([0, 1]))
    assert svc.queries <= 40  # before: 200,000 queries in 44 s, or unbounded


def test_34_2_the_linearity_check_passes_relu_nets_of_every_kind():
    for kind in ("dense2", "dense4", "conv"):
        f, p, shape = make_net(kind, jax.random.key(5), bias=True)
        svc = jr.SimulatedIGService(f, p, rule="gausslegendre", steps=15, fixed_steps=True)
        x = jax.random.normal(jax.random.key(6), (1, *shape), jnp.float64)
        d = np.asarray(x[0], np.float64)

        def answer_of(s, svc=svc, d=d):
            q = jnp.asarray(np.stack([si * d for si in s]) / svc.quadrature()[0].max(), jnp.float64)
            a = np.asarray(svc(q, jnp.zeros(len(s), jnp.int32)), np.float64)
            return [ai / np.where(qi != 0, np.asarray(qi), 1) for ai, qi in zip(a, q)]

        assert R.check_piecewise_linear(answer_of, 0.25, 1.0, 1e-12) <= 27


def _hold_writer(path: Path, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from jaxrecover.checkpoint import writer
        with writer({str(path)!r}):
            print("locked", flush=True)
            time.sleep({seconds})
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_34_3_a_second_trainer_with_the_same_out_refuses(tmp_path, tiny):
    out = tmp_path / "twolayer"
    holder = _hold_writer(out, 60)
    try:
        with pytest.raises(CheckpointError, match=rf"being written by another run \(pid {holder.pid}\)"):
            train_and_evaluate(TrainConfig(model="twolayer", epochs=1, batch_size=32), out, dataset=tiny,
                               progress=False)
        r = _cli(ROOT / "train.py", "--model", "twolayer", "--epochs", "1", "--max-train", "64", "--out", out,
                 "--quiet")
        assert r.returncode == 2 and "being written by another run" in r.stderr and _one_line(r.stderr)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "checkpoint").exists()  # nothing was written over the holder's folder


def test_34_3_an_evaluation_waits_for_the_run_training_its_checkpoint(tmp_path, tiny):
    """Two evaluations that both miss a checkpoint: the second waits and loads the first one's weights."""
    from jaxrecover.protocol import EvalConfig
    from jaxrecover.protocol.evaluation import _load_or_train

    ckpt = tmp_path / "ck" / "twolayer"
    code = textwrap.dedent(f"""
        import time, numpy as np
        from jaxrecover.checkpoint import writer
        from jaxrecover.data import Dataset, load_dataset
        from jaxrecover.training import TrainConfig, train_and_evaluate
        m = load_dataset("mnist")
        tiny = Dataset("mnist", m.split, m.train_images[:128], m.train_labels[:128], m.test_images[:32],
                       m.test_labels[:32])
        with writer({str(ckpt)!r}):
            print("locked", flush=True)
            time.sleep(3)
            train_and_evaluate(TrainConfig(model="twolayer", epochs=1, batch_size=32, seed=7), {str(ckpt)!r},
                               dataset=tiny, progress=False)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    cfg = EvalConfig(models=("twolayer",), checkpoints=str(tmp_path / "ck"), epochs=1, seed=0)
    _, _, meta = _load_or_train(cfg, "twolayer", tiny, progress=False)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert meta["seed"] == 7  # the other run's model, not one trained over it with seed 0
    assert load_metadata(ckpt)["state_sha256"] == meta["state_sha256"]


def test_34_4_a_reader_waits_for_a_save_and_never_deletes_it(tmp_path, trained):
    root = tmp_path / "twolayer"
    shutil.copytree(trained, root)
    code = textwrap.dedent(f"""
        import time, pathlib
        from jaxrecover.fileio import folder_lock
        root = pathlib.Path({str(root)!r})
        with folder_lock(root, "checkpoint"):
            tmp = root / "checkpoint.tmp-inprogress"
            tmp.mkdir()
            (tmp / "part").write_text("x")
            print("saving", flush=True)
            time.sleep(3)
            print("intact" if (tmp / "part").exists() else "deleted", flush=True)
            (tmp / "part").unlink(); tmp.rmdir()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saving"
    t0 = time.perf_counter()
    name, _, _ = load_trained(root)  # before: a false "damaged file", and the trainer's folder deleted
    assert name == "twolayer" and time.perf_counter() - t0 > 1.0
    assert p.stdout.readline().strip() == "intact"
    p.wait(timeout=60)


def test_34_5_patterns_never_overwrite_a_model_checkpoint(tmp_path, trained):
    root = tmp_path / "twolayer"
    shutil.copytree(trained, root)
    before = load_metadata(root)["state_sha256"]
    _, variables, _ = load_trained(root)
    model = jr.make_model("twolayer")
    images = jnp.asarray(np.random.default_rng(0).uniform(-0.4, 2.8, (16, 28, 28, 1)), jnp.float32)
    with pytest.raises(CheckpointError, match="holds a trained 'twolayer' model, not fitted patterns"):
        jr.fitted_patterns(root, model, variables, images, progress=False)
    with pytest.raises(CheckpointError, match="not fitted patterns"):
        jr.save_patterns(root, {}, model, variables, images)
    assert load_metadata(root)["state_sha256"] == before and load_trained(root)[0] == "twolayer"
    pats = jr.fitted_patterns(root / "patterns", model, variables, images, progress=False)  # beside it: fine
    assert set(pats) == set(model.kernels(variables))


def test_34_6_a_truncated_native_library_is_rebuilt_not_a_bus_error(tmp_path):
    probe = ("import warnings, jaxrecover.native as n; warnings.simplefilter('always'); "
             "ok = n.available(); print(ok, n.status())")
    env = {"JAXRECOVER_CACHE": str(tmp_path)}
    first = _cli("-c", probe, env=env)
    if not first.stdout.startswith("True"):
        pytest.skip(f"the native kernels are not built here: {first.stdout.strip()}")
    lib = next((tmp_path / "native").glob("relu_conv_path-*.so"))
    lib.write_bytes(lib.read_bytes()[:4096])  # a copy cut short
    again = _cli("-c", probe, env=env)
    assert again.returncode == 0, again.stderr  # before: SIGBUS (rc -7), no message
    assert again.stdout.startswith("True") and "is damaged" in again.stderr
    third = _cli("-c", probe, env=env)
    assert third.stdout.startswith("True") and "damaged" not in third.stderr


# --------------------------------------------------------------------------- silently wrong
@pytest.fixture(scope="module")
def results_dir(tmp_path_factory, trained):
    """One evaluate run (twolayer, 2 images, float64) into a results folder."""
    out = tmp_path_factory.mktemp("results")
    ck = out.parent / "ck"
    ck.mkdir(exist_ok=True)
    if not (ck / "twolayer").exists():
        shutil.copytree(trained, ck / "twolayer")
    r = _cli(ROOT / "evaluate.py", "--models", "twolayer", "--checkpoints", ck, "--out", out, "--n", "2",
             "--dtype", "float64", "--no-figures", "--no-train", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def _run_json(out: Path) -> Path:
    (path,) = [p for p in out.glob("*.json") if "notes" not in p.name]
    return path


def test_34_7_an_edited_result_is_never_reused_or_reported(tmp_path, results_dir):
    out = tmp_path / "r"
    shutil.copytree(results_dir, out)
    path = _run_json(out)
    rec = json.loads(path.read_text())
    assert rec["record_sha256"] and rec["distances_sha256"]
    true_mean = rec["results"]["table1"]["mean"]
    rec["results"]["table1"]["mean"] = 1.234e-5
    path.write_text(json.dumps(rec))
    r = _cli(ROOT / "evaluate.py", "--report-only", "--out", out)
    assert r.returncode == 2 and "was edited or damaged" in r.stderr and _one_line(r.stderr)
    # without its own hash, the distances beside it still give the edit away
    del rec["record_sha256"]
    path.write_text(json.dumps(rec))
    r = _cli(ROOT / "evaluate.py", "--report-only", "--out", out)
    assert r.returncode == 2 and "is not what its distances" in r.stderr and _one_line(r.stderr)
    # a normal evaluate recomputes it instead of reusing it
    r = _cli(ROOT / "evaluate.py", "--models", "twolayer", "--checkpoints", results_dir.parent / "ck", "--out", out,
             "--n", "2", "--dtype", "float64", "--no-figures", "--no-train", "--quiet")
    assert r.returncode == 0 and "recomputing" in r.stderr
    assert json.loads(path.read_text())["results"]["table1"]["mean"] == true_mean


def test_34_8_nan_weights_are_an_error_not_a_partly_finite_gradient():
    model = jr.make_model("lenet")
    v = jr.init_variables("lenet", jax.random.key(0))
    bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan) if a.ndim == 1 else a, v)
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"parameters hold \d+ NaN/inf"):
        jr.explain(jr.VG(), model, bad, x, 1)
    with pytest.raises(ValueError, match="NaN/inf"):
        jr.SimulatedIGService(model, bad)(x, jnp.array([1, 2]))
    assert jr.explain(jr.VG(), model, v, x, 1).shape == x.shape  # the good weights still work


def test_34_9_nan_answers_never_reach_attack_or_extraction():
    f, p, _ = make_net("dense2", jax.random.key(5), bias=True)
    svc = jr.SimulatedIGService(f, p, rule="riemann_right", steps=8)
    x = jax.random.normal(jax.random.key(6), (2, 12), jnp.float64)
    with pytest.raises(S.ServiceAnswerError, match="NaN/inf"):
        R.attack(_Poison(svc), R.best_plan(svc), x, jnp.array([0, 1]))
    with pytest.raises(S.ServiceAnswerError, match="NaN/inf"):
        R.attack(_Poison(svc, np.inf), R.best_plan(svc), x, jnp.array([0, 1]))
    with pytest.raises(S.ServiceAnswerError, match="NaN/inf"):
        jr.extract_two_layer(_Poison(svc), np.asarray(x), classes=5, progress=False)

    class BadOutputs(S.ServiceWrapper):
        def outputs(self, x, target):
            fx, fb = self.inner.outputs(x, target)
            return fx.at[0].set(jnp.nan), fb

    with pytest.raises(S.ServiceAnswerError, match="output values"):
        BadOutputs(svc).outputs(x, jnp.array([0, 1]))

    class Reshaped(S.ServiceWrapper):
        def __call__(self, x, target, *, steps=None):
            return self.inner(x, target, steps=steps)[:1]

    with pytest.raises(S.ServiceAnswerError, match=r"shape \(1, 12\) for a request of shape \(2, 12\)"):
        Reshaped(svc)(x, jnp.array([0, 1]))


class _IgnoresSteps(S.ServiceWrapper):
    """Always answers riemann_left with 30 steps, whatever step count is asked for."""

    def __init__(self, model, params):
        super().__init__(jr.SimulatedIGService(model, params, rule="riemann_left", steps=30))

    def __call__(self, x, target, *, steps=None):
        return self.inner(x, target, steps=30)


def test_34_10_a_service_outside_the_candidates_is_unidentified():
    f, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    x = np.asarray(jax.random.normal(jax.random.key(6), shape, jnp.float64))
    ident = R.identify_service(_IgnoresSteps(f, p), x, 1)
    assert ident.rule is None and ident.steps is None and not ident.identified
    assert ident.note.startswith("unidentified") and min(v for k, v in ident.evidence.items() if "echo" not in k) > 0.05
    good = R.identify_service(jr.SimulatedIGService(f, p, rule="riemann_left", steps=30), x, 1)
    assert good.identified and good.rule == "riemann_left" and good.note == "identified"


def test_34_11_patterns_of_images_that_do_not_vary_are_refused():
    model = jr.make_model("twolayer")
    v = jr.init_variables("twolayer", jax.random.key(0), biases="torch")
    rng = np.random.default_rng(0)
    one = jnp.asarray(rng.uniform(-0.4, 2.8, (1, 28, 28, 1)), jnp.float32)
    for images in (jnp.repeat(one, 32, axis=0), jnp.full((32, 28, 28, 1), -0.4242, jnp.float32)):
        with pytest.raises(ValueError, match="images do not vary"):
            jr.fit_patterns(model, v, images, progress=False)
    # images constant on part of the input: the units that cannot see the variation get 0 and a warning
    lenet = jr.make_model("lenet")
    lv = jr.init_variables("lenet", jax.random.key(0), biases="torch")
    varied = jnp.asarray(rng.uniform(-0.4, 2.8, (16, 28, 28, 1)), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pats = jr.fit_patterns(lenet, lv, varied, progress=False)  # varied images: no warning
    assert all(bool(jnp.all(jnp.isfinite(e))) for layer in pats.values() for e in layer.values())
    with pytest.raises(ValueError, match="Dense_0 has the same output"):  # conv patches vary, fc inputs not
        jr.fit_patterns(lenet, lv, jnp.repeat(varied[:1], 32, axis=0), progress=False)


def test_34_12_boundary_search_refuses_bad_labels_radii_and_inputs():
    f, p = _dense_net(jax.random.key(1), (12, 16, 5), True, jnp.float64)
    x = jax.random.normal(jax.random.key(2), (4, 12), jnp.float64)
    labels = jnp.argmax(jax.vmap(lambda z: f(p, z))(x), axis=1)
    box = jr.InputBox(None, None, 1.0)
    for bad in (jnp.full(4, 5), jnp.full(4, -1)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
            jr.boundary_search(f, p, x, bad, methods=("facet",), box=box)
    for eps in ((-0.5,), (float("nan"),), (0.0,)):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            jr.boundary_search(f, p, x, labels, methods=("pgd",), box=box, eps=eps)
    with pytest.raises(ValueError, match="x holds 1 NaN"):
        jr.boundary_search(f, p, x.at[0, 0].set(jnp.nan), labels, methods=("facet",), box=box)
    # an example already predicted as another class is its own boundary point: distance 0 (before: 0.84)
    wrong = labels.at[0].set((labels[0] + 1) % 5)
    res = jr.boundary_search(f, p, x, wrong, methods=("pgd", "facet"), box=box)
    assert float(res.distance[0]) == 0.0 and bool(res.success[0]) and int(res.label[0]) == int(labels[0])
    assert bool(jnp.all(res.distance[1:] > 0))


def test_34_13_train_refuses_a_radius_out_of_range_and_an_empty_out(tmp_path):
    for args, match in ((["--adv-eps", "2"], "adv_eps"), (["--out", ""], "--out is empty"),
                        (["--seed", "-1"], "seed must be an integer in"), (["--seed", str(2**70)], "seed must be")):
        argv = ["--model", "twolayer", "--epochs", "1", "--max-train", "64", "--quiet"]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / "o")]
        r = _cli(ROOT / "train.py", *argv, *args, cwd=tmp_path)
        assert r.returncode == 2 and match in r.stderr and _one_line(r.stderr), (args, r.stderr)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "o" / "checkpoint").exists()


def test_34_14_a_budget_that_runs_out_keeps_the_finished_examples():
    f, p, _ = make_net("dense2", jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (3, 12), jnp.float64)
    t = jnp.array([0, 1, 2])
    full = R.recover_fixed_steps(jr.SimulatedIGService(f, p, steps=50, fixed_steps=True), x, t)[2].queries
    svc = jr.SimulatedIGService(f, p, steps=50, fixed_steps=True, budget=full[0] + 5)
    with pytest.raises(R.RecoveryIncomplete, match="budget ran out at example 1 of 3") as info:
        R.recover_fixed_steps(svc, x, t)
    assert isinstance(info.value, S.QueryBudgetExceeded)
    vg, mask, rep = info.value.partial
    truth = jr.explain(jr.VG(), f, p, x, t)
    assert bool(mask[0].all()) and not bool(mask[1:].any())
    assert float(jnp.max(jnp.abs(vg[0] - truth[0]))) <= 1e-12 * float(jnp.max(jnp.abs(truth[0])))
    assert bool(jnp.all(jnp.isnan(vg[1:]))) and rep.queries == [full[0]] and "example 1 of 3" in rep.stopped
    # the method's own per-example budget, and the same for the kinks recovery
    with pytest.raises(R.RecoveryIncomplete, match="budget of 50 queries per example"):
        R.recover_fixed_steps(jr.SimulatedIGService(f, p, steps=50, fixed_steps=True), x, t, budget=50)
    with pytest.raises(R.RecoveryIncomplete, match="example 0 of 3") as info:
        R.recover_fixed_steps_from_kinks(jr.SimulatedIGService(f, p, steps=50, fixed_steps=True), x, t, grid=2048,
                                         budget=500)
    assert not bool(info.value.partial[1].any()) and info.value.partial[2].stopped


# --------------------------------------------------------------------------- tracebacks instead of one line
@pytest.mark.parametrize("edit,match", [
    (lambda r: {k: v for k, v in r.items() if k != "results"}, "lacks 'results'"),
    (lambda r: [r], "holds a JSON list"),
    (lambda r: {**r, "results": {**r["results"], "table1": {**r["results"]["table1"], "mean": "n/a"}}},
     "is 'n/a', not a number"),
])
def test_34_15_bad_result_json_is_one_line(tmp_path, results_dir, edit, match):
    out = tmp_path / "r"
    shutil.copytree(results_dir, out)
    path = _run_json(out)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    r = _cli(ROOT / "evaluate.py", "--report-only", "--out", out)
    assert r.returncode == 2 and match in r.stderr and _one_line(r.stderr), r.stderr


def test_34_15_an_unrelated_json_in_out_is_not_a_run(tmp_path, results_dir):
    out = tmp_path / "r"
    shutil.copytree(results_dir, out)
    (out / "notes.json").write_text(json.dumps({"who": "me", "todo": ["more runs"]}))
    r = _cli(ROOT / "evaluate.py", "--report-only", "--out", out)
    assert r.returncode == 0 and "Table 1" in r.stdout, r.stderr


def test_34_15_metadata_with_a_list_for_the_model_is_corrupt(tmp_path, trained):
    root = tmp_path / "twolayer"
    shutil.copytree(trained, root)
    meta_path = root / "checkpoint" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model": ["twolayer"]}))
    with pytest.raises(CheckpointError, match=r"'model' is \['twolayer'\], not a name"):
        load_trained(root)
    r = _cli(ROOT / "evaluate.py", "--models", "twolayer", "--checkpoints", tmp_path, "--out", tmp_path / "o",
             "--n", "2", "--no-train", "--quiet")
    assert r.returncode == 2 and "not a name" in r.stderr and _one_line(r.stderr)


def test_34_15_a_cache_path_that_is_a_file_is_one_line(tmp_path):
    from jaxrecover.data import DataError, cache_dir

    f = tmp_path / "cachefile"
    f.write_text("")
    old = os.environ.get("JAXRECOVER_CACHE")
    os.environ["JAXRECOVER_CACHE"] = str(f)
    try:
        with pytest.raises(DataError, match="is a file, not a folder"):
            cache_dir()
    finally:
        os.environ["JAXRECOVER_CACHE"] = old if old is not None else ""
        if old is None:
            del os.environ["JAXRECOVER_CACHE"]
    r = _cli("-c", "import jaxrecover.native as n; print(n.available()); print(n.status())",
             env={"JAXRECOVER_CACHE": str(f)})
    assert r.returncode == 0 and "Traceback" not in r.stderr and "is a file, not a folder" in r.stdout


def test_34_15_bad_explain_inputs_are_one_line():
    model = jr.make_model("lenet")
    v = jr.init_variables("lenet", jax.random.key(0))
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"must be a batch \(N, 28, 28, 1\); got x of shape \(28, 28, 1\)"):
        jr.explain(jr.VG(), model, v, x[0], 1)
    with pytest.raises(TypeError, match="values such as 2.5"):  # before: "such as 1.0"
        jr.explain(jr.VG(), model, v, x, np.array([1.0, 2.5]))
    with pytest.raises(ValueError, match=r"returned shape \(1, 10\).*x\[None\]\)\[0\]"):
        jr.explain(jr.VG(), lambda p, z: z.reshape(-1)[:10][None], {}, x, 1)
    with pytest.raises(ValueError, match=r"returned shape \(\).*every class"):
        jr.explain(jr.VG(), lambda p, z: z.sum(), {}, x, 1)


def test_34_15_identify_given_a_batch_is_one_line():
    f, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    svc = jr.SimulatedIGService(f, p)
    xb = np.asarray(jax.random.normal(jax.random.key(6), (3, *shape), jnp.float64))
    with pytest.raises(ValueError, match=r"takes ONE example without a batch axis \(got x of shape \(3, 12\)\)"):
        R.identify_service(svc, xb, 1)


def test_34_15_evaluate_refuses_a_bad_seed(tmp_path):
    for seed in ("-1", str(2**70)):
        r = _cli(ROOT / "evaluate.py", "--models", "twolayer", "--seed", seed, "--checkpoints", tmp_path,
                 "--out", tmp_path / "o", "--n", "2")
        assert r.returncode == 2 and "seed must be an integer in" in r.stderr and _one_line(r.stderr)


def test_34_15_a_truncated_rows_file_is_one_line(tmp_path):
    from jaxrecover.fileio import load_rows

    path = tmp_path / "rows.json"
    path.write_text('{"command": "x", "rows": [{"model": "lenet", "a":')
    with pytest.raises(ValueError, match="is truncated or not JSON"):
        load_rows(path)
    path.write_text('{"rows": 3}')
    with pytest.raises(ValueError, match="not a rows file"):
        load_rows(path)
    assert load_rows(tmp_path / "missing.json") == []
    path.write_text('{"command": "x", "rows": [{"model": "lenet"}]}')
    assert load_rows(path) == [{"model": "lenet"}]


def test_34_15_a_truncated_checkpoint_is_one_line_without_orbax_tracebacks(tmp_path, trained):
    root = tmp_path / "twolayer"
    shutil.copytree(trained, root)
    for f in (root / "checkpoint" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = _cli(ROOT / "evaluate.py", "--models", "twolayer", "--checkpoints", tmp_path, "--out", tmp_path / "o",
             "--n", "2", "--no-train", "--quiet")
    assert r.returncode == 2 and "checkpoint" in r.stderr and _one_line(r.stderr), r.stderr
    assert "Event loop is closed" not in r.stderr


def test_34_folder_lock_is_reentrant_and_released_by_a_dying_holder(tmp_path):
    from jaxrecover.fileio import FolderBusy, folder_lock

    with folder_lock(tmp_path, "x"):
        with folder_lock(tmp_path, "x"):  # nested in one process: no deadlock
            pass
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from jaxrecover.fileio import folder_lock
        with folder_lock({str(tmp_path)!r}, "x"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, "x", wait=False):
            pass
    holder.kill()
    holder.wait()
    done = threading.Event()

    def take():
        with folder_lock(tmp_path, "x"):
            done.set()

    th = threading.Thread(target=take)
    th.start()
    th.join(timeout=30)
    assert done.is_set()  # a killed holder leaves no lock behind
    with writer(tmp_path / "w"):
        pass
