"""A defended explanation endpoint for operators: this library's IG behind KServe's ``ModelServer``.

``jaxrecover serve CHECKPOINT --rule gausslegendre --steps 50 --fixed-steps --defence round:3`` serves
``/v1/models/NAME:explain`` (V1 protocol, Vertex AI's response fields) and ``:predict`` on 127.0.0.1. KServe
no longer ships an IG explainer, so a KServe endpoint explains with whatever its author writes: here, a
:class:`~jaxrecover.services.SimulatedIGService` wrapped in any stack of this library's defences
(:func:`build_service`), with per-API-key budgets answered by HTTP 429.

Request: ``{"instances": [x, ...], "parameters": {"targets": [t, ...], "steps": m}}`` (``x`` in the model's
NHWC layout; ``targets`` default to the predicted classes; ``steps`` is refused with HTTP 400 when the step
count is fixed). Response: ``{"explanations": [{"attributions": [{"featureAttributions": ...,
"instanceOutputValue": f(x), "baselineOutputValue": f(b), "approximationError": |sum - (f(x) - f(b))| /
|f(x) - f(b)|, "outputIndex": [t]}]}, ...]}``. KServe's server, its routes and its error handlers are used
as they are; only the model class and the 429 are written here (no library does a per-key IG budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import jax
import jax.numpy as jnp
import numpy as np

from ..explainers import RULES
from .base import IGService, QueryBudgetExceeded, StepCountRefused
from .defences import ClientBudget, GaussianNoise, LaplaceNoise, RandomSteps, RoundAnswers, TopK
from .simulated import SimulatedIGService

__all__ = ["ServeConfig", "build_service", "check_config", "parse_defence", "DEFENCE_SPECS", "make_kserve_model", "serve"]

DEFENCE_SPECS = {
    "round:DIGITS": "round each answer to DIGITS significant digits (or round:float16)",
    "noise:SCALE": "Gaussian noise, SCALE times each answer's largest magnitude",
    "laplace:SCALE": "Laplace noise, SCALE times each answer's largest magnitude",
    "topk:K": "only the K largest attributions of each answer, the rest 0",
    "randomsteps:LOW-HIGH": "every query gets a step count drawn from LOW..HIGH",
}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``jaxrecover serve`` serves: the IG settings, the defences (outermost last), the budgets."""

    rule: str = "gausslegendre"
    steps: int = 50
    fixed_steps: bool = True
    baseline: str = "zeros"
    dtype: str = "float32"
    defences: tuple[str, ...] = ()
    budget_per_key: int | None = None
    seed: int = 0


def parse_defence(spec: str, seed: int = 0):
    """The defence ``spec`` (one of :data:`DEFENCE_SPECS`) as ``inner -> wrapped service``; a clear error for a
    spec that is not one."""
    name, _, arg = str(spec).partition(":")
    try:
        if name == "round":
            digits = arg if arg == "float16" else int(arg)
            return lambda inner: RoundAnswers(inner, digits)
        if name in ("noise", "laplace"):
            scale = float(arg)
            cls = GaussianNoise if name == "noise" else LaplaceNoise
            return lambda inner: cls(inner, scale, seed=seed)
        if name == "topk":
            k = int(arg)
            return lambda inner: TopK(inner, k)
        if name == "randomsteps":
            lo, _, hi = arg.partition("-")
            lo, hi = int(lo), int(hi)
            return lambda inner: RandomSteps(inner, lo, hi, seed=seed)
    except ValueError as e:
        raise ValueError(f"bad defence {spec!r} ({e}); write one of: {', '.join(DEFENCE_SPECS)}") from None
    raise ValueError(f"unknown defence {spec!r}; write one of: {', '.join(DEFENCE_SPECS)}")


def check_config(cfg: ServeConfig) -> None:
    """A clear error for a config that cannot be served (rule, step count, baseline, defences, budget)."""
    from ..explainers import quadrature
    if cfg.rule not in RULES:
        raise ValueError(f"unknown rule {cfg.rule!r}; choose one of: {', '.join(RULES)}")
    quadrature(cfg.rule, cfg.steps)
    _baseline(cfg.baseline, (1,), cfg.dtype)
    for spec in cfg.defences:
        parse_defence(spec)
    if cfg.budget_per_key is not None and cfg.budget_per_key < 0:
        raise ValueError(f"--budget-per-key must be >= 0, got {cfg.budget_per_key}")


def _baseline(spec: str, shape, dtype):
    if spec == "zeros":
        return None
    try:
        return jnp.full(shape, float(spec), dtype)
    except ValueError:
        raise ValueError(f"baseline must be 'zeros' or a number (a constant image), got {spec!r}") from None


def build_service(model, params, input_shape, cfg: ServeConfig) -> IGService:
    """The served service: :class:`SimulatedIGService` with ``cfg``'s IG settings, then each defence."""
    check_config(cfg)
    from ..models import cast_variables
    params = cast_variables(params, cfg.dtype)
    svc: IGService = SimulatedIGService(model, params, rule=cfg.rule, steps=cfg.steps, fixed_steps=cfg.fixed_steps,
                                        baseline=_baseline(cfg.baseline, input_shape, cfg.dtype))
    for spec in cfg.defences:
        svc = parse_defence(spec, cfg.seed)(svc)
    return svc


def make_kserve_model(name: str, model, params, input_shape, cfg: ServeConfig):
    """A ``kserve.Model`` answering ``:predict`` (logits) and ``:explain`` (Vertex fields) with ``cfg``'s
    service; per-key budgets (``X-API-Key``; no key is the key ``""``) answer HTTP 429 once spent."""
    import kserve
    from fastapi import HTTPException

    from ..models import cast_variables
    from kserve.errors import InvalidInput

    service = build_service(model, params, input_shape, cfg)
    dtype = jnp.dtype(cfg.dtype)
    served_params = cast_variables(params, cfg.dtype)
    logits = jax.jit(model.batched)
    lock = threading.Lock()
    keys: dict[str, IGService] = {}

    def client(headers) -> IGService:
        key = (headers or {}).get("x-api-key", "")
        with lock:
            if key not in keys:
                keys[key] = service if cfg.budget_per_key is None else ClientBudget(service, cfg.budget_per_key)
            return keys[key]

    def inputs(payload) -> np.ndarray:
        try:
            x = np.asarray(payload["instances"], dtype)
        except (KeyError, TypeError, ValueError):
            raise InvalidInput("the body must be {\"instances\": [x, ...]} with x a nested list of numbers") from None
        if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
            raise InvalidInput(f"instances must have shape [N, {', '.join(map(str, input_shape))}] (NHWC), got "
                               f"{list(x.shape)}")
        return x

    class IGExplanationModel(kserve.Model):
        def __init__(self):
            super().__init__(name)
            self.ready = True

        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(self, payload: dict, headers: dict | None = None, response_headers=None) -> dict:
            x = inputs(payload)
            return {"predictions": np.asarray(logits(served_params, jnp.asarray(x)), np.float64).tolist()}

        async def explain(self, payload: dict, headers: dict | None = None) -> dict:
            x = inputs(payload)
            params = payload.get("parameters") or {}
            t = params.get("targets")
            if t is None:
                t = np.argmax(np.asarray(logits(served_params, jnp.asarray(x))), axis=-1)
            t = np.asarray(t, np.int64).reshape(-1)
            if t.shape[0] != x.shape[0]:
                raise InvalidInput(f"parameters.targets has {t.shape[0]} classes for {x.shape[0]} instances")
            steps = params.get("steps")
            svc = client(headers)
            try:
                a = np.asarray(svc(jnp.asarray(x), jnp.asarray(t), steps=None if steps is None else int(steps)),
                               np.float64)
                fx, fb = (np.asarray(v, np.float64) for v in svc.outputs(jnp.asarray(x), jnp.asarray(t)))
            except QueryBudgetExceeded as e:
                raise HTTPException(status_code=429, detail=f"budget: {e}") from None
            except StepCountRefused as e:
                raise InvalidInput(f"StepCountRefused: {e}") from None
            delta = fx - fb
            err = np.abs(a.reshape(len(a), -1).sum(1) - delta) / np.maximum(np.abs(delta), 1e-30)
            return {"explanations": [{"attributions": [{
                "featureAttributions": a[i].tolist(), "instanceOutputValue": float(fx[i]),
                "baselineOutputValue": float(fb[i]), "approximationError": float(err[i]),
                "outputIndex": [int(t[i])]}]} for i in range(len(a))]}

    return IGExplanationModel()


def serve(checkpoint: str, cfg: ServeConfig, *, name: str | None = None, host: str = "127.0.0.1",
          port: int = 8080) -> None:
    """Serve ``checkpoint`` (a ``train.py`` checkpoint folder) on ``host:port`` until interrupted (blocks)."""
    if cfg.dtype == "float64":  # this process serves only this model: float64 on for all of it
        jax.config.update("jax_enable_x64", True)
    from ..models import make_model
    from ..training import load_trained
    model_name, variables, _ = load_trained(checkpoint)
    model = make_model(model_name)
    kmodel = make_kserve_model(name or model_name, model, variables, model.input_shape, cfg)
    import kserve
    import kserve.model_server as ms

    class _HostRESTServer(ms.RESTServer):  # KServe's REST server listens on 0.0.0.0; an operator's may not
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.config.host = host

    ms.RESTServer = _HostRESTServer
    import asyncio
    asyncio.set_event_loop(asyncio.new_event_loop())  # KServe asks for the current loop; orbax's import unset it
    kserve.ModelServer(http_port=int(port), enable_grpc=False, workers=1).start([kmodel])


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument("checkpoint", help="a checkpoint folder written by train.py / jaxrecover train")
    p.add_argument("--name", default=None, help="the model's name in the URL (default: the checkpoint's model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    p.add_argument("--rule", default=d.rule, choices=sorted(RULES), help="quadrature rule (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="step count m (default: %(default)s)")
    p.add_argument("--free-steps", dest="fixed_steps", action="store_false",
                   help="let clients ask for any step count (default: fixed, requests for another m get HTTP 400)")
    p.add_argument("--baseline", default=d.baseline, help="'zeros' or a constant (default: %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"), help="(default: %(default)s)")
    p.add_argument("--defence", dest="defences", action="append", default=[], metavar="SPEC",
                   help="a defence, repeatable, innermost first (default: none): " + "; ".join(f"{k}: {v}"
                                                                               for k, v in DEFENCE_SPECS.items()))
    p.add_argument("--budget-per-key", type=int, default=None,
                   help="explanation queries per X-API-Key before HTTP 429 (default: no budget)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the noise defences (default: %(default)s)")


def config_from_args(a) -> ServeConfig:
    return ServeConfig(rule=a.rule, steps=a.steps, fixed_steps=a.fixed_steps, baseline=a.baseline, dtype=a.dtype,
                       defences=tuple(a.defences), budget_per_key=a.budget_per_key, seed=a.seed)
