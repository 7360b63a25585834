"""Making a Keras 3 model compute what the tf-slim net computes: the Keras side of ``match_tensorflow``.

A port map's caveats are differences in the network, not in the weights: no map can fix them, but
a model built a little differently can.  For each built-in Keras map this gives the model to use:

* ``keras:VGG16``, ``keras:VGG19``, ``keras:InceptionV3``: no caveat (Keras has slim's padding,
  pooling and batch norm there); the model is returned as it is.
* ``keras:ResNet50V2``, ``:ResNet101V2``, ``:ResNet152V2``: Keras strides where slim does, but its
  ``pool1`` zero-pads 1 on every side and then pools ``VALID``, where slim's is TensorFlow's ``SAME``
  max pool (padding that depends on the input size, and never wins the max); and its batch norms use
  epsilon 1.001e-5 against slim's 1e-5.  The clone pads nothing in ``pool1_pad`` (a
  ``ZeroPadding2D(0)``, so no layer changes class and the file keys stay the same), pools ``same`` in
  ``pool1_pool``, and has epsilon 1e-5 in every batch norm.  Its input takes any image size.

The clone keeps every layer's name and every variable's path, and holds the model's weights, so
``save_weights`` of either gives the same keys and ``load_weights`` of a port goes into both.

Keras is imported only when a model is matched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import CkptBridgeError, MismatchError
from .model import PortMap
from .parse import load

#: slim's batch-norm epsilon in resnet_arg_scope (Keras' ResNetV2 uses 1.001e-5)
SLIM_RESNET_EPSILON = 1e-5


def match_keras(model: Any, pmap: str | PortMap) -> Any:
    """The Keras model to use with a port of ``pmap`` (a map's name, a map file, or a ``PortMap``).

    ``model`` itself where the map has no caveat; else a clone with every caveat's fix, which holds
    ``model``'s weights under the same layer and variable names and runs at any input size.
    """
    m = load(pmap)
    if not m.caveats:
        return model
    fix = _FIXES.get(m.net)
    if fix is None:
        kinds = ", ".join(sorted({c.kind for c in m.caveats}))
        raise CkptBridgeError(f"port map {m.name} has caveats ({kinds}) for tf-slim net {m.net}, and ckptbridge knows no fix "
                              f"for them in a Keras model; apply each caveat's fix by hand (port_map({m.name!r}).caveats lists them)")
    return fix(model, m)


def _layer(model: Any, name: str, cls: str, pmap: PortMap) -> Any:
    """``model``'s layer ``name``, which must be a ``cls``; else the model is not the map's destination."""
    found = {layer.name: layer for layer in model.layers}.get(name)
    if found is None or type(found).__name__ != cls:
        got = "no such layer" if found is None else f"a {type(found).__name__}"
        raise MismatchError(f"this Keras model is not the destination of port map {pmap.name}: its layer {name!r} should be a "
                            f"{cls}, found {got}; build {pmap.destination}")
    return found


def _import_keras() -> Any:
    """Keras 3, imported by name (it ships no type information; mypy runs where it is not installed)."""
    import importlib

    return importlib.import_module("keras")


def _resnet_v2(model: Any, pmap: PortMap) -> Any:
    """Keras' ResNetV2 with slim's pool1 (TensorFlow's SAME max pool) and slim's batch-norm epsilon."""
    keras = _import_keras()
    pool = _layer(model, "pool1_pool", "MaxPooling2D", pmap)
    _layer(model, "pool1_pad", "ZeroPadding2D", pmap)

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name == "pool1_pad":
            config["padding"] = ((0, 0), (0, 0))
        elif layer.name == "pool1_pool":
            config["padding"] = "same"
        elif isinstance(layer, keras.layers.BatchNormalization):
            config["epsilon"] = SLIM_RESNET_EPSILON
        return layer.__class__.from_config(config)

    # Every dimension but the channels free: global average pooling before the logits takes any size.
    channels = model.input_shape[1] if pool.data_format == "channels_first" else model.input_shape[-1]
    shape = (channels, None, None) if pool.data_format == "channels_first" else (None, None, channels)
    inputs = keras.Input(shape=shape, dtype=model.inputs[0].dtype)
    matched = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    matched.set_weights(model.get_weights())
    return matched


_FIXES: dict[str, Callable[[Any, PortMap], Any]] = {f"resnet_v2_{d}": _resnet_v2 for d in (50, 101, 152)}
