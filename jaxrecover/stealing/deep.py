"""Exact extraction of deep fully connected ReLU nets ``f = W_{L+1} relu(W_L ... relu(W_1 x + b_1) ...) + b_{L+1}``.

The service's answers give the Vanilla Gradient exactly (the library's best plan), and it reports ``f(x)``.
The net is read layer by layer, each layer in the region ``R_l`` of inputs where EVERY unit of the layers
below is active. There the layers below are one affine map ``h_{l-1} = P x + c`` (known: they were
extracted first), so each unit of layer ``l`` is a flat hyperplane ``w . (P x + c) + beta = 0`` in ``R_l``
(deeper units bend at layer ``l``'s hyperplanes; in ``R_l`` layer ``l`` behaves like a first layer):

1. Crossings: segments between points of ``R_l`` (vertices of a box cut by ``R_l``'s inequalities, found by
   scipy's HiGHS linear programme), and rays along which a few coordinates of ``h`` grow (they cross units that
   are active on a small part of ``R_l`` only, which segments between vertices seldom cross), are searched
   exactly for the points where one class's gradient changes (:func:`jaxrecover.stealing.lines.search_line`).
   Layer 1 uses long lines through the attacker's data instead (``R_1`` is the whole space, and a long line
   crosses every first-layer hyperplane).
2. Each crossing's gradient jump is ``u (w P)`` for the unit's ``w`` (in the coordinates of the layer below,
   which the extraction itself defines): ``w`` is the least-squares solution of ``P^T w = jump``, normalised,
   and ``beta = -w . h(x*)``. A crossing of a deeper unit gives the local affine form of that unit instead,
   valid only in one cell of layer ``l``'s arrangement, so every candidate is **verified**: at four other points
   of ``R_l`` on its hyperplane the gradient must jump, parallel to ``w P``. A deeper unit's local plane has no
   jump at some of them and is rejected.
3. Orientation (a crossing cannot tell ``(w, beta)`` from ``(-w, -beta)``): at points ``p`` of ``R_l`` the
   all-class gradient is ``G = C B`` with ``B = [w_j P]`` (full row rank while layer ``l`` is no wider than the
   one below) and ``C[:, j] = 0`` exactly when unit ``j`` is inactive at ``p``; the side on which ``C[:, j]`` is
   non-zero is the active side. The residual ``|G - C B|`` is 0 only when no active unit is missing: it is the
   layer's completeness test (at vertices and at the attacker's images lifted into ``R_l``); while it is not 0,
   segments from points it explains to points it does not cross the missing unit; after it passes, the search
   sweeps on for ``4 stale`` segments.
4. The last hidden layer is the one whose ``C[:, j]`` is the same at every point where unit ``j`` is active
   (``C`` is then the output matrix); the output bias comes from the reported values. Otherwise the layer is
   kept and the next one is read. From the third hidden layer on, and wherever ``R_l`` is empty, the layer is
   first read as the LAST one from fixed-pattern regions (the cell of a random point, or one built unit by unit
   by the programme): no deeper unit crosses there, so every crossing is a unit of the layer, read on the
   units active below it; its weights are merged across regions and completed coordinate by coordinate, its
   output column is the all-class jump, and which units are flipped is a least-squares fit of the gradients at
   48 check points (the attacker's images, points near them, region points), which is also the completeness
   test. A final consistency check asks 32 of the attacker's images.

The result is canonical (:func:`canonical_mlp`: each unit scaled to a unit incoming weight vector, the scale
moved to the next layer; units sorted by a fixed random projection). Where this cannot work, and says so
(``complete=False`` and the reason in ``message``): a layer wider than the one below it (``B`` loses rank), a
middle layer where no input activates every unit below at once, and last-layer weights for which no crossing
was found. Units whose hyperplane misses ``R_l`` (dead, or always active on it) are not found; the consistency
checks say whether they matter where they look. Written by hand: no library extracts networks from gradient
queries; scipy's linear programme finds the regions' points.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linprog
from tqdm.auto import tqdm

from ..services import QueryBudgetExceeded
from .lines import prepare, search_line

__all__ = ["extract_mlp", "MLPExtraction", "MLPExtractionIncomplete", "canonical_mlp", "mlp_logits", "mlp_gradients",
           "mlp_fidelity", "mlp_params"]


# ---------------------------------------------------------------------------------------------- nets as arrays
def _as_lists(params):
    Ws = [np.asarray(W, np.float64) for W in params["W"]]
    bs = [np.asarray(b, np.float64) for b in params["b"]]
    if len(Ws) != len(bs) or len(Ws) < 1:
        raise ValueError(f"expected params {{'W': [...], 'b': [...]}} of equal length >= 1, got {len(Ws)}, {len(bs)}")
    for i, (W, b) in enumerate(zip(Ws, bs)):
        if W.ndim != 2 or b.shape != (W.shape[0],) or (i and W.shape[1] != Ws[i - 1].shape[0]):
            raise ValueError(f"layer {i + 1}: weights {W.shape} and bias {b.shape} do not chain "
                             f"(expected W [out, in], b [out])")
    return Ws, bs


def mlp_logits(params: dict, x) -> np.ndarray:
    """Logits ``[N, K]`` of ``params = {"W": [W_1, ..., W_{L+1}], "b": [b_1, ..., b_{L+1}]}`` (``W_l [out, in]``)
    for inputs ``x[N, ...]`` (numpy, float64; ReLU after every layer but the last)."""
    Ws, bs = _as_lists(params)
    h = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    for W, b in zip(Ws[:-1], bs[:-1]):
        h = np.maximum(h @ W.T + b, 0.0)
    return h @ Ws[-1].T + bs[-1]


def mlp_gradients(params: dict, x) -> np.ndarray:
    """All-class input gradients ``[N, K, d]`` of :func:`mlp_logits` at ``x[N, d]`` (float64)."""
    Ws, bs = _as_lists(params)
    h = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    jac = np.broadcast_to(np.eye(h.shape[1]), (h.shape[0], h.shape[1], h.shape[1]))
    for W, b in zip(Ws[:-1], bs[:-1]):
        z = h @ W.T + b
        jac = (z > 0)[:, :, None] * np.einsum("oi,nid->nod", W, jac)
        h = np.maximum(z, 0.0)
    return np.einsum("ki,nid->nkd", Ws[-1], jac)


def canonical_mlp(params: dict, seed: int = 0) -> dict:
    """The canonical form of a fully connected ReLU net under its symmetries.

    Layer by layer, each hidden unit is scaled to a unit incoming weight vector (in the canonical
    coordinates of the layer below; its bias with it, its outgoing weights by the inverse factor:
    ``relu(c z) = c relu(z)`` for ``c > 0``); units with zero outgoing weights are dropped, units with zero
    incoming weights are folded into the next layer's bias as the constants they are; units are sorted by a
    fixed random projection of ``(w, beta)``. Two nets computing the same function (no unit with an empty
    hyperplane) have the same canonical form up to round-off.
    """
    Ws, bs = _as_lists(params)
    rng = np.random.default_rng(seed)
    for l in range(len(Ws) - 1):
        W, b, nxt = Ws[l], bs[l], Ws[l + 1]
        norm = np.linalg.norm(W, axis=1)
        const = norm == 0
        bs[l + 1] = bs[l + 1] + nxt[:, const] @ np.maximum(b[const], 0.0)
        keep = ~const & (np.abs(nxt).max(axis=0) > 0)
        W, b, nxt = W[keep] / norm[keep, None], b[keep] / norm[keep], nxt[:, keep] * norm[keep]
        r = rng.standard_normal(W.shape[1] + 1)
        order = np.argsort(W @ r[:-1] + b * r[-1])
        Ws[l], bs[l], Ws[l + 1] = W[order], b[order], nxt[:, order]
    return {"W": Ws, "b": bs}


def mlp_fidelity(params: dict, reference, x) -> float:
    """``max |logit difference| / max |logit|`` of ``params`` against ``reference`` (params of the same form, or
    a function ``x -> logits``) over the inputs ``x``."""
    ref = np.asarray(reference(x) if callable(reference) else mlp_logits(reference, x), np.float64)
    return float(np.max(np.abs(mlp_logits(params, x) - ref)) / np.max(np.abs(ref)))


def mlp_params(variables) -> dict:
    """``{"W": [...], "b": [...]}`` (float64, ``W [out, in]``) of Flax variables whose ``params`` are Dense layers
    ``Dense_0, Dense_1, ...`` (:class:`jaxrecover.models.nets.MLP`, TwoLayerNet); missing biases are zeros."""
    p = variables["params"]
    names = sorted((k for k in p if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    if not names:
        raise ValueError(f"no Dense_<i> layers in these variables (found {sorted(p)}); mlp_params reads MLPs only")
    Ws = [np.asarray(p[n]["kernel"], np.float64).T for n in names]
    bs = [np.asarray(p[n]["bias"], np.float64) if "bias" in p[n] else np.zeros(W.shape[0]) for n, W in zip(names, Ws)]
    return {"W": Ws, "b": bs}


# ---------------------------------------------------------------------------------------------- the result
@dataclasses.dataclass
class MLPExtraction:
    """What :func:`extract_mlp` found and spent.

    Attributes:
      params: the extracted net in canonical form (:func:`canonical_mlp`), ``{"W": [...], "b": [...]}`` float64;
        :func:`mlp_logits` runs it.
      widths: hidden units found per layer.
      dead: per hidden layer, indices (into ``params``) of units inactive on every row of the attacker's data.
      queries, evaluations: IG queries spent and gradient evaluations the service spent.
      segments: lines (layer 1) or segments (deeper layers) searched, per layer.
      plan: the plan that turned answers into gradients.
      rejected: candidate hyperplanes that failed verification (local pieces of deeper units).
      consistency: max relative error of the model on the all-class gradients and outputs asked at the
        attacker's data and the layers' test points (round-off when complete).
      complete: every layer passed its completeness test and the model reproduces the answers.
      message: what stopped the extraction.
    """

    params: dict
    widths: list[int]
    dead: list[list[int]]
    queries: int
    evaluations: int
    segments: list[int]
    plan: str
    rejected: int
    consistency: float
    complete: bool
    message: str

    def logits(self, x) -> np.ndarray:
        """The extracted net's logits ``[N, K]`` (float64)."""
        return mlp_logits(self.params, x)


class MLPExtractionIncomplete(QueryBudgetExceeded):
    """The service's query budget ran out during :func:`extract_mlp`; ``.partial`` is the :class:`MLPExtraction`
    of the layers read so far (``complete=False``; ``params`` is ``None`` until an output layer is read)."""

    def __init__(self, message: str, partial: MLPExtraction):
        super().__init__(message)
        self.partial = partial


class _Infeasible(Exception):
    pass


# ---------------------------------------------------------------------------------------------- the region R_l
class _Region:
    """Inputs where every unit of the layers read so far is active: ``A x + a > 0``; there ``h = P x + c``.

    With ``signs`` (one array per layer read, +1 or -1 per unit), the units with sign -1 are inactive instead
    (a fixed-pattern region: ``h`` is 0 on them)."""

    def __init__(self, Ws, bs, d, box, margin, rng, signs=None):
        signs = [np.ones(len(b)) for b in bs] if signs is None else [np.asarray(s, np.float64) for s in signs]
        A, c, rows, offs = np.eye(d), np.zeros(d), [], []
        for W, b, sg in zip(Ws, bs, signs):
            A, c = W @ A, W @ c + b
            rows.append(A * sg[:, None])
            offs.append(c * sg)
            A, c = A * (sg > 0)[:, None], c * (sg > 0)
        self.signs = signs[-1] if signs else None
        self.Ws, self.bs = list(Ws), list(bs)
        self.P, self.c = A, c
        self.A = np.concatenate(rows) if rows else np.zeros((0, d))
        self.a = np.concatenate(offs) if offs else np.zeros(0)
        self.d, self.box, self.rng = d, box, rng
        self.margin = margin * np.maximum(np.linalg.norm(self.A, axis=1), 1e-300)
        self._pool = None

    def h(self, x):
        return np.asarray(x) @ self.P.T + self.c

    def h_true(self, x):
        """``h`` at ``x [N, d]`` through the layers read (ReLU, wherever ``x`` is)."""
        h = np.asarray(x, np.float64)
        for W, b in zip(self.Ws, self.bs):
            h = np.maximum(h @ W.T + b, 0.0)
        return h

    def point(self, plane=None, side=1.0):
        """A vertex of the box cut by the region (a random objective), optionally on one side of ``plane = (n, n0)``
        (``side * (n . x + n0) >= margin |n|``); None when there is none."""
        A, a, m = self.A, self.a, self.margin
        if plane is not None:
            n, n0 = plane
            A, a, m = np.vstack([A, side * n]), np.append(a, side * n0), np.append(m, self.margin_of(n))
        r = self.rng.standard_normal(self.d)
        if not len(a):
            return self.box * np.sign(r)
        res = linprog(-r, A_ub=-A, b_ub=a - m, bounds=(-self.box, self.box), method="highs")
        return res.x if res.status == 0 else None

    def lift(self, x, count):
        """Up to ``count`` of the points ``x [N, d]`` moved into the region with (about) the same ``h``: the units
        below that are off there are switched on just barely, so the units of this layer see what they see at
        the attacker's images (a unit active only near the data shows up in the completeness test)."""
        x = x[self.rng.choice(len(x), min(count, len(x)), replace=False)]
        h = self.h_true(x)
        y = np.maximum(h, 1e-3 * max(float(np.max(h)), 1e-12))
        Pp = np.linalg.pinv(self.P)
        out = (y - self.c) @ Pp.T + x - (x @ self.P.T) @ Pp.T
        inside = np.all(out @ self.A.T + self.a >= self.margin, axis=1) if len(self.a) else np.ones(len(out), bool)
        return out[inside]

    def ray(self, starts):
        """A ray from one of ``starts`` (points of the region) along which ``h`` grows in a few random coordinates
        (``h(p + t v) = h(p) + t u``, ``u >= 0`` sparse): it crosses every unit of the next layer whose weights on
        those coordinates outweigh its value at ``p`` with the other sign, also units active on a small part of
        the region only (random segments between vertices seldom cross those). Clipped to the region."""
        p = starts[self.rng.integers(len(starts))]
        u = np.zeros(self.P.shape[0])
        idx = self.rng.choice(len(u), min(3, len(u)), replace=False)
        u[idx] = self.rng.uniform(0.5, 1.0, len(idx))
        v = np.linalg.pinv(self.P) @ u
        hp = self.h(p[None])[0]
        t_max = 100.0 * (1.0 + float(np.max(np.abs(hp)))) / float(np.max(u))
        if len(self.a):
            Av, slack = self.A @ v, self.A @ p + self.a - self.margin
            neg = Av < 0
            if neg.any():
                t_max = min(t_max, float(np.min(slack[neg] / -Av[neg])))
        return p, v, max(t_max, 1e-9)

    def extreme(self, n, side):
        """The vertex of the region and box where ``side * n . x`` is largest (None if there is none)."""
        if not len(self.a):
            return self.box * np.sign(side * n + 1e-300)
        res = linprog(-side * n, A_ub=-self.A, b_ub=self.a - self.margin, bounds=(-self.box, self.box),
                      method="highs")
        return res.x if res.status == 0 else None

    def vertices(self, plane, side, count):
        """``count`` vertices on one side of ``plane`` (from a pool of vertices, refilled by the programme)."""
        n, n0 = plane
        if self._pool is None:
            self._pool = np.stack([self.point() for _ in range(64)])
        s = side * (self._pool @ n + n0)
        ok = self._pool[s >= self.margin_of(n)]
        if len(ok) >= count:
            return ok[self.rng.choice(len(ok), count, replace=False)]
        more = [self.point(plane, side) for _ in range(count - len(ok))]
        if any(m is None for m in more):
            return None
        return np.concatenate([ok, np.stack(more)]) if len(ok) else np.stack(more)

    def margin_of(self, n):
        return float(self.margin[0] / max(np.linalg.norm(self.A[0]), 1e-300) * np.linalg.norm(n)) if len(self.A) \
            else 1e-3 * self.box * float(np.linalg.norm(n))


# ---------------------------------------------------------------------------------------------- one layer
class _Layer:
    """The units of one layer found so far, in the coordinates ``h`` of the layer below."""

    def __init__(self, region):
        self.region = region
        self.W = np.zeros((0, region.P.shape[0]))
        self.b = np.zeros(0)

    def normals(self):
        return self.W @ self.region.P  # each unit's hyperplane normal in input space

    def known(self, x, jump, tol):
        if not len(self.b):
            return False
        n = self.normals()
        s = self.W @ self.region.h(x) + self.b
        cos = np.abs(n @ jump) / (np.linalg.norm(n, axis=1) * np.linalg.norm(jump))
        return bool(np.any((cos > 1 - tol["match"]) & (np.abs(s) < tol["match"] * (1 + np.linalg.norm(self.region.h(x))))))

    def candidate(self, x, jump, tol):
        """``(w, beta)`` of a crossing at ``x`` with gradient jump ``jump``; None if the jump is not ``u w P``."""
        P = self.region.P
        w, *_ = np.linalg.lstsq(P.T, jump, rcond=None)
        if np.linalg.norm(P.T @ w - jump) > tol["rank"] * np.linalg.norm(jump) or not np.any(w):
            return None
        w = w / np.linalg.norm(w)
        return w, -float(w @ self.region.h(x))


def _plane(region, w, beta):
    return w @ region.P, float(w @ region.c + beta)  # s(x) = n . x + n0 in input space


def _verify(oracle, region, w, beta, k, classes, tol, delta, tests=4):
    """Whether the gradient jumps, parallel to ``w P``, at ``tests`` other points of the region on ``(w, beta)``.

    Half the points lie between a central point of one side (a random convex combination of four vertices there) and a vertex of
    the other, half the other way round: a deeper unit's local plane (valid in one cell of this layer's
    arrangement, central or far out) has no jump at some of them."""
    n, n0 = _plane(region, w, beta)
    nu = n / np.linalg.norm(n)
    for i in range(tests):
        side = 1.0 if i % 2 == 0 else -1.0
        near = region.vertices((n, n0), side, 4)
        far = region.vertices((n, n0), -side, 1)
        if near is None or far is None:
            return False
        a, b = region.rng.dirichlet(np.ones(4)) @ near, far[0]
        sa, sb = n @ a + n0, n @ b + n0
        x0 = a + sa / (sa - sb) * (b - a)
        step = delta * (1.0 + np.linalg.norm(x0))
        seen = False
        for c in range(min(classes, 3)):
            g, _, _ = oracle(np.stack([x0 - step * nu, x0 + step * nu]), (k + c) % classes)
            jump = g[1] - g[0]
            if np.linalg.norm(jump) <= tol["grad"] * max(np.linalg.norm(g[0]), np.linalg.norm(g[1]), 1e-300):
                continue
            if abs(jump @ nu) < (1 - tol["match"]) * np.linalg.norm(jump):
                return False
            seen = True
            break
        if not seen:
            return False
    return True


def _prune(oracle, layer, classes, tol, delta):
    """Re-verify (with 12 more points each) the units whose normals depend on the others' (a deeper unit's local
    plane is a combination of this layer's planes), drop those that fail; returns how many were dropped."""
    dropped = 0
    B = layer.normals()
    if np.linalg.matrix_rank(B) == len(B):
        return 0
    full = np.linalg.matrix_rank(B)
    for j in reversed(range(len(layer.b))):
        rest = np.delete(layer.normals(), j, axis=0)
        if len(rest) and np.linalg.matrix_rank(rest) < full:
            continue  # independent of the others: not a combination of them
        if not _verify(oracle, layer.region, layer.W[j], layer.b[j], j % classes, classes, tol, delta, tests=12):
            layer.W, layer.b = np.delete(layer.W, j, axis=0), np.delete(layer.b, j)
            dropped += 1
    return dropped


def _targets(oracle, layer, pts, G, classes, tol, cache):
    """Segments from test points whose gradients the units found explain to points where they do not: each
    crosses a missing unit's hyperplane (a rarely crossed unit that random segments keep missing). Adds test
    points (vertices, and random convex combinations of four) while every point is unexplained."""
    region = layer.region
    for round_ in range(7):
        res = np.array([_decompose(layer, g[None])[1] for g in G])
        bad, good = pts[res > tol["check"]], pts[res <= tol["check"]]
        if len(good) and len(bad):
            n = min(len(bad), len(good), 4)
            pick = region.rng.permutation(len(bad))[:n], region.rng.permutation(len(good))[:n]
            return pts, G, [(bad[i], good[j]) for i, j in zip(*pick)]
        if round_ == 6:
            break
        # a unit active at most vertices is crossed by few segments: more vertices (and a few central points)
        extra = np.stack([region.point() for _ in range(6)] +
                         [region.rng.dirichlet(np.ones(4)) @ np.stack([region.point() for _ in range(4)])
                          for _ in range(2)])
        G2, _ = _all_class(oracle, extra, classes, cache)
        pts, G = np.vstack([pts, extra]), np.concatenate([G, G2])
    return pts, G, []


def _all_class(oracle, z, classes, cache):
    z = np.atleast_2d(z)
    g, f, _ = oracle(np.repeat(z, classes, axis=0), np.tile(np.arange(classes), len(z)))
    G, F = g.reshape(len(z), classes, -1), f.reshape(len(z), classes)
    cache.extend(zip(z, G, F))
    return G, F


def _decompose(layer, G):
    """``C [N, K, n]`` with ``G = C B`` (``B = W P``), and the relative residual."""
    B = layer.normals()
    N, K, d = G.shape
    C, *_ = np.linalg.lstsq(B.T, G.reshape(N * K, d).T, rcond=None)
    C = C.T.reshape(N, K, -1)
    res = np.linalg.norm(G - C @ B) / max(np.linalg.norm(G), 1e-300)
    return C, float(res)


def _orient(oracle, layer, pts, G, classes, tol, cache):
    """Flip each unit of ``layer`` to its active side; returns (points, gradients, values-free C, residual)."""
    region = layer.region
    for _ in range(3):
        C, res = _decompose(layer, G)
        S = region.h(pts) @ layer.W.T + layer.b  # [N, n]
        col = np.linalg.norm(C, axis=1)  # [N, n]
        on = col > tol["side"] * max(float(col.max()), 1e-300)
        undecided = []
        for j in range(len(layer.b)):
            votes = np.sign(S[on[:, j], j])
            if len(votes):
                if np.any(votes != votes[0]):
                    raise _Infeasible(f"unit {j}: active on both sides of its hyperplane (the layer is not what "
                                      "the decomposition assumes)")
                sigma = votes[0]
            else:
                off = np.sign(S[:, j])
                if np.all(off == off[0]) and len(off):
                    undecided.append(j)  # inactive where it was asked, but only asked on one side
                    continue
                raise _Infeasible(f"unit {j}: its output weights are 0 on both sides of its hyperplane")
            if sigma < 0:
                layer.W[j], layer.b[j] = -layer.W[j], -layer.b[j]
        if not undecided:
            return pts, G, res
        extra = []
        for j in undecided:  # a point on the side not asked yet
            plane = _plane(region, layer.W[j], layer.b[j])
            p = region.point(plane, -np.sign(S[0, j]))
            if p is not None:
                extra.append(p)
        if not extra:
            break
        G2, _ = _all_class(oracle, np.stack(extra), classes, cache)
        pts, G = np.vstack([pts, extra]), np.concatenate([G, G2])
    raise _Infeasible("some units were never seen active (their hyperplanes bound no reachable active side)")


# ---------------------------------------------------------------------------------------------- the last layer
def _sampled_region(Ws, bs, flat, box, rng, force=None):
    """The fixed-pattern region of a random point (one of the attacker's images moved by a random step of up to
    three times the data's scale): among 16 such points, one of those with the most active units in the last
    layer read (and unit ``force`` active); None when no point qualifies or its region has no room."""
    d = flat.shape[1]
    scale = float(np.max(np.linalg.norm(flat, axis=1)))
    v = rng.standard_normal((16, d))
    x = flat[rng.integers(len(flat), size=16)] + rng.uniform(0, 3, (16, 1)) * scale * v / np.linalg.norm(v, axis=1,
                                                                                                         keepdims=True)
    pats = []
    for xi in x:
        h, sg = xi, []
        for W, b in zip(Ws, bs):
            z = W @ h + b
            sg.append(np.where(z > 0, 1.0, -1.0))
            h = np.maximum(z, 0.0)
        pats.append(sg)
    ok = [i for i, sg in enumerate(pats) if force is None or sg[-1][force] > 0]
    if not ok:
        return None
    size = np.array([np.sum(pats[i][-1] > 0) for i in ok])
    i = ok[int(rng.choice(np.flatnonzero(size >= np.median(size))))]
    region = _Region(Ws, bs, d, box, 1e-6, rng, signs=pats[i])
    S = region.signs > 0
    sv = np.linalg.svd(region.P[S], compute_uv=False)
    if not len(sv) or sv[-1] < 1e-6 * sv[0] or region.point() is None:
        return None
    return region


def _pattern_region(Ws, bs, d, box, rng, force=None):
    """A fixed-pattern region of the layers read: unit by unit (layer by layer, in a random order), active or
    inactive as a random preference says where the programme allows both, else the one it allows; None when
    a unit allows neither (at the margin). ``force``: a unit of the last layer read that must be active (it is
    decided first)."""
    A, a, m, signs = [], [], [], []
    Ax, cx = np.eye(d), np.zeros(d)
    for depth, (W, b) in enumerate(zip(Ws, bs), start=1):
        prefer = rng.uniform(0.3, 0.95) if depth == len(Ws) else rng.uniform(0.7, 1.0)
        Z, z0 = W @ Ax, W @ cx + b
        mz = 1e-3 * np.maximum(np.linalg.norm(Z, axis=1), 1e-300)
        sg = np.zeros(len(b))
        order = rng.permutation(len(b))
        if force is not None and depth == len(Ws):
            order = np.concatenate([[force], order[order != force]])
        for i in order:
            first = 1.0 if rng.random() < prefer else -1.0
            for s in ((1.0,) if (force is not None and depth == len(Ws) and i == force) else (first, -first)):
                res = linprog(np.zeros(d), A_ub=-np.array(A + [s * Z[i]]), b_ub=np.array(a + [s * z0[i]]) -
                              np.array(m + [mz[i]]), bounds=(-box, box), method="highs")
                if res.status == 0:
                    sg[i] = s
                    A.append(s * Z[i])
                    a.append(s * z0[i])
                    m.append(mz[i])
                    break
            else:
                return None
        signs.append(sg)
        Ax, cx = Z * (sg > 0)[:, None], z0 * (sg > 0)
    region = _Region(Ws, bs, d, box, 1e-3, rng, signs=signs)
    S = region.signs > 0
    # the weights on the active units are read from P^T w = jump: unique (and accurate) only if P is well
    # conditioned there
    sv = np.linalg.svd(region.P[S], compute_uv=False)
    if not len(sv) or sv[-1] < 1e-6 * sv[0]:
        return None
    return region


def _lower_at(Ws, bs, x):
    """``h`` of the last layer read at ``x [d]``, its Jacobian, and the smallest ``|z|`` of any unit read there
    relative to its weights' norm (about 0 where a unit below switches)."""
    h, jac, zmin = np.asarray(x, np.float64), np.eye(len(x)), np.inf
    for W, b in zip(Ws, bs):
        z = W @ h + b
        zmin = min(zmin, float(np.min(np.abs(z) / np.maximum(np.linalg.norm(W @ jac, axis=1), 1e-300))))
        jac = (z > 0)[:, None] * (W @ jac)
        h = np.maximum(z, 0.0)
    return h, jac, zmin


class _LastUnits:
    """Units of the last hidden layer read from fixed-pattern regions: weights known on ``mask``, output column ``q``."""

    def __init__(self, n):
        self.w, self.mask, self.beta, self.q = np.zeros((0, n)), np.zeros((0, n), bool), np.zeros(0), []

    def consolidate(self, tol):
        """Merge units found separately (disjoint masks at first) that turned out to be one; True if any."""
        merged = False
        j = 0
        while j < len(self.beta):
            others = [i for i in range(len(self.beta)) if i != j]
            for i in others:
                O = self.mask[j] & self.mask[i]
                if O.sum() < 2:
                    continue
                u, c = np.append(self.w[i, O], self.beta[i]), np.append(self.w[j, O], self.beta[j])
                lam = float(u @ c) / float(c @ c)
                if np.linalg.norm(u - lam * c) <= tol["match"] * np.linalg.norm(u):
                    new = self.mask[j] & ~self.mask[i]
                    self.w[i, new] = lam * self.w[j, new]
                    self.mask[i] |= new
                    keep = np.arange(len(self.beta)) != j
                    self.w, self.mask, self.beta = self.w[keep], self.mask[keep], self.beta[keep]
                    self.q = [q for k, q in enumerate(self.q) if k != j]
                    merged = True
                    break
            else:
                j += 1
        return merged

    def match(self, w, beta, S, tol):
        for j in range(len(self.beta)):
            O = self.mask[j] & S
            if not O.any():
                continue
            u, c = np.append(self.w[j, O], self.beta[j]), np.append(w[O], beta)
            lam = float(u @ c) / float(c @ c)
            if np.linalg.norm(u - lam * c) <= tol["match"] * np.linalg.norm(u):
                return j, lam
        return None, 0.0


def _read_last(oracle, Ws, bs, flat, box, rng, classes, tol, grid, max_regions, stale, cache, progress_cb):
    """The last hidden layer, from crossings in fixed-pattern regions (no unit of a deeper layer crosses there:
    the output is linear), oriented by the additive least squares; returns (W, beta, Wout) or raises."""
    d = flat.shape[1]
    units = _LastUnits(len(bs[-1]))
    seen = np.zeros(len(bs[-1]), bool)

    def region_with(force=None):
        for attempt in range(10):  # the region of a random point (cheap), else one built unit by unit
            region = _sampled_region(Ws, bs, flat, box, rng, force) if attempt % 2 == 0 else \
                _pattern_region(Ws, bs, d, box, rng, force)
            if region is not None:
                return region
        return None

    def segment(p, v, interval):
        """Search ``p + t v`` over ``interval``; a crossing where no unit below switches is a unit of this layer
        (the output is linear above it): match, merge or add it, read in the pattern of the layers below there."""
        grew = False
        crossings, points, _ = search_line(oracle, p, v, int(rng.integers(classes)), None, tol, grid, 1e-12,
                                           interval=interval)
        for t, lo, hi in crossings:
            x, jump = p + t * v, points[hi][0] - points[lo][0]
            h, P, zmin = _lower_at(Ws, bs, x)
            if zmin <= tol["match"] * (1.0 + np.linalg.norm(x)):
                continue  # a unit below switches here
            S = h > 0
            sv = np.linalg.svd(P[S], compute_uv=False)
            if not len(sv) or sv[-1] < 1e-6 * sv[0]:
                continue  # the weights on S would not be determined
            w, *_ = np.linalg.lstsq(P.T, jump, rcond=None)
            if np.linalg.norm(P.T @ w - jump) > tol["rank"] * np.linalg.norm(jump) or not np.any(w):
                continue
            w = np.where(S, w / np.linalg.norm(w), 0.0)
            beta = -float(w @ h)
            seen[S] = True
            j, lam = units.match(w, beta, S, tol)
            if j is not None:
                new = S & ~units.mask[j]
                if new.any():
                    units.w[j, new] = lam * w[new]
                    units.mask[j] |= new
                    grew = True
                continue
            G, _ = _all_class(oracle, np.stack([p + lo * v, p + hi * v]), classes, cache)
            J = G[1] - G[0]
            nx = w @ P
            sgn = np.sign(w @ _lower_at(Ws, bs, p + hi * v)[0] - w @ _lower_at(Ws, bs, p + lo * v)[0])
            q = sgn * (J @ nx) / float(nx @ nx)
            if np.linalg.norm(J - sgn * np.outer(q, nx)) > tol["rank"] * np.linalg.norm(J):
                continue  # not one crossing of one unit
            units.w, units.mask = np.vstack([units.w, w]), np.vstack([units.mask, S])
            units.beta, units.q = np.append(units.beta, beta), units.q + [q]
            grew = True
        return grew

    def region_segment(region, a, b):
        return segment(a, b - a, tuple(rng.uniform(0.0, 1e-2, 2) * [1, -1] + [0, 1]))

    quiet = r = 0
    for r in range(max_regions):
        region = region_with()
        if region is None:
            raise _Infeasible("no fixed-pattern region of the layers below with full rank could be found")
        grew = False
        for _ in range(4):
            a, b = region.point(), region.point()
            if a is None or b is None:
                break
            grew |= region_segment(region, a, b)
        grew |= units.consolidate(tol)
        progress_cb(len(units.beta))
        quiet = 0 if grew else quiet + 1
        if quiet >= 4 * stale and len(units.beta):  # regions are cheap and some units are rarely crossed
            break
    else:
        raise _Infeasible(f"{max_regions} fixed-pattern regions without a complete last layer "
                          f"({len(units.beta)} units)")
    def complete_masks():
        # complete each unit's weights: for a coordinate i it was never crossed with, a region where unit i of the
        # layer below is active and a segment across the unit's hyperplane as known so far
        for _ in range(5):
            todo = [(j, i) for j in range(len(units.beta)) for i in np.flatnonzero(seen & ~units.mask[j])]
            if not todo:
                break
            for j, i in todo:
                if j >= len(units.beta) or units.mask[j, i]:
                    continue
                region = region_with(force=i)
                if region is None:
                    continue
                n, n0 = units.w[j] @ region.P, float(units.w[j] @ region.c + units.beta[j])
                if not np.any(n):
                    continue
                # the ends where the hyperplane as known so far is farthest on either side (the unknown weight's term
                # rarely outweighs that), then two random segments of the region
                for a, b in [(region.extreme(n, 1.0), region.extreme(n, -1.0)), (region.point(), region.point()),
                             (region.point(), region.point())]:
                    if a is not None and b is not None:
                        region_segment(region, a, b)
                    if j >= len(units.beta) or units.mask[j, i]:
                        break
            units.consolidate(tol)
            progress_cb(len(units.beta))

    complete_masks()
    # orientation: G(x) - sum_j q_j (w_j J(x)) [s_j > 0] = -sum_{j flipped} q_j (w_j J(x)), at check points (the
    # attacker's data, points of random regions); where the fit leaves a point unexplained, a unit is missing or
    # incomplete there: segments from unexplained to explained points cross it
    def region_points(n):
        out = []
        for _ in range(n):
            reg = _pattern_region(Ws, bs, d, box, rng)
            pt = None if reg is None else reg.point()
            if pt is not None:
                out.append(pt)
        return out

    scale = float(np.max(np.linalg.norm(flat, axis=1)))
    v = rng.standard_normal((24, d))
    near = flat[rng.integers(len(flat), size=24)] + rng.uniform(0, 3, (24, 1)) * scale * v / \
        np.linalg.norm(v, axis=1, keepdims=True)
    pts = np.concatenate([flat[rng.choice(len(flat), min(12, len(flat)), replace=False)], near,
                          np.stack(region_points(12))])
    G, _ = _all_class(oracle, pts, classes, cache)
    for round_ in range(8):
        flip, res, per = _fit_orientation(units, Ws, bs, pts, G)
        ok = not (np.any(np.abs(flip - np.round(flip)) > tol["binary"]) or np.any(~np.isin(np.round(flip), (0, 1))))
        if ok and res <= tol["check"]:
            sign = np.where(np.round(flip) == 1, -1.0, 1.0)
            unread = int(np.sum(seen[None] & ~units.mask))
            return units.w * sign[:, None], units.beta * sign, np.stack(units.q, axis=1), r + 1, unread
        bad, good = pts[per > tol["check"]], pts[per <= tol["check"]]
        if len(bad) and len(good):
            for i in range(min(len(bad), len(good), 4)):
                a, b = bad[rng.integers(len(bad))], good[rng.integers(len(good))]
                segment(a, b - a, tuple(rng.uniform(0.0, 1e-2, 2) * [1, -1] + [0, 1]))
            units.consolidate(tol)
            complete_masks()
        more = region_points(6)
        if more:
            G2, _ = _all_class(oracle, np.stack(more), classes, cache)
            pts, G = np.vstack([pts, more]), np.concatenate([G, G2])
    raise _Infeasible(f"the last layer's orientation does not fit the gradients (residual {res:.2g}): a unit is "
                      "missing or the layer is not the last")


def _fit_orientation(units, Ws, bs, pts, G):
    """Least squares for which units are flipped; returns (flip, relative residual, residual per point)."""
    Q = np.stack(units.q, axis=1)  # [K, n]
    rows, rhs = [], []
    for x, g in zip(pts, G):
        h, jac, _ = _lower_at(Ws, bs, x)
        s = units.w @ h + units.beta
        terms = Q[:, :, None] * (units.w @ jac)[None]  # [K, n, d]
        rhs.append((g - np.einsum("knd,n->kd", terms, (s > 0).astype(np.float64))).reshape(-1))
        rows.append(-terms.transpose(0, 2, 1).reshape(-1, len(s)))
    A, y = np.concatenate(rows), np.concatenate(rhs)
    flip, *_ = np.linalg.lstsq(A, y, rcond=None)
    per = np.array([np.linalg.norm(a @ flip - b) / max(np.linalg.norm(g), 1e-300) for a, b, g in zip(rows, rhs, G)])
    return flip, float(np.linalg.norm(A @ flip - y) / max(np.linalg.norm(G), 1e-300)), per


# ---------------------------------------------------------------------------------------------- the attack
def extract_mlp(service, data, *, classes: int, max_layers: int = 4, plan=None, span: float = 1e3,
                box: float | None = None, pool: int = 12, stale: int = 3, max_segments: int = 64, grid: int = 9,
                seed: int = 0, progress: bool = True) -> MLPExtraction:
    """Extract a fully connected ReLU net with 1 to ``max_layers`` hidden layers from an IG service, exactly up to
    its symmetries (see the module docstring for the method and where it cannot work).

    Args:
      service: an :class:`jaxrecover.services.IGService` explaining logits of an MLP on the flattened input,
        with a fixed baseline, reporting ``outputs``.
      data: ``[N, ...]`` inputs the attacker holds (layer 1's lines pass through them; ``dead`` and the final
        consistency check are measured on them).
      classes: number of classes ``K``.
      max_layers: hidden layers to try before giving up.
      plan: the plan that turns answers into gradients (default :func:`jaxrecover.attacks.best_plan`).
      span: layer 1's lines run over ``t`` in ``[-span, span]`` times the largest norm in ``data``.
      box: half-width of the box whose vertices the deeper layers' segments join (default 8 times the largest
        coordinate of ``data``, at least 8).
      pool: points per layer where all-class gradients test completeness and orientation.
      stale: lines/segments without a new unit before the completeness test.
      max_segments: lines or segments per layer before giving up (the result is then ``complete=False``).
      grid: first points per line.
      seed: draws lines, segments and programme objectives.

    Raises:
      MLPExtractionIncomplete: the query budget ran out; ``.partial`` holds what was found.
      ValueError: bad arguments, or a service that explains something other than logits.
    """
    if not (isinstance(max_layers, (int, np.integer)) and max_layers >= 1):
        raise ValueError(f"max_layers must be a positive int, got {max_layers!r}")
    data, plan, tol, flat, oracle = prepare(service, data, classes, plan, min_classes=2)
    f64 = np.dtype(service.dtype) == np.float64
    delta = 1e-9 if f64 else 1e-4
    d = flat.shape[1]
    scale = float(np.max(np.linalg.norm(flat, axis=1)))
    box = float(box) if box is not None else 8.0 * max(float(np.max(np.abs(flat))), 1.0)
    rng = np.random.default_rng(seed)
    q0, e0 = service.queries, service.evaluations
    Ws, bs, segments, cache = [], [], [], []
    state = {"rejected": 0, "message": "", "short": [], "notes": []}
    bar = tqdm(desc="extract", unit="seg", disable=not progress)

    def finish(out, complete, message):
        if out is not None and complete:  # the consistency check also covers the attacker's own images
            _all_class(oracle, flat[rng.choice(len(flat), min(32, len(flat)), replace=False)], classes, cache)
        bar.close()
        if state["short"]:
            complete, message = False, "; ".join(state["short"]) + "; " + message
        if state["notes"]:
            message = message + "; note: " + "; ".join(state["notes"])
        return _result(out, Ws, bs, flat, cache, service, q0, e0, segments, plan, state["rejected"], complete,
                       message, tol)

    try:
        for depth in range(1, max_layers + 1):
            for grow in range(6):  # a unit active only far out (a large negative bias) needs a larger box
                region = _Region(Ws, bs, d, box * 4.0 ** grow, 1e-3, rng)
                feasible = depth == 1 or region.point() is not None
                if feasible:
                    break
            region = region if feasible else _Region(Ws, bs, d, box, 1e-3, rng)
            layer = _Layer(region)
            lower = "layer 1" if depth == 2 else f"layers 1-{depth - 1}"
            if depth > 2 or not feasible:
                # first as the last hidden layer, from fixed-pattern regions (no deeper unit crosses them, so no
                # candidate needs verifying); if it is not the last, its orientation does not fit
                try:
                    W, beta, Wout, regions, unread = _read_last(oracle, Ws, bs, flat, box, rng, classes, tol, grid,
                                                        max_segments, stale, cache,
                                                        lambda n: (bar.update(1), bar.set_postfix(layer=depth, units=n)))
                except _Infeasible as e:
                    if not feasible:
                        raise _Infeasible(f"{e}; and no input makes every unit of {lower} active at once, where "
                                          "a middle layer is read") from None
                else:
                    if unread:  # no check point needed them (the fit passed), but they were not read either
                        state["short"].append(f"layer {depth}: {unread} weights (unit, unit below) never read, set to "
                                              "0: no crossing of the unit was found where that unit below is active "
                                              "(no check point needed them; the copy may differ where they matter)")
                    segments.append(regions)
                    Ws.append(W)
                    bs.append(beta)
                    return finish(Wout, True, f"{depth} hidden layers read (the last from {regions} fixed-pattern "
                                              "regions)")
            pts = np.concatenate([np.stack([region.point() for _ in range(pool)]), region.lift(flat, 2 * pool)]) \
                if depth > 1 else \
                np.concatenate([flat[rng.choice(len(flat), min(pool // 2, len(flat)), replace=False)],
                                np.stack([region.point() for _ in range(pool - min(pool // 2, len(flat)))])])
            G = None
            since_new = n_seg = 0
            targets = []  # segments that must cross a missing unit (from a point it explains to one it does not)
            while True:
                n_seg += 1
                if depth == 1:
                    p = flat[rng.integers(len(flat))]
                    v = rng.standard_normal(d)
                    v /= np.linalg.norm(v)
                    crossings, points, _ = search_line(oracle, p, v, n_seg % classes, span * scale, tol, grid,
                                                       1e-12 * span * scale)
                elif targets or n_seg % 2:
                    a, b = targets.pop() if targets else (region.point(), region.point())
                    p, v = a, b - a
                    crossings, points, _ = search_line(oracle, p, v, n_seg % classes, None, tol, grid, 1e-12,
                                                       interval=tuple(rng.uniform(0.0, 1e-2, 2) * [1, -1] + [0, 1]))
                else:
                    p, v, t_max = region.ray(pts)
                    crossings, points, _ = search_line(oracle, p, v, n_seg % classes, None, tol, grid, 1e-12,
                                                       interval=(rng.uniform(0.0, 1e-3) * t_max, t_max))
                added = 0
                for t, lo, hi in crossings:
                    x, jump = p + t * v, points[hi][0] - points[lo][0]
                    if layer.known(x, jump, tol):
                        continue
                    cand = layer.candidate(x, jump, tol)
                    if cand is None or not _verify(oracle, region, *cand, n_seg % classes, classes, tol, delta):
                        state["rejected"] += 1
                        continue
                    layer.W, layer.b = np.vstack([layer.W, cand[0]]), np.append(layer.b, cand[1])
                    added += 1
                bar.update(1)
                bar.set_postfix(layer=depth, units=len(layer.b), queries=service.queries - q0)
                since_new = 0 if added else since_new + 1
                if since_new >= (1 if depth == 1 else stale) and len(layer.b):
                    if G is None:
                        G, _ = _all_class(oracle, pts, classes, cache)
                    if _decompose(layer, G)[1] <= tol["check"]:
                        # complete where it was tested; a unit active on a small part of the region is missed by
                        # the test and by most segments: sweep on until 4 * stale segments found nothing new
                        if depth == 1 or since_new >= 4 * stale:
                            break
                        continue
                    since_new = 0
                    if depth > 1:
                        pts, G, targets = _targets(oracle, layer, pts, G, classes, tol, cache)
                if n_seg >= max_segments:
                    if not len(layer.b):
                        segments.append(n_seg)
                        return finish(None, False, f"layer {depth}: {max_segments} segments found no unit")
                    # keep what was found (the result says it is incomplete) and go on
                    state["short"].append(f"layer {depth}: {max_segments} segments without a complete layer "
                                          f"({len(layer.b)} units found)")
                    break
            segments.append(n_seg)
            state["rejected"] += _prune(oracle, layer, classes, tol, delta)
            if np.linalg.matrix_rank(layer.normals()) < len(layer.b):
                return finish(None, False, f"layer {depth} ({len(layer.b)} units) is wider than the rank below it: "
                                           "one gradient cannot tell its units' active sides")
            if G is None:
                G, _ = _all_class(oracle, pts, classes, cache)
            pts, G, _ = _orient(oracle, layer, pts, G, classes, tol, cache)
            C, _ = _decompose(layer, G)
            S = region.h(pts) @ layer.W.T + layer.b
            Ws.append(layer.W)
            bs.append(layer.b)
            out = _output_layer(C, S, tol)
            if out is not None:
                return finish(out, True, f"{depth} hidden layers read; the output layer is linear in the last")
        return finish(None, False, f"max_layers={max_layers} hidden layers read and none was the last")
    except QueryBudgetExceeded as e:
        partial = finish(None, False, f"query budget ran out in layer {len(Ws) + 1}: {e}")
        raise MLPExtractionIncomplete(f"query budget ran out after {partial.queries} queries in layer {len(Ws) + 1}: "
                                      f"{partial.widths} units read so far (partial result in .partial)",
                                      partial) from None
    except _Infeasible as e:
        return finish(None, False, f"layer {len(Ws) + 1}: {e}")


def _output_layer(C, S, tol):
    """The output matrix if every unit's ``C`` column is the same wherever it is active (the last hidden layer)."""
    on = S > 0
    K, n = C.shape[1], C.shape[2]
    W = np.zeros((K, n))
    top = max(float(np.abs(C).max()), 1e-300)
    for j in range(n):
        cols = C[on[:, j], :, j]
        if not len(cols):
            return None
        if float(np.max(np.abs(cols - cols[0]))) > tol["check"] * top:
            return None
        W[:, j] = cols.mean(axis=0)
    return W


def _result(Wout, Ws, bs, flat, cache, service, q0, e0, segments, plan, rejected, complete, message, tol):
    widths = [len(b) for b in bs]
    params, consistency, dead = None, np.inf, [[] for _ in bs]
    if Wout is not None:
        raw = {"W": [*Ws, Wout], "b": [*bs, np.zeros(Wout.shape[0])]}
        z = np.stack([c[0] for c in cache])
        F = np.stack([c[2] for c in cache])
        rest = F - mlp_logits(raw, z)
        small = np.argsort(np.max(np.abs(F), axis=1))[:max(1, len(F) // 4)]
        raw["b"][-1] = np.median(rest[small], axis=0)
        G = np.stack([c[1] for c in cache])
        grad_err = float(np.max(np.abs(mlp_gradients(raw, z) - G)) / max(np.max(np.abs(G)), 1e-300))
        value_err = float(np.max(np.abs(F - mlp_logits(raw, z))) / max(np.max(np.abs(F)), 1e-300))
        consistency = max(grad_err, value_err)
        params = canonical_mlp(raw)
        widths = [len(b) for b in params["b"][:-1]]
        h = flat
        for l, (W, b) in enumerate(zip(params["W"][:-1], params["b"][:-1])):
            z_l = h @ W.T + b
            dead[l] = np.flatnonzero(~np.any(z_l > 0, axis=0)).tolist()
            h = np.maximum(z_l, 0.0)
        if complete and consistency > tol["check"]:
            complete = False
            message += f"; but the model misses some answers (consistency {consistency:.2g})"
    return MLPExtraction(params=params, widths=widths, dead=dead, queries=service.queries - q0,
                         evaluations=service.evaluations - e0, segments=list(segments),
                         plan=f"{plan.name} ({len(plan.queries)} queries)", rejected=rejected,
                         consistency=float(consistency), complete=bool(complete), message=message)
