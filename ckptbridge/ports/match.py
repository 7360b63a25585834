"""Make a ported model compute what the tf-slim net computes: every caveat's fix, applied to the model.

A port map carries the weights exactly, but some destinations are built a little
differently from the slim net (the map's caveats): TensorFlow's asymmetric
``'SAME'`` padding, average pools that leave the padding out, where a resnet
puts its strides.  No weight can fix that; a change to the model can, and
:func:`match_tensorflow` makes it:

- ``torchvision:googlenet`` (padding): every strided conv or pool that pads (or
  uses ``ceil_mode``) pads as ``'SAME'`` does, worked out from each input's size;
- ``torchvision:inception_v3``, ``timm:inception_v3`` (pooling): average pools
  exclude the padding while the model runs (the ``F.avg_pool2d`` calls in the
  model's own modules too; other models are untouched);
- ``torchvision:resnet50/101/152`` (strides, padding): slim strides the 3x3 conv
  of each block's *last* unit.  Subsampling commutes with the 1x1 convs, batch
  norm and ReLU between there and the next stage's first 1x1 conv, so the
  stride moves there: ``layer2-4[0].conv1.stride = 2``, ``conv2.stride = 1``
  (``downsample`` keeps its stride 2, on the same input).  ``pool1`` is
  ``'SAME'``: ``maxpool`` becomes a pool that pads with -inf as ``'SAME'``
  does at each input's size;
- Keras maps: :mod:`._match_keras`.

The model keeps its ``state_dict`` keys (no module with state is added or
removed), so weights load before or after, and it works at any input size.
PyTorch is imported here only, when a torch model is matched.
"""

from __future__ import annotations

import importlib
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import CkptBridgeError
from .model import PortMap
from .parse import load

_MARK = "_ckptbridge_matched"  # set on a matched model: the map it was matched to


def match_tensorflow(model: Any, map: str | PortMap) -> Any:
    """``model`` (built as the map's ``destination`` says) changed to compute what the tf-slim net computes; returned.

    A torch model is changed in place and returned; a Keras model is cloned (its
    layers' settings cannot change once built) and the clone returned: use the
    result either way.  Matching twice is a no-op.  A map without caveats
    returns the model as it is.
    """
    pmap = load(map)
    if pmap.destination.startswith("keras."):
        # Keras' side lives in its own module (imported by name: it imports Keras).
        match_keras = importlib.import_module("._match_keras", __package__).match_keras
        return match_keras(model, pmap)
    if not pmap.caveats:
        return model
    fix = _TORCH_FIXES.get(pmap.name)
    if fix is None:
        raise CkptBridgeError(f"port map {pmap.name} declares caveats ({', '.join(c.kind for c in pmap.caveats)}), "
                              f"and match_tensorflow knows the fixes of the built-in maps only ({', '.join(sorted(_TORCH_FIXES))})")
    done = getattr(model, _MARK, None)
    if done == pmap.name:
        return model
    if done is not None:
        raise CkptBridgeError(f"this model was matched to port map {done} already, not {pmap.name}")
    fix(model)
    setattr(model, _MARK, pmap.name)
    return model


# --------------------------------------------------------------------------- torch


def _torch() -> tuple[Any, Any, Any]:
    """torch, torch.nn and torch.nn.functional (no types: torch is no dependency of ckptbridge's own)."""
    torch = importlib.import_module("torch")
    return torch, torch.nn, torch.nn.functional


def same_pads(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's ``'SAME'`` padding of one spatial axis: (before, after); the odd pixel goes after."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pad_same(x: Any, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int], value: float) -> Any:
    _, _, F = _torch()
    top, bottom = same_pads(x.shape[-2], k[0], s[0], d[0])
    left, right = same_pads(x.shape[-1], k[1], s[1], d[1])
    return F.pad(x, (left, right, top, bottom), value=value)


_SAME_MAX_POOL: Any = None


def _same_max_pool_class() -> Any:
    """The ``SameMaxPool2d`` class, made on first use (it subclasses ``torch.nn.Module``)."""
    global _SAME_MAX_POOL
    if _SAME_MAX_POOL is None:
        _, nn, F = _torch()

        def __init__(self: Any, kernel_size: int, stride: int) -> None:
            nn.Module.__init__(self)
            self.kernel_size, self.stride = kernel_size, stride

        def forward(self: Any, x: Any) -> Any:
            k, s = _pair(self.kernel_size), _pair(self.stride)
            return F.max_pool2d(_pad_same(x, k, s, (1, 1), -math.inf), k, s)

        def extra_repr(self: Any) -> str:
            return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='SAME'"

        # Made with type(): torch has no types here, and a class statement on it would subclass Any.
        _SAME_MAX_POOL = type("SameMaxPool2d", (nn.Module,), {"__init__": __init__, "forward": forward, "extra_repr": extra_repr,
                                                               "__module__": __name__, "__qualname__": "SameMaxPool2d"})
    return _SAME_MAX_POOL


def __getattr__(name: str) -> Any:
    """``SameMaxPool2d`` by name, so that pickle (``torch.save`` of a whole matched model) finds the class."""
    if name == "SameMaxPool2d":
        return _same_max_pool_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def same_max_pool(kernel_size: int, stride: int) -> Any:
    """A ``torch.nn.Module`` (``SameMaxPool2d``, no state): a max pool padded as TensorFlow's ``'SAME'``,
    with -inf, at each input's size."""
    return _same_max_pool_class()(kernel_size, stride)


def _tf_same(module: Any) -> None:
    """Make a strided conv or pool pad as TensorFlow's ``'SAME'``: its own padding 0, the input padded before it runs."""
    _, nn, _ = _torch()
    k, s = _pair(module.kernel_size), _pair(module.stride)
    d = _pair(getattr(module, "dilation", 1))
    value = -math.inf if isinstance(module, nn.MaxPool2d) else 0.0
    if isinstance(module, nn.AvgPool2d):
        module.count_include_pad = False  # TensorFlow's average pools never count the padding
    module.padding = 0 if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) else (0, 0)
    if hasattr(module, "ceil_mode"):
        module.ceil_mode = False

    def pre_hook(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_pad_same(args[0], k, s, d, value), *args[1:])

    module.register_forward_pre_hook(pre_hook)


def _same_padding(model: Any) -> None:
    """Every strided Conv2d / MaxPool2d / AvgPool2d that pads (or uses ceil_mode) pads as ``'SAME'`` (googlenet)."""
    _, nn, _ = _torch()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            strided = _pair(m.stride) != (1, 1)
            pads = _pair(m.padding) != (0, 0) if not isinstance(m.padding, str) else True
            if strided and (pads or getattr(m, "ceil_mode", False)):
                _tf_same(m)


class _Functional:
    """Stands in for ``torch.nn.functional`` in a model's Python module: ``avg_pool2d`` excludes
    the padding while a matched model runs (``active`` > 0 on this thread), and is torch's otherwise."""

    def __init__(self, functional: Any) -> None:
        self._functional = functional
        self._state = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)

    @property
    def active(self) -> int:
        return int(getattr(self._state, "active", 0))

    @active.setter
    def active(self, value: int) -> None:
        self._state.active = value

    def avg_pool2d(self, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            kwargs["count_include_pad"] = False
        return self._functional.avg_pool2d(*args, **kwargs)


def _exclude_pad_pooling(model: Any) -> None:
    """Average pools leave the padding out, as TensorFlow's do (inception_v3)."""
    _, nn, F = _torch()
    for m in model.modules():
        if isinstance(m, nn.AvgPool2d):
            m.count_include_pad = False
    proxies: list[_Functional] = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        if name == "torch" or name.startswith("torch."):
            continue  # torch's own modules (nn.AvgPool2d is matched above), never replaced
        pymod = sys.modules[name]
        current = getattr(pymod, "F", None)
        if current is F:
            current = _Functional(F)
            pymod.F = current  # type: ignore[attr-defined]
        if isinstance(current, _Functional) and current not in proxies:
            proxies.append(current)

    def enter(*_: Any) -> None:
        for p in proxies:
            p.active += 1

    def leave(*_: Any) -> None:
        for p in proxies:
            p.active -= 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def _resnet_v1(model: Any) -> None:
    """slim's resnet_v1 on a torchvision resnet (v1.5): the strides moved, pool1 ``'SAME'``."""
    for name in ("layer2", "layer3", "layer4"):
        first = getattr(model, name)[0]
        if _pair(first.conv2.stride) != (2, 2) or _pair(first.conv1.stride) != (1, 1):
            raise CkptBridgeError(f"{name}[0] of this model is not torchvision's resnet v1.5 bottleneck "
                                  f"(conv1 stride {first.conv1.stride}, conv2 stride {first.conv2.stride})")
        first.conv1.stride = (2, 2)
        first.conv2.stride = (1, 1)
    pool = model.maxpool
    model.maxpool = same_max_pool(pool.kernel_size, pool.stride)


_TORCH_FIXES: dict[str, Callable[[Any], None]] = {
    "torchvision:googlenet": _same_padding,
    "torchvision:inception_v3": _exclude_pad_pooling,
    "timm:inception_v3": _exclude_pad_pooling,
    "torchvision:resnet50": _resnet_v1,
    "torchvision:resnet101": _resnet_v1,
    "torchvision:resnet152": _resnet_v1,
}
