"""The paper's five MNIST models as Flax Linen modules.

Models take NHWC images ``(N, 28, 28, 1)`` and return logits ``(N, 10)``.
Every model's ``__call__`` takes ``part``: ``"all"`` (the model), ``"stem"`` (its
first, affine layer only) or ``"body"`` (the rest, applied to a stem output);
LeNet also takes ``"head"`` (everything after its second convolution's ReLU and
max-pool, applied to their output: the sparse IG path's split);
layers are named explicitly so the three share one set of variables. Layers are
built with ``dtype=None`` so they compute in the dtype of their parameters and
inputs. Nothing downstream sees these modules: :func:`jaxrecover.models.make_model`
turns one into a :class:`jaxrecover.models.Model` once, in inference mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from .. import ops

__all__ = ["MODEL_NAMES", "EXTRA_MODEL_NAMES", "MLP", "INPUT_SHAPE", "NUM_CLASSES", "PARTS", "TwoLayerNet", "LeNet", "ResNet18", "BasicBlock",
           "get_model"]

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
#: What a model's ``__call__(..., part=...)`` can return.
PARTS = ("all", "stem", "body")
#: LeNet's extra part: the layers after conv2's ReLU and max-pool, applied to their output.
HEAD = "head"


def Conv(*args, **kwargs) -> nn.Conv:
    """``nn.Conv`` computing with :func:`jaxrecover.ops.conv_general_dilated` (same function, faster on CPU)."""
    return nn.Conv(*args, conv_general_dilated=ops.conv_general_dilated, **kwargs)


def _check_part(part: str, extra: tuple[str, ...] = ()) -> None:
    if part not in PARTS + extra:
        raise ValueError(f"unknown model part {part!r}; choose one of: {', '.join(PARTS + extra)}")


class TwoLayerNet(nn.Module):
    """flatten 784 -> fc 100 -> ReLU -> fc 10.

    ``part``: see the module docstring.
    """

    use_bias: bool = True
    hidden: int = 100
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        _check_part(part)
        if part != "body":
            x = nn.Dense(self.hidden, use_bias=self.use_bias, name="Dense_0")(x.reshape(x.shape[0], -1))
            if part == "stem":
                return x
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="Dense_1")(nn.relu(x))


class MLP(nn.Module):
    """flatten 784 -> (fc -> ReLU) per entry of ``hidden`` -> fc 10: the deep-extraction victims (``mlp2``,
    ``mlp3``). Layers are ``Dense_0, Dense_1, ...`` (:func:`jaxrecover.stealing.mlp_params` reads them).

    ``part``: ``"stem"`` is the first Dense layer, ``"body"`` the rest applied to its output.
    """

    hidden: Sequence[int] = (128, 128)
    use_bias: bool = True
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        _check_part(part)
        widths = (*self.hidden, self.num_classes)
        if part != "body":
            x = nn.Dense(widths[0], use_bias=self.use_bias, name="Dense_0")(x.reshape(x.shape[0], -1))
            if part == "stem":
                return x
        for i, w in enumerate(widths[1:], start=1):
            x = nn.Dense(w, use_bias=self.use_bias, name=f"Dense_{i}")(nn.relu(x))
        return x


class LeNet(nn.Module):
    """conv3x3 32 -> ReLU -> conv3x3 64 -> ReLU -> maxpool 2 -> fc 128 -> ReLU -> fc 10."""

    use_bias: bool = True
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        _check_part(part, (HEAD,))
        if part not in ("body", HEAD):
            x = Conv(32, (3, 3), padding="VALID", use_bias=self.use_bias, name="Conv_0")(x)
            if part == "stem":
                return x
        if part != HEAD:
            x = Conv(64, (3, 3), padding="VALID", use_bias=self.use_bias, name="Conv_1")(nn.relu(x))
            x = ops.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, use_bias=self.use_bias, name="Dense_0")(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="Dense_1")(x)


def _bn(train: bool, name: str | None = None):
    # torch's momentum 0.1 is flax's 0.9; eps as torch.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(s)-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        pad = ((1, 1), (1, 1))
        y = Conv(self.features, (3, 3), (self.strides,) * 2, padding=pad, use_bias=False)(x)
        y = nn.relu(_bn(train)(y))
        y = Conv(self.features, (3, 3), padding=pad, use_bias=False)(y)
        y = _bn(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), (self.strides,) * 2, use_bias=False, name="shortcut_conv")(x)
            x = _bn(train, name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """torchvision ResNet18 layout for 1-channel 28x28 input and 10 classes."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False, part: str = "all"):
        _check_part(part)
        if part != "body":
            x = Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
            x = _bn(train, name="bn1")(x)
            if part == "stem":
                return x
        x = ops.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = 0
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                x = BasicBlock(64 * 2**i, strides=2 if (i > 0 and j == 0) else 1, name=f"BasicBlock_{block}")(x, train)
                block += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "twolayer_nobias": lambda: TwoLayerNet(use_bias=False),
    "twolayer": lambda: TwoLayerNet(use_bias=True),
    "lenet_nobias": lambda: LeNet(use_bias=False),
    "lenet": lambda: LeNet(use_bias=True),
    "resnet18": lambda: ResNet18(),
}
#: The paper's five models (the protocol's tables run over these).
MODEL_NAMES = tuple(_FACTORIES)
#: Victims of the deep extraction (issue 37): fully connected ReLU nets on MNIST.
_FACTORIES.update({
    "mlp2": lambda: MLP(hidden=(128, 128)),
    "mlp2_nobias": lambda: MLP(hidden=(128, 128), use_bias=False),
    "mlp3": lambda: MLP(hidden=(64, 64, 64)),
    "mlp3_nobias": lambda: MLP(hidden=(64, 64, 64), use_bias=False),
})
#: The extraction victims: :data:`MODEL_NAMES` plus these can be trained, loaded and served.
EXTRA_MODEL_NAMES = tuple(n for n in _FACTORIES if n not in MODEL_NAMES)


def get_model(name: str) -> nn.Module:
    """The Flax module of a model by name (one of :data:`MODEL_NAMES`)."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_FACTORIES)}") from None
