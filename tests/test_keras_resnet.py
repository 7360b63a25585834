"""The proof of the Keras ResNetV2 maps: tf-slim's resnet_v2 and Keras 3's ResNet*V2, once matched, compute the same logits.

For ``keras:ResNet50V2`` (``:ResNet101V2`` and ``:ResNet152V2`` with ``--slow``):

1. TensorFlow builds the slim net (``is_training=False``, any image size) with random weights and
   batch-norm statistics; gammas near 1 (slim's resnet has them), and one channel in 7 of every batch
   norm with a moving variance of 1e-8 (its gamma scaled to keep the scale), where Keras' epsilon
   1.001e-5 and slim's 1e-5 differ by 5e-4 of the channel.  Random weights hide layout errors (global
   average pooling averages a misplaced tensor away), so the last feature map (``postnorm``, Keras
   ``post_relu``) is compared as well as the logits, at 224 and at 321 px (slim's SAME pool1 pads
   (0, 1) on the 112 px conv1 output of a 224 image, (1, 1) at 321);
2. ``export --to`` writes a ``.weights.h5``; Keras' ``load_weights`` takes it; as shipped the logits
   differ (pool1, epsilon: both are the map's caveats), and once ``match_keras`` has made the clone
   they agree within 1e-5 relative;
3. the other way: a Keras model with its own initial kernels (batch-norm statistics, gammas, betas and
   biases, which Keras starts as constants, drawn at random), ``import --from`` through the slim graph:
   the slim logits equal the matched Keras model's, and the background logit is exactly 0.

``keras:ResNet101V2`` and ``:ResNet152V2`` load in the fast suite without a slim graph (building
one takes 20-30 s): arrays under slim's names go through ``export`` and ``load_weights``, and every
Keras layer, found by its own name (``conv4_block17_2_conv``), holds the slim tensor of that unit.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")
pytest.importorskip("h5py")

import ckptbridge  # noqa: E402
from ckptbridge.ports._match_keras import SLIM_RESNET_EPSILON, match_keras  # noqa: E402

from helpers import CLI_ENV, same  # noqa: E402

pytestmark = pytest.mark.tf

AGREE = 1e-5  # max|keras - slim| / max|slim|, once matched
SIZES = (224, 321)
TINY_VARIANCE = 1e-8
#: map -> (tf-slim net, keras.applications constructor, seed)
NETS = {
    "keras:ResNet50V2": ("resnet_v2_50", "ResNet50V2", 50),
    "keras:ResNet101V2": ("resnet_v2_101", "ResNet101V2", 101),
    "keras:ResNet152V2": ("resnet_v2_152", "ResNet152V2", 152),
}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def image(size: int) -> np.ndarray:
    return np.random.default_rng(size).uniform(-1.0, 1.0, (1, size, size, 3)).astype(np.float32)


def random_value(rng: np.random.Generator, name: str, shape: Any) -> np.ndarray:
    """He-scaled kernels, small biases and betas, gammas near 1, moving statistics away from 0 and 1, and
    one channel in 7 with a moving variance near 0 (its gamma scaled by sqrt(epsilon), so it keeps its size)."""
    shape = tuple(shape)
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "moving_mean":
        val = rng.uniform(-0.3, 0.3, shape)
    elif leaf == "moving_variance":
        val = rng.uniform(0.5, 2.0, shape)
        val[::7] = TINY_VARIANCE
    elif leaf == "gamma":
        val = rng.uniform(0.5, 1.5, shape)
        val[::7] *= np.sqrt(SLIM_RESNET_EPSILON)
    elif len(shape) >= 2:
        val = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
        val = rng.standard_normal(shape) * 0.1
    return val.astype(np.float32)


# --------------------------------------------------------------------------- slim


def session_config() -> Any:
    from ckptbridge.tf.compat import import_tensorflow

    tf = import_tensorflow()
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True  # each graph runs a few times only
    return config


@dataclasses.dataclass
class SlimNet:
    """One slim net in its graph, for any image size: its logits (background class at 0) and last feature map."""

    net: str
    graph: Any
    images: Any
    logits: Any
    features: Any

    def run(self, ckpt: str, xs: Mapping[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Restored from ``ckpt``: for each image size, the logits and the feature map."""
        from ckptbridge.tf.compat import import_tensorflow

        tf = import_tensorflow()
        with self.graph.as_default(), tf.compat.v1.Session(config=session_config()) as s:
            tf.compat.v1.train.Saver().restore(s, ckpt)
            return {n: self._outputs(s, x) for n, x in xs.items()}

    def save_random(self, prefix: str, seed: int, xs: Mapping[int, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Random values (:func:`random_value`) saved at ``prefix`` by TensorFlow's Saver; the outputs on ``xs``."""
        from ckptbridge.tf.compat import import_tensorflow

        tf = import_tensorflow()
        rng = np.random.default_rng(seed)
        with self.graph.as_default(), tf.compat.v1.Session(config=session_config()) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for v in tf.compat.v1.global_variables():
                if v.dtype.base_dtype.is_floating:
                    v.load(random_value(rng, v.op.name, v.shape.as_list()), s)
            tf.compat.v1.train.Saver().save(s, prefix)
            return {n: self._outputs(s, x) for n, x in xs.items()}

    def _outputs(self, s: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = s.run([self.logits, self.features], {self.images: x})
        return logits.reshape(len(x), -1), features


def slim_net(net: str) -> SlimNet:
    """The slim net as ckptbridge builds it (its own arg_scope), with an image placeholder of any size."""
    from ckptbridge.tf.compat import import_slim, import_tensorflow
    from ckptbridge.tf.slim import NETS as SLIM_NETS

    tf = import_tensorflow()
    slim = import_slim()
    info = SLIM_NETS[net]
    mod = importlib.import_module(info.module)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
        with slim.arg_scope(getattr(mod, info.arg_scope)()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits, _ = getattr(mod, info.function)(images, num_classes=info.num_classes, is_training=False)
    return SlimNet(net, graph, images, logits, graph.get_tensor_by_name(f"{net}/postnorm/Relu:0"))


# --------------------------------------------------------------------------- Keras


def keras_model(cls: str) -> Any:
    import keras

    return getattr(keras.applications, cls)(weights=None, classifier_activation=None)


def any_size(model: Any) -> Any:
    """``model`` as shipped (Keras' pool1 and epsilon), with an input of any size: to measure it at 321."""
    import keras

    clone = keras.models.clone_model(model, input_tensors=keras.Input((None, None, 3)))
    clone.set_weights(model.get_weights())
    return clone


def keras_run(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the last feature map (``post_relu``)."""
    import keras

    both = keras.Model(model.inputs, [model.output, model.get_layer("post_relu").output])
    logits, features = both(x, training=False)
    return np.asarray(logits), np.asarray(features)


def randomize_constants(model: Any, seed: int) -> None:
    """Keras starts gammas, betas, moving statistics and biases as constants, which cannot show a swap
    of two of them: draw those at random; the kernels keep Keras' own initial values."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        leaf = v.path.rsplit("/", 1)[-1]
        if leaf != "kernel":
            v.assign(random_value(rng, leaf, tuple(v.shape)))


_UNIT = re.compile(r"conv(\d)_block(\d+)_(preact_bn|(\d)_(conv|bn))$")


def slim_names(net: str, layer: Any) -> list[str]:
    """The slim tensors a Keras ResNetV2 layer holds, from the layer's own name (not the map's numbers)."""
    if not layer.weights:
        return []
    if layer.name == "conv1_conv":
        scope = f"{net}/conv1"
    elif layer.name == "post_bn":
        scope = f"{net}/postnorm"
    elif layer.name == "predictions":
        scope = f"{net}/logits"
    else:
        m = _UNIT.match(layer.name)
        assert m, layer.name
        unit = f"{net}/block{int(m.group(1)) - 1}/unit_{m.group(2)}/bottleneck_v2"
        if m.group(3) == "preact_bn":
            scope = f"{unit}/preact"
        else:
            k = m.group(4)
            scope = f"{unit}/{'shortcut' if k == '0' else 'conv' + k}" + ("/BatchNorm" if m.group(5) == "bn" else "")
    leaves = {"kernel": "weights", "bias": "biases"}
    return [f"{scope}/{leaves.get(v.path.rsplit('/', 1)[-1], v.path.rsplit('/', 1)[-1])}" for v in layer.weights]


def as_keras(name: str, arr: np.ndarray) -> np.ndarray:
    """A slim logits tensor as Keras' Dense holds it: [1, 1, in, 1001] -> [in, 1000], background dropped."""
    if name.endswith("/logits/weights"):
        return np.ascontiguousarray(arr[0, 0, :, 1:])
    return np.ascontiguousarray(arr[1:]) if name.endswith("/logits/biases") else arr


# --------------------------------------------------------------------------- the proof


def _params() -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n != "keras:ResNet50V2" else n for n in NETS]


@pytest.fixture(scope="module", params=_params())
def case(request: pytest.FixtureRequest, module_tmp: Any) -> Iterator[dict[str, Any]]:
    """One map: a random slim checkpoint and its outputs at both sizes; the export in Keras as shipped and
    matched; a Keras model's own weights imported back, with the slim and the matched Keras outputs."""
    name = request.param
    net, cls, seed = NETS[name]
    d = module_tmp(net)
    slim = slim_net(net)
    prefix = str(d / "slim" / "model.ckpt")
    x = {n: image(n) for n in SIZES}
    ref = slim.save_random(prefix, seed, x)
    h5 = str(d / "model.weights.h5")
    report = ckptbridge.export(prefix, h5, ckptbridge.Port(name))
    model = keras_model(cls)
    model.load_weights(h5)
    matched = match_keras(model, name)
    shipped = {224: keras_run(model, x[224]), 321: keras_run(any_size(model), x[321])}
    got = {n: keras_run(matched, x[n]) for n in SIZES}
    # the other way: Keras' own initial kernels, random constants
    own = keras_model(cls)
    randomize_constants(own, seed + 1)
    kfile = str(d / "keras.weights.h5")
    own.save_weights(kfile)
    own_weights = own.get_weights()
    own_matched = match_keras(own, name)
    kref = {n: keras_run(own_matched, x[n]) for n in SIZES}
    back = str(d / "back" / "model.ckpt")
    ckptbridge.rebuild(kfile, back, ckptbridge.Port(name), graph=ckptbridge.Graph(net))
    imported = slim.run(back, x)
    yield {"name": name, "net": net, "cls": cls, "x": x, "dir": d, "h5": h5, "report": report, "ref": ref, "model": model,
           "matched": matched, "shipped": shipped, "got": got, "own": own, "own_weights": own_weights, "own_matched": own_matched,
           "kref": kref, "imported": imported}
    del model, matched, own, own_matched


@pytest.mark.parametrize("size", SIZES)
def test_matched_keras_computes_the_slim_logits_and_features(case: dict[str, Any], size: int) -> None:
    logits, features = case["ref"][size]
    logits = logits[:, 1:]  # TensorFlow's background class, which the map drops
    got_logits, got_features = case["got"][size]
    shipped_logits, shipped_features = case["shipped"][size]
    d, f = rel(got_logits, logits), rel(got_features, features)
    s, sf = rel(shipped_logits, logits), rel(shipped_features, features)
    print(f"{case['name']} at {size}: as shipped {s:.3g} (features {sf:.3g}), matched {d:.3g} (features {f:.3g})")  # noqa: T201 (measured, seen with pytest -s)
    assert s > 100 * AGREE  # the caveats are real: the comparison can fail
    assert d < AGREE and f < AGREE


def test_the_epsilon_matters_with_a_near_zero_moving_variance(case: dict[str, Any]) -> None:
    """The matched clone with Keras' epsilon put back: pool1 is slim's, but the 1e-8 channels are off by 5e-4."""
    import keras

    matched = case["matched"]
    norms = [layer for layer in matched.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.epsilon == SLIM_RESNET_EPSILON for layer in norms)
    try:
        for layer in norms:
            layer.epsilon = 1.001e-5
        logits, _ = keras_run(matched, case["x"][224])
    finally:
        for layer in norms:
            layer.epsilon = SLIM_RESNET_EPSILON
    d = rel(logits, case["ref"][224][0][:, 1:])
    print(f"{case['name']}: pool1 matched, Keras' epsilon: {d:.3g}")  # noqa: T201 (measured, seen with pytest -s)
    assert d > 10 * AGREE


def test_import_of_keras_own_weights_gives_the_matched_logits(case: dict[str, Any]) -> None:
    for size in SIZES:
        logits, features = case["imported"][size]
        assert np.all(logits[:, 0] == 0.0)  # the background class comes back as zeros: its logit is 0
        klogits, kfeatures = case["kref"][size]
        d, f = rel(logits[:, 1:], klogits), rel(features, kfeatures)
        print(f"{case['name']} at {size}: import, matched Keras against slim {d:.3g} (features {f:.3g})")  # noqa: T201 (measured, seen with pytest -s)
        assert d < AGREE and f < AGREE


def test_the_clone_keeps_names_weights_and_file_keys(case: dict[str, Any]) -> None:
    """Same layer names and classes in the same order (so the same .weights.h5 keys), same variable
    paths, bit-equal weights; the export loads into the clone as it does into the model."""
    model, matched = case["model"], case["matched"]
    assert matched is not model
    assert [(type(a).__name__, a.name) for a in model.layers[1:]] == [(type(b).__name__, b.name) for b in matched.layers[1:]]
    assert [v.path for v in model.weights] == [v.path for v in matched.weights]
    assert all(same(np.asarray(a), np.asarray(b)) for a, b in zip(model.weights, matched.weights, strict=True))
    assert matched.get_layer("pool1_pool").padding == "same" and model.get_layer("pool1_pool").padding == "valid"
    assert tuple(map(tuple, matched.get_layer("pool1_pad").padding)) == ((0, 0), (0, 0))
    clone = case["own_matched"]  # the clone of the Keras model the import began from (its outputs are taken)
    clone.load_weights(case["h5"])
    assert all(same(np.asarray(a), np.asarray(b)) for a, b in zip(clone.weights, model.weights, strict=True))
    assert all(same(np.asarray(a), b) for a, b in zip(case["own"].weights, case["own_weights"], strict=True))  # its original: untouched


def test_every_keras_layer_holds_its_slim_tensors(case: dict[str, Any]) -> None:
    """Found by the Keras layer's own name, not by the map's numbers: a numbering slip that keeps shapes shows here."""
    from ckptbridge.tf.compat import import_tensorflow

    tf = import_tensorflow()
    reader = tf.train.load_checkpoint(str(case["dir"] / "slim" / "model.ckpt"))
    checked = 0
    for layer in case["model"].layers:
        for v, name in zip(layer.weights, slim_names(case["net"], layer), strict=True):
            assert same(np.asarray(v), as_keras(name, reader.get_tensor(name))), (layer.name, name)
            checked += 1
    assert checked == len(ckptbridge.port_map(case["name"]).rules)


def test_the_report_names_both_caveats(case: dict[str, Any]) -> None:
    assert [c.split(":")[0] for c in case["report"].caveats] == ["pooling", "epsilon"]
    assert case["report"].dropped == {}


# --------------------------------------------------------------------------- 101 and 152, fast


@pytest.fixture(scope="module", params=["keras:ResNet101V2", "keras:ResNet152V2"])
def deep(request: pytest.FixtureRequest, module_tmp: Any) -> Iterator[dict[str, Any]]:
    """Arrays under slim's names and shapes (from each Keras layer's name), exported and loaded by Keras."""
    name = request.param
    net, cls, seed = NETS[name]
    d = module_tmp(net + "_load")
    model = keras_model(cls)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for layer in model.layers:
        for v, slim in zip(layer.weights, slim_names(net, layer), strict=True):
            shape = tuple(v.shape)
            if slim.endswith("/logits/weights"):
                shape = (1, 1, shape[0], shape[1] + 1)
            elif slim.endswith("/logits/biases"):
                shape = (shape[0] + 1,)
            arrays[slim] = random_value(rng, slim, shape)
    prefix = str(d / "slim" / "model.ckpt")
    ckptbridge.save(arrays, prefix)
    h5 = str(d / "model.weights.h5")
    ckptbridge.export(prefix, h5, ckptbridge.Port(name))
    model.load_weights(h5)
    yield {"name": name, "net": net, "dir": d, "arrays": arrays, "model": model, "h5": h5}
    del model


def test_deep_maps_load_every_layer_with_its_tensors(deep: dict[str, Any]) -> None:
    checked = 0
    for layer in deep["model"].layers:
        for v, name in zip(layer.weights, slim_names(deep["net"], layer), strict=True):
            assert same(np.asarray(v), as_keras(name, deep["arrays"][name])), (layer.name, name)
            checked += 1
    assert checked == len(deep["arrays"]) == len(ckptbridge.port_map(deep["name"]).rules)


def test_deep_maps_import_back_to_the_slim_names(deep: dict[str, Any]) -> None:
    """Graph-free import of the export: the slim tensors again, the background row as zeros."""
    back = str(deep["dir"] / "back" / "model.ckpt")
    ckptbridge.rebuild(deep["h5"], back, ckptbridge.Port(deep["name"]))
    got = ckptbridge.load(back)
    assert sorted(got) == sorted(deep["arrays"])
    for name, arr in deep["arrays"].items():
        if "/logits/" in name:
            assert same(got[name][..., 1:], np.ascontiguousarray(arr[..., 1:])) and not got[name][..., 0].any(), name
        else:
            assert same(got[name], arr), name


# --------------------------------------------------------------------------- match_keras, small


def test_a_map_without_caveats_keeps_the_model() -> None:
    model = object()
    assert match_keras(model, "keras:VGG16") is model
    assert match_keras(model, ckptbridge.port_map("keras:InceptionV3")) is model


def test_a_model_that_is_not_the_destination_is_refused() -> None:
    import keras

    small = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.MaxPooling2D(name="pool1_pool")])
    with pytest.raises(ckptbridge.MismatchError, match="'pool1_pad' should be a ZeroPadding2D, found no such layer; build keras.applications"):
        match_keras(small, "keras:ResNet50V2")
    unknown = dataclasses.replace(ckptbridge.port_map("keras:ResNet50V2"), name="mine", net="resnet_v2_200")
    with pytest.raises(ckptbridge.CkptBridgeError, match="port map mine has caveats \\(epsilon, pooling\\) for tf-slim net resnet_v2_200"):
        match_keras(small, unknown)


def test_matching_imports_keras_only_when_it_matches() -> None:
    probe = ("import sys, ckptbridge.ports._match_keras as m; m.match_keras(object(), 'keras:VGG16'); "
             "print(sorted({'keras', 'tensorflow', 'torch'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
