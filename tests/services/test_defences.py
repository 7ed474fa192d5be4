"""Defence wrappers: each changes answers as specified, composes, keeps dtypes (issue: defences, measured)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrecover as jr
from conftest import make_net
from jaxrecover import attacks as R
from jaxrecover import services as S


@pytest.fixture(scope="module")
def net():
    logit_fn, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (4, *shape), jnp.float64)
    return logit_fn, p, x, jnp.array([0, 1, 2, 3])


def _svc(net, dtype=jnp.float64, **kw):
    logit_fn, p, x, t = net
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    return jr.SimulatedIGService(logit_fn, p, **kw), x.astype(dtype), t


def test_round_significant_matches_python_formatting():
    a = np.array([123456.789, -0.000123456, 1.0, 0.0, 9.9996, -2.5e-300])
    for k in (1, 3, 6):
        want = np.array([float(f"{v:.{k - 1}e}") for v in a])
        np.testing.assert_allclose(S.round_significant(a, k), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_rounding_defences_are_exact_and_keep_dtype(net, dtype):
    svc, x, t = _svc(net, dtype)
    plain = np.asarray(svc(x, t), np.float64)
    r3 = S.RoundAnswers(svc, 3)
    ans = r3(x, t)
    assert ans.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ans), S.round_significant(plain, 3).astype(dtype))
    f16 = S.RoundAnswers(svc, "float16")(x, t)
    assert f16.dtype == dtype
    np.testing.assert_array_equal(np.asarray(f16), plain.astype(np.float16).astype(dtype))
    fx, _ = r3.outputs(x, t)
    np.testing.assert_array_equal(np.asarray(fx), S.round_significant(np.asarray(svc.outputs(x, t)[0]), 3)
                                  .astype(dtype))
    assert S.RoundAnswers(svc, 3, outputs=False).outputs(x, t)[0].dtype == dtype
    with pytest.raises(ValueError, match="digits"):
        S.RoundAnswers(svc, 0)


@pytest.mark.parametrize("cls,std_per_scale", [(S.GaussianNoise, 1.0), (S.LaplaceNoise, np.sqrt(2.0))])
def test_noise_has_the_declared_statistics(net, cls, std_per_scale):
    svc, x, t = _svc(net)
    xs = jnp.tile(x, (250, 1))  # 1,000 answers, 12,000 noise draws
    ts = jnp.tile(t, 250)
    plain = np.asarray(svc(xs, ts))
    noisy = np.asarray(cls(svc, 0.1, relative=False, seed=1)(xs, ts))
    e = (noisy - plain).ravel()
    assert abs(e.mean()) < 4 * 0.1 * std_per_scale / np.sqrt(e.size)
    assert abs(e.std() / (0.1 * std_per_scale) - 1) < 0.05
    # relative: sigma = scale * max|answer| of each answer; reproducible per seed, fresh per call
    rel = cls(svc, 0.01, seed=2)
    e1 = np.asarray(rel(xs, ts)) - plain
    ref = np.abs(plain).max(axis=1, keepdims=True)
    assert abs((e1 / ref).std() / (0.01 * std_per_scale) - 1) < 0.05
    again = cls(svc, 0.01, seed=2)
    np.testing.assert_array_equal(np.asarray(again(xs, ts)) - plain, e1)
    assert not np.array_equal(np.asarray(again(xs, ts)) - plain, e1)


def test_top_k_keeps_the_k_largest(net):
    svc, x, t = _svc(net)
    plain = np.asarray(svc(x, t))
    top = np.asarray(S.TopK(svc, 3)(x, t))
    for a, b in zip(plain, top):
        assert np.count_nonzero(b) == 3
        keep = np.argsort(-np.abs(a))[:3]
        np.testing.assert_array_equal(b[keep], a[keep])


def test_fixed_and_random_steps(net):
    svc, x, t = _svc(net)
    fixed = S.FixSteps(svc, 32)
    np.testing.assert_array_equal(np.asarray(fixed(x, t)), np.asarray(svc(x, t, steps=32)))
    with pytest.raises(S.StepCountRefused, match="fixes the step count at 32"):
        fixed(x, t, steps=50)
    with pytest.raises(S.StepCountRefused):
        R.attack(fixed, R.paper_plan(50), x, t)
    rnd = S.RandomSteps(svc, 10, 40, seed=0)
    ans = np.asarray(rnd(x, t))
    ms = rnd.last_steps
    assert ms.shape == (4,) and ms.min() >= 10 and ms.max() <= 40
    for i in range(4):
        np.testing.assert_allclose(ans[i], np.asarray(svc(x[i:i + 1], t[i:i + 1], steps=int(ms[i])))[0],
                                   rtol=0, atol=1e-14)
    with pytest.raises(S.StepCountRefused, match="at random"):
        rnd(x, t, steps=20)


def test_defences_compose_and_budget_per_client(net):
    svc, x, t = _svc(net)
    stack = S.ClientBudget(S.RoundAnswers(S.GaussianNoise(S.FixSteps(svc, 50), 1e-3, seed=0), 4), budget=6)
    d = stack.describe()
    assert d["wrapped_by"] == ["ClientBudget", "RoundAnswers", "GaussianNoise", "FixSteps"]
    assert [e["defence"] for e in d["defences"]] == ["RoundAnswers", "GaussianNoise"]
    assert d["fixed_steps"] is True and d["steps"] == 50
    ans = np.asarray(stack(x, t))
    np.testing.assert_array_equal(ans, S.round_significant(ans, 4))
    assert stack.queries == 4 and stack.remaining == 2 and svc.queries == 4
    with pytest.raises(S.QueryBudgetExceeded, match="client budget"):
        stack(x, t)
    assert stack.queries == 4 and svc.queries == 4  # nothing answered, nothing counted
    stack.reset_counters()
    assert stack.remaining == 6


def test_smoothgrad_ig_is_the_mean_over_noisy_copies_and_averaging_beats_noise(net):
    svc, x, t = _svc(net)
    sg = S.SmoothGradIG(svc, samples=5, sigma=0.1, seed=3)
    ans = np.asarray(sg(x, t))
    assert ans.dtype == np.float64 and svc.queries == 5 * 4
    rng = np.random.default_rng(3)
    x64 = np.asarray(x)
    span = (x64.max(1) - x64.min(1))[:, None]
    want = np.mean([np.asarray(svc(jnp.asarray(x64 + 0.1 * span * rng.standard_normal(x64.shape)), t))
                    for _ in range(5)], axis=0)
    np.testing.assert_allclose(ans, want, rtol=0, atol=1e-13)
    assert np.max(np.abs(ans - np.asarray(svc(x, t)))) > 1e-3  # it is not plain IG
    # the attacker's averaging: error shrinks like 1/sqrt(repeats), every repeat counted
    noisy = S.GaussianNoise(svc, 0.1, relative=False, seed=4)
    plain = np.asarray(svc(x, t))
    before = svc.queries
    avg = np.asarray(R.Averaged(noisy, 100)(x, t))
    assert svc.queries - before == 400
    assert np.std(avg - plain) < 0.1 / np.sqrt(100) * 1.3


def test_expected_gradients_averages_ig_over_random_reference_baselines(net):
    logit_fn, p, x, t = net
    refs = np.asarray(jax.random.normal(jax.random.key(9), (7, x.shape[1]), jnp.float64))
    svc = jr.SimulatedIGService(logit_fn, p, steps=16, baseline=jr.explainers.RandomBaseline(refs, seed=5))
    eg = S.ExpectedGradients(svc, samples=3)
    ans = np.asarray(eg(x, t))
    rng = np.random.default_rng(5)
    want = np.mean([np.asarray(jr.explain(jr.IG(steps=16), logit_fn, p, x, t,
                                          baseline=jnp.asarray(refs[rng.integers(7, size=4)])))
                    for _ in range(3)], axis=0)
    np.testing.assert_allclose(ans, want, rtol=0, atol=1e-13)
    assert svc.queries == 12 and eg.describe()["defences"][0]["samples"] == 3
    with pytest.raises(ValueError, match="depends on the input"):
        R.attack(svc, R.paper_plan(50), x, t)
    with pytest.raises(ValueError, match="LINEAR baseline"):
        R.recover_input_baseline(svc, x, t)
    with pytest.raises(ValueError, match="RandomBaseline"):
        S.ExpectedGradients(jr.SimulatedIGService(logit_fn, p), 3)


# ----------------------------------------------------------------------------------------- adaptive attacks
@pytest.mark.parametrize("rule", ["riemann_right", "riemann_trapezoid", "riemann_left"])
def test_lattice_attack_is_exact_and_beats_one_plan_against_rounding(rule):
    logit_fn, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    x = jax.random.normal(jax.random.key(6), (64, *shape), jnp.float64)
    t = jnp.arange(64) % 5
    svc = jr.SimulatedIGService(logit_fn, p, rule=rule)
    vg = jr.explain(jr.VG(), logit_fn, p, x, t)
    rec, mask, rep = R.lattice_attack(svc, x, t)
    assert rec.dtype == jnp.float64 and rep.rank == rep.unknowns and rep.queries == [svc.queries // 64] * 64
    assert float(jnp.max(jr.normalized_distance(rec, vg, mask))) <= 1e-12
    rounded = S.RoundAnswers(svc, 3)
    one, m1, _ = R.attack(rounded, R.best_plan(svc), x, t)
    many, m2, _ = R.lattice_attack(rounded, x, t)
    d1 = float(jnp.mean(jr.normalized_distance(one, vg, m1)))
    d2 = float(jnp.mean(jr.normalized_distance(many, vg, m2)))
    assert d2 < 0.8 * d1, (d1, d2)


def test_lattice_attack_says_when_the_grid_does_not_determine_g1():
    logit_fn, p, shape = make_net("dense2", jax.random.key(5), bias=True)
    svc = jr.SimulatedIGService(logit_fn, p, rule="riemann_middle")  # its points never close on a finite grid
    with pytest.raises(ValueError, match="do not determine g"):
        R.lattice_attack(svc, jnp.ones((1, *shape), jnp.float64), jnp.array([0]))
    assert svc.queries == 0


# ----------------------------------------------------------------------------------------- utility metrics
def test_spearman_and_top_overlap_match_plain_references():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 50))
    b = a + 0.5 * rng.standard_normal((3, 50))
    b[0, :10] = 1.0  # ties

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size)
        for val in np.unique(v):  # average over ties
            r[v == val] = r[v == val].mean()
        return r

    want = [np.corrcoef(ranks(x), ranks(y))[0, 1] for x, y in zip(a, b)]
    got = jr.spearman(jnp.asarray(a), jnp.asarray(b))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(jr.spearman(jnp.asarray(a), jnp.asarray(2 * a + 1)), 1.0, rtol=1e-12)
    k = 5
    want_o = [len(set(np.argsort(-np.abs(x))[:k]) & set(np.argsort(-np.abs(y))[:k])) / k for x, y in zip(a, b)]
    np.testing.assert_allclose(jr.top_fraction_overlap(jnp.asarray(a), jnp.asarray(b), 0.1), want_o)
    assert float(jr.top_fraction_overlap(jnp.asarray(a), jnp.asarray(a), 0.1)[0]) == 1.0


def test_best_plan_refuses_services_that_choose_m_with_the_way_out(net):
    svc, x, t = _svc(net)
    for defended, steps in ((S.FixSteps(svc, 50), "50"), (S.RandomSteps(svc, 20, 80), "random 20..80")):
        with pytest.raises(ValueError, match=f"choose m \\({steps}\\).*recover_fixed_steps"):
            R.best_plan(defended)


def test_random_steps_attack_estimates_m_and_recovers_vg_exactly(net):
    """Random m per query: pairing answers whose (unknown) m's fit an exact plan recovers VG to round-off."""
    svc, x, t = _svc(net)
    rnd = S.RandomSteps(svc, 6, 12, seed=3)
    with pytest.raises(S.StepCountRefused, match="recover_random_steps"):
        R.attack(rnd, R.paper_plan(10), x, t)
    logit_fn, p, _, _ = net
    vg = jr.explain(jr.VG(), logit_fn, p, x, t)
    rec, mask, rep = R.recover_random_steps(rnd, x, t, low=6, high=12, max_rounds=40)
    assert rec.dtype == np.float64 and all(rep.found)
    assert np.asarray(mask).all()
    d = np.asarray(jr.normalized_distance(jnp.asarray(rec), vg, jnp.asarray(mask)))
    assert d.max() < 1e-12, d
    assert all(q == r * 7 for q, r in zip(rep.queries, rep.rounds))  # 7 scales: 1 and (c-1)/c, c = 7..12
    assert svc.queries == sum(rep.queries)
    with pytest.raises(ValueError, match="two-query plans"):
        R.recover_random_steps(S.RandomSteps(_svc(net, rule="gausslegendre")[0], 6, 12), x, t, low=6, high=12)


def test_defences_study_is_importable_data_one_unit_per_defence_and_attack():
    """The defence study is data (importable: ``defences()``, ``attacks_for``); its units are unique and keyed by
    everything that decides a row (the runner adds weights and data, tests/studies)."""
    from jaxrecover.studies.defences import DefencesStudy, attacks_for, defences

    study = DefencesStudy()
    units = study.units(study.make_config(models=("twolayer", "resnet18")))
    keys = [(u.settings["model"], u.settings["defence"], u.settings["strength"], u.settings["attack"]) for u in units]
    assert len(keys) == len(set(keys)) == sum(len(attacks_for(d, m)) for m in ("twolayer", "resnet18")
                                              for d, _, _ in defences())
    assert all(u.checkpoints == (u.settings["model"],) for u in units)
    assert not any("fixed-m" in a for a in attacks_for("fixed m", "resnet18"))  # too slow there (docstring)
    with pytest.raises(ValueError, match="defences \\['walls'\\]"):
        study.units(study.make_config(defences=("walls",)))
