"""Real endpoints over HTTP on 127.0.0.1: KServe (`jaxrecover serve`), TorchServe, and a flaky test server.

Every server is a real process started here on a free port in its own session and stopped by its own pid's
process group (:mod:`jaxrecover.services.process`); its log stays in the test's tmp folder (pytest keeps the
last runs' folders) and its tail is printed when it fails to start.
"""

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.attacks import attack, best_plan, identify_service, recover_fixed_steps_lsq
from jaxrecover.data import normalize
from jaxrecover.engine import explain
from jaxrecover.explainers import VG
from jaxrecover.metrics import normalized_distance
from jaxrecover.models import cast_variables, init_variables, make_model
from jaxrecover.services import QueryBudgetExceeded, ServiceAnswerError, StepCountRefused, round_significant
from jaxrecover.services.remote import EndpointBudgetExceeded, RemoteIGService, RemoteServiceError
from jaxrecover.services.process import ServeProcess, ServerProcess, free_port, group_alive
from jaxrecover.services.torchserve import TorchServe, build_archive
from jaxrecover.training import load_trained


@pytest.fixture(scope="module")
def serve(tmp_path_factory, trained):
    """``serve(*args) -> url``: a `jaxrecover serve` of the module's checkpoint with ``args``."""
    procs = []

    def start(*args):
        procs.append(ServeProcess(trained, args, log=tmp_path_factory.mktemp("kserve") / "server.log").start())
        return procs[-1].url

    yield start
    for p in procs:
        p.stop()
        assert not p.running, f"server left behind; log {p.log}"


@pytest.fixture(scope="module")
def images(tiny):
    return np.asarray(normalize(tiny.test_images[:4]), np.float32), np.asarray(tiny.test_labels[:4])


def _vg(trained, x, t, dtype=jnp.float32):
    name, v, _ = load_trained(trained)
    return np.asarray(explain(VG(), make_model(name), cast_variables(v, dtype), jnp.asarray(x, dtype), jnp.asarray(t)))


def test_kserve_fixed_gl15_identified_and_recovered_over_http(serve, trained, images, tmp_path):
    url = serve("--rule", "gausslegendre", "--steps", "15")
    x, t = images
    with RemoteIGService(url, "twolayer", protocol="kserve") as r:
        a = r(x, t)
        assert a.dtype == jnp.float32 and a.shape == x.shape and r.queries == 4
        f, fb = r.outputs(x, t)  # Vertex fields of the answers just received: no new query
        name, v, _ = load_trained(trained)
        logits = np.asarray([make_model(name)(v, jnp.asarray(xi)) for xi in x])
        assert r.queries == 4 and f.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(f), logits[np.arange(4), t], rtol=1e-5, atol=1e-5)
        r.outputs(x[:1] + 0.5, t[:1])  # an input not explained before costs one query
        assert r.queries == 5
        with pytest.raises(StepCountRefused, match="fixes the step count at 15"):
            r(x[:1], t[:1], steps=20)
        assert r.queries == 5  # a refused request is not a query
        idf = identify_service(r, x[0], int(t[0]))
        assert (idf.rule, idf.steps, idf.fixed_steps, idf.dtype) == ("gausslegendre", 15, True, "float32")
        assert not np.any(idf.baseline) and sum(idf.queries.values()) <= 500
        q0 = r.queries
        vg, mask, rep = recover_fixed_steps_lsq(r.identified(idf), x[:1], t[:1], budget=4096)
        assert r.queries - q0 == rep.queries[0] <= 4096
        assert r.stats.requests >= r.queries // r.per_request and r.stats.bytes_received > 0
        d = float(normalized_distance(jnp.asarray(_vg(trained, x[:1], t[:1])), jnp.asarray(vg))[0])
        assert d <= 1e-4, d
    from jaxrecover.cli import audit_main
    assert audit_main([f"{url}/v1/models/twolayer:explain", "--n", "1", "--quiet", "--checkpoint", str(trained),
                       "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["identification"]["rule"] == "gausslegendre" and rep["identification"]["steps"] == 15
    assert rep["rows"][0]["status"] == "recovered" and rep["rows"][0]["distance"] <= 1e-4
    assert "per-key budget below" in (tmp_path / "report.md").read_text()


def test_kserve_float64_free_steps_exact_plan_over_json(serve, trained, images):
    url = serve("--rule", "riemann_right", "--steps", "50", "--free-steps", "--dtype", "float64")
    x, t = images
    x64 = x.astype(np.float64)
    with RemoteIGService(url, "twolayer", dtype=jnp.float64) as r:
        idf = identify_service(r, x64[0], int(t[0]))
        assert (idf.rule, idf.fixed_steps) == ("riemann_right", False)
        svc = r.identified(idf)
        vg, mask, _ = attack(svc, best_plan(svc), x64[:2], t[:2])
        d = np.asarray(normalized_distance(jnp.asarray(_vg(trained, x64[:2], t[:2], jnp.float64)), vg))
        assert d.max() <= 1e-10, d  # JSON carries float64 exactly (shortest round-trip repr)


def test_kserve_rounding_and_per_key_budget_answer_429(serve, images):
    url = serve("--defence", "round:3", "--budget-per-key", "5")
    x, t = images
    with RemoteIGService(url, "twolayer", api_key="alice") as alice, \
            RemoteIGService(url, "twolayer", api_key="bob") as bob:
        a = np.asarray(alice(x, t))
        np.testing.assert_array_equal(np.asarray(round_significant(a, 3), np.float32), a)
        alice(x[:1], t[:1])
        with pytest.raises(QueryBudgetExceeded, match="HTTP 429") as refused:
            alice(x[:1], t[:1])
        assert isinstance(refused.value, EndpointBudgetExceeded)  # the endpoint's budget, not the attack's own
        assert alice.queries == 5 and alice.stats.retries == 0  # a spent budget is not retried
        assert bob(x[:2], t[:2]).shape == x[:2].shape  # another key has its own budget


FLAKY = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    mode = sys.argv[2]
    seen = {}
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            n = seen[body] = seen.get(body, 0) + 1
            if mode == "flaky" and n == 1:  # every request fails once
                self.send_response(503); self.end_headers(); self.wfile.write(b'{"error": "busy"}'); return
            req = json.loads(body)
            scale = 2.0 if mode != "float64" else 2.0000000001
            out = {"explanations": [{"attributions": [{"featureAttributions": [[[v * scale for v in c] for c in r]
                                                                              for r in x]}]} for x in req["instances"]]}
            data = json.dumps(out).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@pytest.fixture
def flaky(tmp_path):
    procs = []

    def start(mode):
        script = tmp_path / "flaky.py"
        script.write_text(FLAKY)
        port = free_port()
        procs.append(ServerProcess([sys.executable, str(script), str(port), mode], tmp_path / f"{mode}.log",
                                   f"http://127.0.0.1:{port}/").start())
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.stop()


def test_retries_count_each_query_once_and_failures_raise(flaky, images):
    x, t = images
    url = flaky("flaky")
    with RemoteIGService(url, "m", per_request=1, concurrency=2, backoff=0.01) as r:
        a = np.asarray(r(x, t))
        np.testing.assert_array_equal(a, 2 * x)
        assert r.queries == 4 and r.stats.retries == 4 and r.stats.requests == 8
    with RemoteIGService(url, "m", per_request=1, retries=0, backoff=0.01) as r:
        with pytest.raises(RemoteServiceError, match="did not answer after 1 attempts.*HTTP 503"):
            r(x[3:] + 1, t[3:])  # a fresh request fails once, and no retry is allowed
        assert r.queries == 0
    with RemoteIGService(flaky("float64"), "m") as r:
        with pytest.raises(ServiceAnswerError, match="not float32 values"):
            r(x[:1], t[:1])


def test_unreachable_and_unknown_model_are_one_line_errors(serve, images):
    x, t = images
    with RemoteIGService(f"http://127.0.0.1:{free_port()}", "twolayer", retries=1, backoff=0.01) as r:
        with pytest.raises(RemoteServiceError, match="is the server running"):
            r(x[:1], t[:1])
    url = serve("--steps", "15")
    with RemoteIGService(url, "nomodel") as r:
        with pytest.raises(RemoteServiceError, match="404.*no model 'nomodel'"):
            r(x[:1], t[:1])
    with pytest.raises(ValueError, match="protocol"):
        RemoteIGService(url, "twolayer", protocol="grpc")


@pytest.mark.slow
def test_torchserve_visionhandler_ig_identified_and_recovered(tmp_path, trained, images):
    from jaxrecover.services.external.peers import CaptumIGService

    x, t = images
    name, v, _ = load_trained(trained)
    store = tmp_path / "store"
    build_archive(name, v, store)
    lenet = init_variables("lenet", jax.random.key(3), jnp.float32, biases="torch")  # a LeNet twin, top-5 variant
    build_archive("lenet", lenet, store, name="lenet_top5", topk=5)
    ts = TorchServe(store, ["twolayer"], tmp_path / "ts")
    with ts:
        with RemoteIGService(ts.url, "twolayer", protocol="torchserve", concurrency=4) as r:
            twin = CaptumIGService(name, v, rule="gausslegendre", steps=15, fixed_steps=True)
            a = np.asarray(r(x, t))
            np.testing.assert_allclose(a, np.asarray(twin(jnp.asarray(x), t)), rtol=0, atol=1e-6 * np.abs(a).max())
            logits = r.predict(x[:2])
            np.testing.assert_allclose(logits, twin.logits(x[:2]), rtol=1e-6, atol=1e-6)
            with pytest.raises(StepCountRefused, match="no step-count parameter"):
                r(x[:1], t[:1], steps=15)
            idf = identify_service(r, x[0], int(t[0]))
            assert (idf.rule, idf.steps, idf.fixed_steps) == ("gausslegendre", 15, True)
            vg, _, rep = recover_fixed_steps_lsq(r.identified(idf), x[:1], t[:1], budget=4096)
            d = float(normalized_distance(twin.gradient(x[:1], t[:1]), jnp.asarray(vg))[0])
            assert d <= 1e-4, d
        # a second TorchServe beside the first (the launcher's one pid file and the gRPC ports would clash)
        with TorchServe(store, ["lenet_top5"], tmp_path / "ts2") as ts2, RemoteIGService(
                ts2.url, "lenet_top5", protocol="torchserve") as r5:
            lenet_twin = CaptumIGService("lenet", lenet, rule="gausslegendre", steps=15, fixed_steps=True)
            (top,) = r5.predict(x[:1])
            assert len(top) == 5 and abs(sum(top.values()) - 1) < 0.5 and max(top, key=top.get) == str(
                int(np.argmax(lenet_twin.logits(x[:1]))))
            a5 = np.asarray(r5(x[:2], t[:2]))  # LeNet's VisionHandler IG over HTTP equals Captum's on the twin
            np.testing.assert_allclose(a5, np.asarray(lenet_twin(jnp.asarray(x[:2]), t[:2])), rtol=0,
                                       atol=1e-6 * np.abs(a5).max())
            assert ts.proc.poll() is None and ts2.port != ts.port
        assert not group_alive(ts2.proc.pid), f"TorchServe processes left behind; log {ts2.log}"
        pgid = ts.proc.pid
    assert not group_alive(pgid), f"TorchServe processes left behind; log {ts.log}"


def test_endpoints_study_unit_starts_its_server_and_a_per_key_budget_stops_the_recovery(trained, tmp_path):
    from jaxrecover.studies import Context
    from jaxrecover.studies.endpoints import EndpointsStudy

    study = EndpointsStudy()
    cfg = study.make_config(models=("twolayer",), servers=("kserve/budget",), n=3, per_key=1500, extraction=False)
    (unit,) = study.units(cfg)
    ctx = Context(cfg, tmp_path, {"twolayer": load_trained(trained)}, progress=False, folders={"twolayer": trained})
    (row,) = study.run(unit, ctx)
    assert (row["rule"], row["steps"], row["fixed_steps"], row["dtype"]) == ("gausslegendre", 15, True, "float32")
    first, *_, last = row["images"]
    assert first["status"] == "recovered" and first["distance"] <= 1e-4, row["images"]
    assert last["status"] == "refused: the endpoint's budget (HTTP 429)", row["images"]
    assert row["identify_queries"] + sum(i["queries"] for i in row["images"]) <= 1500
    table = study.markdown([row], cfg)
    assert "| kserve/budget | twolayer | gausslegendre 15 fixed, float32, zeros baseline" in table
    assert "--budget-per-key 1500" in table and (tmp_path / "logs" / "kserve-twolayer-budget.log").exists()


def test_sigterm_to_a_study_stops_the_servers_it_started(trained, tmp_path):
    import signal
    import subprocess
    import time

    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f'''
        import sys, time
        from jaxrecover.cli import _terminate_as_exit
        from jaxrecover.services.process import ServeProcess
        _terminate_as_exit()  # what `jaxrecover study` and `jaxrecover audit` install
        with ServeProcess({str(trained)!r}, ["--steps", "15"], log={str(tmp_path / "serve.log")!r}) as s:
            print(s.proc.pid, flush=True)
            time.sleep(300)
    '''))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pgid = int(p.stdout.readline())  # the server is up once its pid is printed
        assert group_alive(pgid)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(pgid), f"the server outlived its parent; log {tmp_path / 'serve.log'}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
