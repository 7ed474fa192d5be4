"""PyTorch twins of jaxrecover's five models, loaded with the SAME weights.

Needs the optional ``services`` extra (``pip install 'jaxrecover[services]'``):
the Captum service (:class:`jaxrecover.attacks.CaptumIGService`) and the
benchmark run Captum on these twins. Layouts: Flax is NHWC with (in, out) Dense
kernels and HWIO conv kernels; PyTorch is NCHW with (out, in) and OIHW. A
flattening Dense after convolutions sees (h, w, c) in Flax and (c, h, w) in
PyTorch, so its rows are permuted. ResNet18's BatchNorm layers are in
inference mode (``.eval()``: running statistics), as in :func:`jaxrecover.models.make_model`.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("jaxrecover.services.external.torch_twins needs PyTorch: pip install 'jaxrecover[services]' "
                      "(or bash scripts/setup.sh services)") from e

__all__ = ["torch_twin", "torch_dtype", "to_nchw", "from_nchw"]


def _t(a, dtype):
    return torch.from_numpy(np.array(a, copy=True)).to(dtype)


def _dense(layer: nn.Linear, p, dtype, rows_hwc=None):
    k = np.asarray(p["kernel"])
    if rows_hwc is not None:  # (h*w*c, out) in Flax order -> (c*h*w, out) in torch order
        h, w, c = rows_hwc
        k = k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    layer.weight.data = _t(k.T, dtype)
    if "bias" in p:
        layer.bias.data = _t(p["bias"], dtype)


def _conv(layer: nn.Conv2d, p, dtype):
    layer.weight.data = _t(np.asarray(p["kernel"]).transpose(3, 2, 0, 1), dtype)
    if "bias" in p:
        layer.bias.data = _t(p["bias"], dtype)


def _bn(layer: nn.BatchNorm2d, p, s, dtype):
    layer.weight.data = _t(p["scale"], dtype)
    layer.bias.data = _t(p["bias"], dtype)
    layer.running_mean.data = _t(s["mean"], dtype)
    layer.running_var.data = _t(s["var"], dtype)


class MLPTwin(nn.Module):
    def __init__(self, widths, bias):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.fcs[:-1]:
            x = torch.relu(fc(x))
        return self.fcs[-1](x)


class TwoLayer(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 100, bias=bias), nn.Linear(100, 10, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class LeNet(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3, bias=bias), nn.Conv2d(32, 64, 3, bias=bias)
        self.fc1, self.fc2 = nn.Linear(9216, 128, bias=bias), nn.Linear(128, 10, bias=bias)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu((x if self.short is None else self.short(x)) + y)


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cfg, cin, blocks = [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)], 64, []
        for cout, s in cfg:
            blocks.append(Block(cin, cout, s))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.blocks(x).mean(dim=(2, 3))
        return self.fc(x)


def torch_dtype(dtype) -> "torch.dtype":
    """The torch dtype of a numpy/JAX float dtype (float32 or float64)."""
    name = np.dtype(dtype).name
    if name not in ("float32", "float64"):
        raise ValueError(f"torch twins run in float32 or float64, got {name}")
    return getattr(torch, name)


def torch_twin(name: str, variables, dtype=None) -> nn.Module:
    """A PyTorch module computing the same logits as ``jaxrecover.models.get_model(name)``.

    Args:
      name: one of :data:`jaxrecover.models.MODEL_NAMES`.
      variables: the Flax variables (``params``, and ``batch_stats`` for resnet18).
      dtype: torch dtype of the twin; default the float dtype of ``variables``.
    """
    if dtype is None:
        leaves = [np.asarray(v) for v in _leaves(variables)]
        dtype = torch_dtype(next(a.dtype for a in leaves if np.issubdtype(a.dtype, np.floating)))
    elif not isinstance(dtype, torch.dtype):
        dtype = torch_dtype(dtype)
    p = variables["params"]
    bias = not name.endswith("nobias")
    if name.startswith("twolayer"):
        m = TwoLayer(bias)
        _dense(m.fc1, p["Dense_0"], dtype)
        _dense(m.fc2, p["Dense_1"], dtype)
    elif name.startswith("mlp"):
        names = sorted((k for k in p if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
        widths = [np.asarray(p[names[0]]["kernel"]).shape[0]] + [np.asarray(p[n]["kernel"]).shape[1] for n in names]
        m = MLPTwin(widths, bias)
        for fc, n in zip(m.fcs, names):
            _dense(fc, p[n], dtype)
    elif name.startswith("lenet"):
        m = LeNet(bias)
        _conv(m.c1, p["Conv_0"], dtype)
        _conv(m.c2, p["Conv_1"], dtype)
        _dense(m.fc1, p["Dense_0"], dtype, rows_hwc=(12, 12, 64))
        _dense(m.fc2, p["Dense_1"], dtype)
    elif name == "resnet18":
        s = variables["batch_stats"]
        m = ResNet18()
        _conv(m.conv1, p["conv1"], dtype)
        _bn(m.bn1, p["bn1"], s["bn1"], dtype)
        for i, blk in enumerate(m.blocks):
            fp, fs = p[f"BasicBlock_{i}"], s[f"BasicBlock_{i}"]
            _conv(blk.c1, fp["Conv_0"], dtype)
            _bn(blk.b1, fp["BatchNorm_0"], fs["BatchNorm_0"], dtype)
            _conv(blk.c2, fp["Conv_1"], dtype)
            _bn(blk.b2, fp["BatchNorm_1"], fs["BatchNorm_1"], dtype)
            if blk.short is not None:
                _conv(blk.short[0], fp["shortcut_conv"], dtype)
                _bn(blk.short[1], fp["shortcut_bn"], fs["shortcut_bn"], dtype)
        _dense(m.fc, p["fc"], dtype)
    else:
        raise ValueError(f"no torch twin for {name!r}")
    return m.to(dtype).eval()


def _leaves(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def to_nchw(x_nhwc) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2))


def from_nchw(x_nchw) -> np.ndarray:
    return np.asarray(x_nchw).transpose(0, 2, 3, 1)
