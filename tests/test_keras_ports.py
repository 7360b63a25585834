"""The proof of the Keras port maps: a tf-slim net and Keras 3's keras.applications model compute the same logits.

For every built-in ``keras:*`` map:

1. TensorFlow builds the tf-slim net (``is_training=False``) with random weights, biases, batch-norm
   betas and moving statistics away from 0 and 1, saves it, and computes its logits on 2 images;
2. ``export --to keras:X`` writes a ``.weights.h5`` (ckptbridge's HDF5 archive, with its own
   ``.ckptbridge`` group beside the ``layers/...`` paths);
3. Keras 3 builds ``keras.applications.X(weights=None, classifier_activation=None)``, and
   ``load_weights`` takes that file; its logits equal the slim net's (background class dropped)
   within 1e-5 relative: these architectures match, so anything looser is a bug in the map;
4. the other way: a Keras model with random weights, ``save_weights``, ``import --from keras:X
   --model NET``, restored by TensorFlow's Saver in a fresh slim graph: the same logits, and the
   background logit inserted by import is exactly 0.

Step 4 reads the file Keras wrote: ckptbridge shows a Keras 3 ``.weights.h5`` under readable names
(``conv2d/0``), keeping the HDF5 paths (``layers/conv2d/vars/0``) as ``original_names``, which the
port engine looks the map's names up in (``test_import_from_keras_file``: the same checkpoint as
through an ``.npz`` holding the arrays under the HDF5 paths).

TensorFlow's graph mode (slim) and Keras 3 eager share this process: each slim net lives in a graph
of its own.  Each net is built and saved once per module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")
pytest.importorskip("h5py")

import ckptbridge  # noqa: E402

from helpers import cli  # noqa: E402

pytestmark = pytest.mark.tf

BATCH = 2
AGREE = 1e-5  # max|keras - slim| / max|slim|
#: map -> (tf-slim net, keras.applications constructor, image size, seed)
NETS = {
    "keras:VGG16": ("vgg_16", "VGG16", 224, 16),
    "keras:VGG19": ("vgg_19", "VGG19", 224, 19),
    "keras:InceptionV3": ("inception_v3", "InceptionV3", 299, 3),
}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def images(size: int) -> np.ndarray:
    return np.random.default_rng(7).uniform(-1.0, 1.0, (BATCH, size, size, 3)).astype(np.float32)


def random_value(rng: np.random.Generator, name: str, shape: Any, dtype: Any) -> np.ndarray:
    """He-scaled kernels, small biases and betas, moving statistics away from 0 and 1 (as tests/test_ports.py)."""
    shape = list(shape)
    if name.endswith("moving_mean"):
        val = rng.uniform(-0.3, 0.3, shape)
    elif name.endswith("moving_variance"):
        val = rng.uniform(0.5, 2.0, shape)
    elif len(shape) >= 2:
        val = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
        val = rng.standard_normal(shape) * 0.1
    return val.astype(dtype)


def session_config() -> Any:
    from ckptbridge.tf.compat import import_tensorflow

    tf = import_tensorflow()
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True  # each graph runs once
    return config


def slim_logits(net: str, ckpt: str, x: np.ndarray) -> np.ndarray:
    """The slim net's logits on ``x``, restored from ``ckpt`` by TensorFlow's Saver in a fresh graph."""
    from ckptbridge.tf.compat import import_tensorflow
    from ckptbridge.tf.slim import build_net

    tf = import_tensorflow()
    g, inp, logits = build_net(net, None, None)
    with g.as_default(), tf.compat.v1.Session(config=session_config()) as s:
        tf.compat.v1.train.Saver().restore(s, ckpt)
        return s.run(logits, {inp: x})


def make_slim(net: str, prefix: str, x: np.ndarray, seed: int) -> np.ndarray:
    """A random slim checkpoint at ``prefix``; its logits on ``x``."""
    from ckptbridge.tf.compat import import_tensorflow
    from ckptbridge.tf.slim import build_net

    tf = import_tensorflow()
    rng = np.random.default_rng(seed)
    g, inp, logits = build_net(net, None, None)
    with g.as_default(), tf.compat.v1.Session(config=session_config()) as s:
        s.run(tf.compat.v1.global_variables_initializer())
        for v in tf.compat.v1.global_variables():
            if v.dtype.base_dtype.is_floating:
                v.load(random_value(rng, v.op.name, v.shape.as_list(), v.dtype.as_numpy_dtype), s)
        tf.compat.v1.train.Saver().save(s, prefix)
        return s.run(logits, {inp: x})


def keras_model(cls: str) -> Any:
    import keras

    return getattr(keras.applications, cls)(weights=None, classifier_activation=None)


# keras:VGG19 runs with scripts/test --slow (the suite's time budget): VGG16 proves the same layer kinds.


def keras_logits(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n == "keras:VGG19" else n for n in sorted(NETS)])
def case(request: pytest.FixtureRequest, module_tmp: Any) -> Iterator[dict[str, Any]]:
    """One map: the random slim checkpoint, its logits, the export, and a random Keras model's save_weights."""
    name = request.param
    net, cls, size, seed = NETS[name]
    d = module_tmp(name.replace(":", "_"))
    x = images(size)
    prefix = str(d / "slim" / "model.ckpt")
    ref = make_slim(net, prefix, x, seed)
    h5 = str(d / "model.weights.h5")
    if name == "keras:InceptionV3":  # the one-liner as a user runs it (91 MiB; the VGGs go in-process)
        r = cli("export", prefix, h5, "--to", name)
        assert r.returncode == 0, r.stderr
        out = r.stdout + r.stderr
    else:
        ckptbridge.export(prefix, h5, ckptbridge.Port(name))
        out = ""
    model = keras_model(cls)
    model.load_weights(h5)
    exported = keras_logits(model, x)
    # the other way: a Keras model with random weights and batch-norm statistics
    rng = np.random.default_rng(seed + 100)
    for v in model.weights:
        v.assign(random_value(rng, v.path, tuple(v.shape), np.float32))
    kfile = str(d / "keras.weights.h5")
    model.save_weights(kfile)
    kref = keras_logits(model, x)
    del model
    yield {"name": name, "net": net, "cls": cls, "x": x, "dir": d, "prefix": prefix, "ref": ref, "h5": h5,
           "cli_out": out, "exported": exported, "kfile": kfile, "kref": kref}
    shutil.rmtree(d, ignore_errors=True)  # one net's files at a time (VGG16's are 3.7 GB)


def test_export_loads_in_keras_with_the_slim_logits(case: dict[str, Any]) -> None:
    ref = case["ref"]
    if ref.shape[-1] == 1001:
        ref = ref[:, 1:]  # TensorFlow's background class, which the map drops
    assert rel(ref[0], ref[1]) > 100 * AGREE  # logits that depend on the image: a real comparison
    d = rel(case["exported"], ref)
    print(f"{case['name']}: export, relative logit difference {d:.3g}")
    assert d < AGREE


def test_export_file_is_ckptbridge_hdf5_with_keras_paths(case: dict[str, Any]) -> None:
    """Keras' loader takes the file with ckptbridge's own metadata group beside the layers (checked above)."""
    import h5py

    with h5py.File(case["h5"], "r") as f:
        assert ".ckptbridge" in f
        assert "layers" in f
        pmap = ckptbridge.port_map(case["name"])
        for r in pmap.rules:
            assert r.dest in f, r.dest


def test_inception_cli_reports_auxlogits_dropped(case: dict[str, Any]) -> None:
    if case["name"] != "keras:InceptionV3":
        pytest.skip("inception_v3 only: Keras' InceptionV3 has no auxiliary head")
    assert "dropped InceptionV3/AuxLogits/Conv2d_2b_1x1/weights: skipped by port map keras:InceptionV3" in case["cli_out"]


def raw_npz(kfile: str, out: str) -> None:
    """The arrays Keras wrote, under their HDF5 paths (layers/<class>[_N]/vars/<i>), as an .npz."""
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(kfile, "r") as f:
        f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    np.savez(out, **arrays)


def test_import_from_keras_weights_restores_in_slim(case: dict[str, Any]) -> None:
    d = case["dir"]
    back = str(d / "back" / "model.ckpt")
    # The file Keras wrote, as a user has it.  Keras' InceptionV3 has no auxiliary head: slim's
    # AuxLogits stay at their initializer (--allow-missing).
    ckptbridge.rebuild(case["kfile"], back, ckptbridge.Port(case["name"]),
                       graph=ckptbridge.Graph(case["net"], allow_missing=case["net"] == "inception_v3"))
    got = slim_logits(case["net"], back, case["x"])
    kref = case["kref"]
    if got.shape[-1] == 1001:
        assert np.all(got[:, 0] == 0.0)  # the background class comes back as zeros: its logit is 0
        got = got[:, 1:]
    assert rel(kref[0], kref[1]) > 100 * AGREE
    diff = rel(got, kref)
    print(f"{case['name']}: import, relative logit difference {diff:.3g}")
    assert diff < AGREE


def test_import_from_keras_file(case: dict[str, Any]) -> None:
    """The file Keras itself wrote, read under its readable names, goes back through the map by its stored paths."""
    npz = str(case["dir"] / "keras_raw.npz")
    raw_npz(case["kfile"], npz)
    back = str(case["dir"] / "direct" / "model.ckpt")
    via_npz = str(case["dir"] / "direct_npz" / "model.ckpt")
    ckptbridge.rebuild(case["kfile"], back, ckptbridge.Port(case["name"]))
    ckptbridge.rebuild(npz, via_npz, ckptbridge.Port(case["name"]))
    d = ckptbridge.diff(back, via_npz)
    assert d.identical and d.compared > 30
