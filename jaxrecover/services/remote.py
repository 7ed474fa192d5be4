"""IG services over HTTP: :class:`RemoteIGService` (an endpoint as an :class:`IGService`) and
:class:`IdentifiedService` (the attacker's view once :func:`jaxrecover.attacks.identify_service` has spoken).

Protocols (``protocol=``):

* ``"torchserve"``: ``POST {url}/explanations/{model}`` with one example per request (``{"data": x, "target":
  t}``; TorchServe's ``explain_handle`` reads the target of the FIRST row of a batch only, so concurrent requests
  are sent for one target at a time and TorchServe may batch them safely); ``POST {url}/predictions/{model}``
  answers what the handler's ``postprocess`` gives (raw logits, or ImageClassifier's top-5 ``{class: prob}``).
  No step count can be asked for: a request with ``steps`` is refused here (:class:`StepCountRefused`), which
  is what a fixed step count looks like to an attacker.
* ``"kserve"``: KServe's V1 protocol, ``POST {url}/v1/models/{model}:explain`` with ``{"instances": [...],
  "parameters": {"targets": [...], "steps": m}}`` and Vertex AI's response fields (``featureAttributions``,
  ``instanceOutputValue``, ``baselineOutputValue``, ``approximationError``, ``outputIndex``), as served by
  ``jaxrecover serve`` (:mod:`jaxrecover.services.endpoints`); ``:predict`` answers ``{"predictions": ...}``.

What the client knows is what the protocol exposes: the rule, the step count and the baseline are unknown
(``None``) until :meth:`RemoteIGService.identified` takes an :class:`~jaxrecover.attacks.Identification`.
The input layout (``"nhwc"``, this library's, or ``"nchw"``, PyTorch's) and the dtype of the numbers sent are
the caller's to say (TorchServe twins are NCHW).

Transport: httpx (one pooled client, thread-safe) with a thread pool for concurrency. httpx retries
connection failures only, so the loop here retries 5xx, 429 (``Retry-After`` honoured, capped) and connection
resets with exponential backoff, a bounded number of times. A query is counted once, when its answer is
accepted: a retried request is never counted twice, and a request that still fails after its retries raises
(:class:`RemoteServiceError`) with the count of answers already received; nothing is dropped silently. Every
answer is checked for shape, finiteness and, for a float32 service, that each JSON number is a float32 value
(a transport that rounds to fewer digits breaks every attack downstream; it is refused here, not averaged in).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import threading
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from .base import IGService, QueryBudgetExceeded, ServiceAnswerError, ServiceWrapper, StepCountRefused

__all__ = ["RemoteIGService", "IdentifiedService", "RemoteServiceError", "EndpointBudgetExceeded", "TransportStats",
           "PROTOCOLS"]

PROTOCOLS = ("torchserve", "kserve")
_RETRY_STATUS = (429, 500, 502, 503, 504)


class EndpointBudgetExceeded(QueryBudgetExceeded):
    """The endpoint itself refused: its per-client budget is spent (HTTP 429 saying so), not the attack's own."""


class RemoteServiceError(RuntimeError):
    """An endpoint that cannot be reached, refuses, or does not explain (one line: what and how to fix it)."""


@dataclasses.dataclass
class TransportStats:
    """What crossed the wire: requests sent (retries included), retries, bytes out and in, seconds waited."""

    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    predictions: int = 0
    seconds: float = 0.0


def _httpx():
    try:
        import httpx
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("RemoteIGService needs httpx: pip install 'jaxrecover[endpoints]' "
                          "(or bash scripts/setup.sh endpoints)") from e
    return httpx


class RemoteIGService(IGService):
    """An IG explanation endpoint over HTTP, as an :class:`IGService` (see the module docstring).

    Args:
      url: the server's base address, e.g. ``http://127.0.0.1:8080``.
      model: the model's name on the server.
      protocol: ``"torchserve"`` or ``"kserve"``.
      dtype: the dtype of the numbers the endpoint computes in (float32 for every deployed service); answers
        that are not values of it are refused.
      layout: ``"nhwc"`` (this library's) or ``"nchw"`` (a PyTorch model's); default: ``nchw`` for torchserve.
      api_key: sent as ``X-API-Key`` (per-key budgets of ``jaxrecover serve``).
      concurrency: requests in flight at once (TorchServe batches concurrent requests).
      per_request: examples per request (kserve; torchserve takes one).
      timeout: seconds per request; retries: attempts after the first on 5xx / 429 / connection errors;
      backoff: first retry delay in seconds (doubled each time, at most ``max_wait``).
      budget: a client-side query budget (None: none).
    """

    def __init__(self, url: str, model: str, *, protocol: str = "kserve", dtype=jnp.float32, layout: str | None = None,
                 api_key: str | None = None, concurrency: int = 4, per_request: int = 16, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 0.2, max_wait: float = 5.0, budget: int | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        layout = layout or ("nchw" if protocol == "torchserve" else "nhwc")
        if layout not in ("nhwc", "nchw"):
            raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
        for name, v, lo in (("concurrency", concurrency, 1), ("per_request", per_request, 1), ("retries", retries, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        httpx = _httpx()
        # unknown until identified (IGService's own validation needs a rule; nothing here is assumed)
        self.rule = None
        self.steps = None
        self.fixed_steps = None
        self.baseline = None
        self.dtype = jnp.dtype(dtype)
        self.output = "logit"
        self.budget = budget
        self.arithmetic = {}
        self.queries = 0
        self.evaluations = 0
        self.url = str(url).rstrip("/")
        self.model = model
        self.protocol = protocol
        self.layout = layout
        self.concurrency = int(concurrency)
        self.per_request = 1 if protocol == "torchserve" else int(per_request)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_wait = float(max_wait)
        self.stats = TransportStats()
        self._lock = threading.Lock()
        self._reported: collections.OrderedDict = collections.OrderedDict()  # (x, t) -> (f(x), f(b)), bounded
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["X-API-Key"] = api_key
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    transport=httpx.HTTPTransport(retries=1),
                                    limits=httpx.Limits(max_connections=self.concurrency))

    # ------------------------------------------------------------------ declared properties
    def describe(self) -> dict[str, Any]:
        return {"service": type(self).__name__, "url": self.url, "model": self.model, "protocol": self.protocol,
                "rule": None, "steps": None, "fixed_steps": None, "baseline": "unknown", "dtype": self.dtype.name,
                "output": self.output, "budget": self.budget, "queries": self.queries,
                "requests": self.stats.requests, "retries": self.stats.retries,
                "bytes": self.stats.bytes_sent + self.stats.bytes_received}

    def quadrature(self, steps=None):
        raise ValueError("a remote service's rule and step count are unknown; identify them first: "
                         "service.identified(jaxrecover.attacks.identify_service(service, x[0], target[0]))")

    def fixed_baseline(self, x):
        raise ValueError("a remote service's baseline is unknown; identify it first: "
                         "service.identified(jaxrecover.attacks.identify_service(service, x[0], target[0]))")

    baseline_for = fixed_baseline

    def identified(self, identification) -> IdentifiedService:
        """This endpoint as the attacker now sees it: rule, step policy, step count and baseline from
        ``identification`` (an :class:`~jaxrecover.attacks.Identification`); a clear error if it is unidentified."""
        return IdentifiedService(self, identification)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ transport
    def _post(self, path: str, body: dict) -> Any:
        httpx = _httpx()
        content = json.dumps(body).encode()
        url = f"{self.url}{path}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            t0 = time.perf_counter()
            try:
                r = self._client.post(url, content=content)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
                with self._lock:
                    self.stats.requests += 1
                    self.stats.bytes_sent += len(content)
                    self.stats.seconds += time.perf_counter() - t0
                if isinstance(e, httpx.ConnectError) and attempt == self.retries:
                    break
                time.sleep(min(self.max_wait, self.backoff * 2 ** attempt))
                continue
            with self._lock:
                self.stats.requests += 1
                self.stats.bytes_sent += len(content)
                self.stats.bytes_received += len(r.content)
                self.stats.seconds += time.perf_counter() - t0
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise ServiceAnswerError(f"{url} answered 200 with a body that is not JSON "
                                             f"({r.content[:80]!r}); the endpoint or a proxy is broken") from None
            msg = _error_text(r)
            if r.status_code == 429 and "budget" in msg.lower():
                raise EndpointBudgetExceeded(f"{url} refused: {msg} (HTTP 429; {self.queries} answers received so "
                                             "far stay valid)")
            if r.status_code in _RETRY_STATUS:
                last = f"HTTP {r.status_code}: {msg}"
                wait = self.backoff * 2 ** attempt
                if r.status_code == 429 and r.headers.get("retry-after", "").isdigit():
                    wait = float(r.headers["retry-after"])
                time.sleep(min(self.max_wait, wait))
                continue
            if r.status_code == 400 and ("StepCountRefused" in msg or "fixes the step count" in msg):
                raise StepCountRefused(f"{url}: {msg}")
            if r.status_code == 404:
                raise RemoteServiceError(f"{url} answers 404 ({msg}): no model {self.model!r} there, or the endpoint "
                                         f"does not explain; check the model name and --protocol ({self.protocol})")
            raise RemoteServiceError(f"{url} refused the request with HTTP {r.status_code}: {msg}")
        raise RemoteServiceError(f"{url} did not answer after {self.retries + 1} attempts ({last}); is the server "
                                 f"running and reachable? ({self.queries} answers received so far stay valid)")

    def _to_wire(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, -1, 1) if self.layout == "nchw" and x.ndim == 4 else x

    def _from_wire(self, a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, 1, -1) if self.layout == "nchw" and a.ndim == 4 else a

    def _values(self, values, shape, what: str) -> np.ndarray:
        try:
            a = np.asarray(values, np.float64)
        except (TypeError, ValueError):
            raise ServiceAnswerError(f"{self.url} sent {what} that are not an array of numbers") from None
        if a.shape != tuple(shape):
            raise ServiceAnswerError(f"{self.url} sent {what} of shape {a.shape} for a request of shape "
                                     f"{tuple(shape)}; check --protocol and the input layout ({self.layout})")
        if not np.isfinite(a).all():
            raise ServiceAnswerError(f"{self.url} sent {int((~np.isfinite(a)).sum())} NaN/inf value(s) in its {what}")
        if self.dtype != jnp.float64 and not np.array_equal(a.astype(self.dtype).astype(np.float64), a):
            raise ServiceAnswerError(f"{self.url} sent {what} that are not {self.dtype.name} values (rounded in "
                                     "transit, or the endpoint computes in another dtype: pass dtype=...)")
        return a

    def _explain_chunk(self, xs: np.ndarray, ts: np.ndarray, steps: int | None) -> np.ndarray:
        wire = self._to_wire(xs)
        if self.protocol == "torchserve":
            body = {"data": wire[0].tolist(), "target": int(ts[0])}
            out = self._post(f"/explanations/{self.model}", body)
            # the handler's ``attribute(...).tolist()`` of a batch, split per request: one example's answer
            return self._from_wire(self._values(out, wire.shape[1:], "attributions")[None])
        params: dict[str, Any] = {"targets": [int(t) for t in ts]}
        if steps is not None:
            params["steps"] = int(steps)
        out = self._post(f"/v1/models/{self.model}:explain", {"instances": wire.tolist(), "parameters": params})
        try:
            attrs = [e["attributions"][0]["featureAttributions"] for e in out["explanations"]]
        except (KeyError, IndexError, TypeError):
            raise ServiceAnswerError(f"{self.url} answered without explanations[].attributions[].featureAttributions "
                                     "(not a Vertex-style explanation); check --protocol") from None
        self._remember_outputs(xs, ts, out["explanations"])
        return self._from_wire(self._values(attrs, wire.shape, "attributions"))

    def _remember_outputs(self, xs, ts, explanations) -> None:
        """Keep the ``instanceOutputValue`` / ``baselineOutputValue`` the endpoint reported (Vertex fields)."""
        with self._lock:
            for xi, ti, e in zip(xs, ts, explanations):
                a = e["attributions"][0]
                if "instanceOutputValue" in a and "baselineOutputValue" in a:
                    self._reported[(xi.tobytes(), int(ti))] = (float(a["instanceOutputValue"]),
                                                              float(a["baselineOutputValue"]))
            while len(self._reported) > _REPORTED_MAX:
                self._reported.popitem(last=False)

    def outputs(self, x, target):
        """``(f(x), f(baseline))`` as the endpoint reported them with its explanations (KServe / Vertex fields).
        Values of an (x, target) explained before are free; others cost one explanation query each."""
        if self.protocol != "kserve":
            raise NotImplementedError(f"the {self.protocol} protocol reports no output values with its explanations")
        x = np.asarray(x, self.dtype)
        target = np.broadcast_to(np.asarray(target).reshape(-1), (x.shape[0],))
        missing = [i for i in range(x.shape[0]) if (x[i].tobytes(), int(target[i])) not in self._reported]
        if missing:
            self(x[missing], target[missing])
        try:
            vals = np.asarray([self._reported[(x[i].tobytes(), int(target[i]))] for i in range(x.shape[0])])
        except KeyError:
            raise ServiceAnswerError(f"{self.url} reports no instanceOutputValue / baselineOutputValue with its "
                                     "explanations; attacks that read output values do not apply") from None
        return jnp.asarray(vals[:, 0], self.dtype), jnp.asarray(vals[:, 1], self.dtype)

    def __call__(self, x, target, *, steps: int | None = None):
        """IG answers ``[N, ...]`` from the endpoint (its own rule and step count unless ``steps`` is given and
        the protocol can ask for it)."""
        x = np.asarray(x)
        if np.dtype(x.dtype) != np.dtype(self.dtype):
            raise TypeError(f"this endpoint is declared {self.dtype}, got {x.dtype} inputs; cast x")
        target = np.asarray(target).reshape(-1)
        n = int(x.shape[0]) if x.ndim else 0
        if target.shape[0] != n:
            raise ValueError(f"x has {n} examples but target has {target.shape[0]}")
        if steps is not None and self.protocol == "torchserve":
            raise StepCountRefused(f"{self.url}: the TorchServe protocol has no step-count parameter (the handler "
                                   "fixes the step count); use a plan that keeps the service's own m")
        self.check_budget(n)
        out = np.zeros(x.shape, np.float64)
        # one target at a time in flight (TorchServe explains a batch with its first row's target)
        order = [np.flatnonzero(target == t) for t in np.unique(target)] if self.protocol == "torchserve" \
            else [np.arange(n)]
        for idx in order:
            chunks = [idx[i:i + self.per_request] for i in range(0, idx.size, self.per_request)]
            with cf.ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(chunks)))) as pool:
                futs = {pool.submit(self._explain_chunk, x[c], target[c], steps): c for c in chunks}
                try:
                    for f in cf.as_completed(futs):
                        out[futs[f]] = f.result()
                        self.queries += int(futs[f].size)
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        return jnp.asarray(out, self.dtype)

    def predict(self, x) -> list:
        """What the endpoint's prediction route reports for ``x[N, ...]``: raw logits ``[N, C]`` as an array, a
        list of ``{class: probability}`` for a top-k handler, or labels ``[N]`` (int64) for a label-only one.
        Counted in ``stats.predictions``."""
        x = np.asarray(x, self.dtype)
        wire = self._to_wire(x)
        res = []
        if self.protocol == "torchserve":
            for row in wire:
                res.append(self._post(f"/predictions/{self.model}", {"data": row.tolist()}))
        else:
            out = self._post(f"/v1/models/{self.model}:predict", {"instances": wire.tolist()})
            res = list(out.get("predictions", [])) if isinstance(out, dict) else []
        if len(res) != x.shape[0]:
            raise ServiceAnswerError(f"{self.url} answered {len(res)} predictions for {x.shape[0]} inputs")
        with self._lock:
            self.stats.predictions += x.shape[0]
        if all(isinstance(r, dict) for r in res):
            return res
        if all(isinstance(r, int) and not isinstance(r, bool) for r in res):
            return np.asarray(res, np.int64)
        return self._values(res, (x.shape[0], np.shape(res)[1]), "predictions")


_REPORTED_MAX = 65536  # output values kept for outputs() (two floats each)


def _error_text(r) -> str:
    try:
        body = r.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("message") or body.get("detail") or body)[:300]
        return str(body)[:300]
    except ValueError:
        return r.text[:300].strip() or r.reason_phrase


class IdentifiedService(ServiceWrapper):
    """A service as the attacker sees it after :func:`~jaxrecover.attacks.identify_service`: its rule, step
    policy, step count and baseline are the identified ones, answers stay the inner service's.

    With a fixed step count, requests for the identified ``m`` (or for none) go out without a step count.
    """

    def __init__(self, inner: IGService, identification):
        if not getattr(identification, "identified", False):
            raise ValueError(f"the service was not identified ({getattr(identification, 'note', identification)}); "
                             "attacks need its rule and step count: give identify_service more queries or another x")
        super().__init__(inner)
        steps = int(identification.steps) if identification.steps is not None else 50
        self.__dict__.update(rule=identification.rule, steps=steps, fixed_steps=bool(identification.fixed_steps),
                             baseline=(None if identification.baseline is None
                                       else jnp.asarray(identification.baseline, inner.dtype)),
                             identification=identification)

    def describe(self):
        d = super().describe()
        d.update(rule=self.rule, steps=self.steps, fixed_steps=self.fixed_steps, identified=True,
                 baseline="zeros" if self.baseline is None or not np.any(self.baseline) else "array")
        return d

    def quadrature(self, steps=None):
        return IGService.quadrature(self, steps)

    def baseline_for(self, x):
        return IGService.baseline_for(self, x)

    def fixed_baseline(self, x):
        return IGService.baseline_for(self, x)

    def check_steps(self, steps_list, what: str = "request") -> None:
        IGService.check_steps(self, steps_list, what)

    def __call__(self, x, target, *, steps: int | None = None):
        if self.fixed_steps:
            self.check_steps([self.steps if steps is None else steps])
            return self.inner(x, target)
        return self.inner(x, target, steps=self.steps if steps is None else steps)
