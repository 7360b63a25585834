"""The import direction: archive -> TensorFlow checkpoint.

Through the tf-slim graph (``rebuild(..., model=...)``): a fresh slim graph
restores the result with a plain ``Saver``, every variable equals the archive
bit for bit, and the logits equal those of the original checkpoint on the same
input.  Graph-free: checkpoint -> archive -> checkpoint is bit-exact against
``tf.train.load_checkpoint`` of the original, for every layout and dtype the
fixtures in conftest.py build.  TensorFlow is the oracle throughout.
"""

from __future__ import annotations

import glob
import os
import sys
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

from tf_slim.nets import inception, resnet_v1, vgg  # noqa: E402

import ckptbridge  # noqa: E402
from ckptbridge.errors import CkptBridgeError, CorruptError, FormatError, MismatchError, OutputExistsError  # noqa: E402

import tf_checkpoints as C  # noqa: E402  (tests/ is on sys.path through conftest.py)
from helpers import assert_one_line_error, cli, leftovers  # noqa: E402

pytestmark = pytest.mark.tf

tf = C.tf
slim = C.slim
V1 = tf.compat.v1
EMA = "/ExponentialMovingAverage"
OBJECT_GRAPH_KEY = C.OBJECT_GRAPH_KEY

# name -> (net function, arg scope, input size used for the logits check)
NETS = {
    "resnet_v1_50": (resnet_v1.resnet_v1_50, resnet_v1.resnet_arg_scope, 96),
    "inception_v3": (inception.inception_v3, inception.inception_v3_arg_scope, 299),
    "vgg_16": (vgg.vgg_16, vgg.vgg_arg_scope, 224),
}


# --------------------------------------------------------------------------- helpers


class TfCheckpoint(Mapping[str, np.ndarray]):
    """A checkpoint as TensorFlow's own reader sees it (the oracle), minus the object graph."""

    def __init__(self, prefix: str) -> None:
        self.reader = tf.train.load_checkpoint(str(prefix))
        self.shapes = self.reader.get_variable_to_shape_map()
        self.dtypes = self.reader.get_variable_to_dtype_map()
        self.names = sorted(n for n in self.shapes if n != OBJECT_GRAPH_KEY)

    def __getitem__(self, name: str) -> np.ndarray:
        return C._tf_value(self.reader, name, self.dtypes[name], tuple(self.shapes[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _session() -> Any:
    config = V1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return V1.Session(config=config)


def _build(model: str, num_classes: int = 10) -> tuple[Any, Any]:
    """The net as a user would build it for inference, independently of ckptbridge's registry."""
    fn, scope, size = NETS[model]
    images = V1.placeholder(tf.float32, [None, size, size, 3], name="images")
    with slim.arg_scope(scope()):
        logits, _ = fn(images, num_classes=num_classes, is_training=False)
    return images, logits


def _no_tmp_left(root: Any) -> None:
    left = leftovers(root)
    assert not left, f"temporary files left behind: {left}"


def assert_graph_restores(model: str, archive: str, original: str, rebuilt: list[str], *, batch: int = 2) -> None:
    """In a fresh graph, a plain Saver restores each rebuilt checkpoint; variables equal
    the archive bit for bit and the logits equal those of ``original`` on one input."""
    size = NETS[model][2]
    x = np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)
    with tf.Graph().as_default():
        images, logits = _build(model)
        variables = V1.global_variables()
        saver = V1.train.Saver()
        init = V1.global_variables_initializer()
        with _session() as sess, ckptbridge.read(archive) as arch:
            saver.restore(sess, original)
            want = sess.run(logits, {images: x})
            assert want.reshape(batch, -1).shape == (batch, 10) and np.isfinite(want).all()
            for prefix in rebuilt:
                sess.run(init)  # back to random values, so a restore that restored nothing fails
                saver.restore(sess, prefix)
                values = sess.run(variables)
                for var, got in zip(variables, values):
                    C.assert_same_array(np.asarray(got), arch[var.op.name], f"{prefix}: {var.op.name}")
                got_logits = sess.run(logits, {images: x})
                assert got_logits.dtype == want.dtype
                assert got_logits.tobytes() == want.tobytes(), f"{prefix}: logits differ from the original model's"


def assert_meta_graph(prefix: str, archive: str, *, max_bytes: int) -> None:
    """The .meta imports and restores; it is small and holds no weights as constants."""
    meta_path = prefix + ".meta"
    with open(meta_path, "rb") as f:
        blob = f.read()
    assert len(blob) < max_bytes, f"{meta_path} is {len(blob)} bytes"
    meta = V1.MetaGraphDef()
    meta.ParseFromString(blob)
    consts = [(n.name, len(n.attr["value"].tensor.tensor_content), n.attr["value"].tensor.ByteSize()) for n in meta.graph_def.node if n.op == "Const"]
    # the largest legitimate constants are the Saver's lists of tensor names (24 KB for inception_v3)
    big = [c for c in consts if c[1] > 4096 or c[2] > 32 << 10]
    assert not big, f"graph constants holding data: {big[:5]}"
    assert not any("ckptbridge_feed" in n.name for n in meta.graph_def.node), "feed placeholders leaked into the .meta"
    with tf.Graph().as_default():
        saver = V1.train.import_meta_graph(meta_path)
        variables = V1.global_variables()
        assert variables
        with _session() as sess, ckptbridge.read(archive) as arch:
            saver.restore(sess, prefix)
            for var, got in zip(variables, sess.run(variables)):
                C.assert_same_array(np.asarray(got), arch[var.op.name], var.op.name)


def assert_state_file(prefix: str) -> None:
    directory = os.path.dirname(prefix)
    assert tf.train.latest_checkpoint(directory) == prefix
    with open(os.path.join(directory, "checkpoint")) as f:
        assert f'model_checkpoint_path: "{os.path.basename(prefix)}"' in f.read()


# --------------------------------------------------------------------------- archives


@pytest.fixture(scope="module")
def archive_of(module_tmp: Any) -> Any:
    """``archive_of(checkpoint, "npz"|"h5")``: the checkpoint exported once per module."""
    cache: dict[tuple[str, str], str] = {}
    root = module_tmp("archives")

    def get(checkpoint: str, fmt: str) -> str:
        key = (checkpoint, fmt)
        if key not in cache:
            path = os.path.join(str(root), f"a{len(cache)}.{fmt}")
            ckptbridge.export(checkpoint, path)
            cache[key] = path
        return cache[key]

    return get


# --------------------------------------------------------------------------- through the slim graph


@pytest.fixture(scope="module")
def inception_random(module_tmp: Any) -> str:
    """A random-init inception_v3 (num_classes=10) built for its usual 299x299 input.

    conftest's trained inception is built for 139x139 inputs, for which tf-slim
    names and shapes the AuxLogits head differently (Conv2d_2a_3x3 instead of
    Conv2d_2a_5x5), so that checkpoint does not fit the standard inception_v3 graph.
    """
    prefix = str(module_tmp("inception_random") / "model.ckpt")
    with tf.Graph().as_default():
        V1.set_random_seed(3)
        images = V1.placeholder(tf.float32, [None, 299, 299, 3])
        with slim.arg_scope(inception.inception_v3_arg_scope()):
            inception.inception_v3(images, num_classes=10, is_training=False)
        with _session() as sess:
            sess.run(V1.global_variables_initializer())
            V1.train.Saver().save(sess, prefix, write_meta_graph=False, write_state=False)
    return prefix



@pytest.fixture
def slice_spy(monkeypatch: Any) -> list[str]:
    """The names of the variables the Saver path feeds in row slices."""
    from ckptbridge.tf import feeds

    sliced: list[str] = []
    real = feeds._slice_ops

    def spy(tf_: Any, var: Any) -> Any:
        sliced.append(var.op.name)
        return real(tf_, var)

    monkeypatch.setattr(feeds, "_slice_ops", spy)
    return sliced


@pytest.mark.parametrize(
    "model,fixture,saver_fmt,native_fmt,chunk_bytes",
    [
        # 52 KB: every variable over it goes through its placeholder in row slices
        ("resnet_v1_50", "resnet_v2", "npz", "npz", 52 << 10),
        ("inception_v3", "inception_random", "h5", "npz", 64 << 20),
    ],
)
def test_rebuild_restores_and_logits_match(
    model: str, fixture: str, saver_fmt: str, native_fmt: str, chunk_bytes: int, request: Any, archive_of: Any, tmp_path: Any, slice_spy: list[str]
) -> None:
    """One archive through the Saver path, the other through the native writer; both
    restore into a fresh graph with the archive's values and the original logits."""
    original = request.getfixturevalue(fixture)
    a_saver, a_native = archive_of(original, saver_fmt), archive_of(original, native_fmt)
    out_auto = str(tmp_path / "auto" / "model.ckpt")
    out_native = str(tmp_path / "native" / "model.ckpt")
    r1 = ckptbridge.rebuild(a_saver, out_auto, graph=ckptbridge.Graph(model, chunk_bytes=chunk_bytes),
                            engine="tf")  # num_classes inferred: 10, not the net's default
    r2 = ckptbridge.rebuild(a_native, out_native, graph=ckptbridge.Graph(model))  # the native writer, the default
    if chunk_bytes < 1 << 20:
        assert f"{model}/block1/unit_1/bottleneck_v1/conv2/weights" in slice_spy  # [3, 3, 64, 64]: 3 slices
    else:
        assert slice_spy == []

    ckpt_vars = TfCheckpoint(original).names
    trained = fixture == "resnet_v2"  # one Momentum step with EMA
    for report in (r1, r2):
        assert report.missing == []
        assert set(report.written) == {n for n in ckpt_vars if not n.endswith(("/Momentum", EMA)) and n != "global_step"}
        # every Momentum slot, EMA shadow and the step are reported as skipped, and nothing else
        assert set(report.dropped) == set(ckpt_vars) - set(report.written)
        if trained:
            assert any(n.endswith("/Momentum") for n in report.dropped) and any(n.endswith(EMA) for n in report.dropped)
            assert "global_step" in report.dropped
    for out in (out_auto, out_native):
        assert set(TfCheckpoint(out).names) == set(r1.written)
        assert_state_file(out)
    assert_graph_restores(model, a_saver, original, [out_auto, out_native], batch=2 if model == "resnet_v1_50" else 1)
    # the graph alone: 1.0 MB for resnet_v1_50, 1.5 MB for inception_v3 (their weights: 94 MB, 87 MB)
    assert_meta_graph(out_auto, a_saver, max_bytes=2 << 20)
    if model == "resnet_v1_50":
        assert_meta_graph(out_native, a_saver, max_bytes=2 << 20)


def test_rebuild_vgg16(vgg16_ckpt: str, tmp_path: Any) -> None:
    """vgg_16 (528 MB; fc6 alone 411 MB, more than the default 64 MB chunk) through the Saver path."""
    npz = str(tmp_path / "vgg.npz")
    ckptbridge.export(vgg16_ckpt, npz)
    out = str(tmp_path / "out" / "vgg_16.ckpt")
    report = ckptbridge.rebuild(npz, out, graph=ckptbridge.Graph("vgg_16"))
    assert report.dropped == {} and report.missing == []
    assert_graph_restores("vgg_16", npz, vgg16_ckpt, [out], batch=1)
    assert_meta_graph(out, npz, max_bytes=1 << 20)  # weights: 528 MB


def test_use_ema_takes_the_shadow_values(resnet_v2: str, archive_of: Any, tmp_path: Any) -> None:
    """Graph-free here (the model path is tested with a user model below): X gets X/ExponentialMovingAverage."""
    out = str(tmp_path / "model.ckpt")
    report = ckptbridge.rebuild(archive_of(resnet_v2, "npz"), out, ckptbridge.Naming(select=ckptbridge.Select(use_ema=True)))
    orig = TfCheckpoint(resnet_v2)
    trainable = [n for n in orig if n + EMA in orig.shapes]
    assert len(trainable) == 161 and report.ema_swaps == {n: n + EMA for n in trainable}
    assert set(report.dropped) == {n + EMA for n in trainable}
    got = TfCheckpoint(out)
    assert set(got) == set(report.written) == set(orig) - set(report.dropped)
    for name in got:
        C.assert_same_array(got[name], orig[report.ema_swaps.get(name, name)], name)
    # the swap is real: a trainable variable's value differs from its shadow
    w = "resnet_v1_50/conv1/weights"
    assert got[w].tobytes() != orig[w].tobytes()


def test_missing_variables_are_an_error_that_lists_them(resnet_v2: str, archive_of: Any, tmp_path: Any) -> None:
    out = tmp_path / "out" / "model.ckpt"
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(archive_of(resnet_v2, "npz"), str(out), ckptbridge.Naming(select=ckptbridge.Select(exclude=["/logits/"])),
                           graph=ckptbridge.Graph("resnet_v1_50"))
    msg = str(e.value)
    assert "2 variables" in msg and "resnet_v1_50/logits/biases" in msg and "resnet_v1_50/logits/weights" in msg
    assert "pass allow_missing=True to leave them" in msg
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_variable_with_both_sides(resnet_v2: str, archive_of: Any, tmp_path: Any) -> None:
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(archive_of(resnet_v2, "npz"), str(tmp_path / "model.ckpt"), graph=ckptbridge.Graph("resnet_v1_50", num_classes=5))
    msg = str(e.value)
    assert "resnet_v1_50/logits/weights" in msg and "resnet_v1_50/logits/biases" in msg
    assert "float32[1, 1, 2048, 5]" in msg and "float32[1, 1, 2048, 10]" in msg
    assert "float32[5]" in msg and "float32[10]" in msg
    assert os.listdir(tmp_path) == []


def test_unknown_model_lists_the_choices(tmp_path: Any) -> None:
    npz = str(tmp_path / "a.npz")
    np.savez(npz, w=np.zeros(3, np.float32))
    with pytest.raises(FormatError) as e:
        ckptbridge.rebuild(npz, str(tmp_path / "out" / "m.ckpt"), graph=ckptbridge.Graph("resnet_v9_50"))
    msg = str(e.value)
    for name in ("vgg_16", "resnet_v1_50", "resnet_v2_152", "inception_v3", "alexnet_v2", "overfeat"):
        assert name in msg
    assert "package.module:function" in msg
    with pytest.raises(FormatError, match="no_such_module_xyz"):
        ckptbridge.rebuild(npz, str(tmp_path / "out" / "m.ckpt"), graph=ckptbridge.Graph("no_such_module_xyz:build"))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a user's own model function

USER_MODEL = textwrap.dedent(
    '''
    import tensorflow as tf
    from ckptbridge.tf.compat import import_slim


    def build(num_classes=3):
        slim = import_slim()
        x = tf.compat.v1.placeholder(tf.float32, [None, 6], name="x")
        h = slim.fully_connected(x, 40, scope="tiny/fc1")
        # a resource variable of 60 KB: sliced when chunk_bytes is tiny
        table = tf.compat.v1.get_variable("tiny/table", [300, 50], use_resource=True)
        h = h + tf.reduce_sum(table)
        return slim.fully_connected(h, num_classes, activation_fn=None, scope="tiny/logits")
    '''
)


@pytest.fixture
def user_model(tmp_path: Any, monkeypatch: Any) -> str:
    d = tmp_path / "usermods"
    d.mkdir()
    (d / "ckb_tiny_model.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, "ckb_tiny_model", raising=False)
    return "ckb_tiny_model:build"


def tiny_values(num_classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "tiny/fc1/weights": f(6, 40),
        "tiny/fc1/biases": f(40),
        "tiny/table": f(300, 50),
        "tiny/logits/weights": f(40, num_classes),
        "tiny/logits/biases": f(num_classes),
    }


def _plain_npz(path: Any, values: dict[str, np.ndarray]) -> str:
    np.savez(str(path), **values)
    return str(path)


def _tiny_logits(model: str, prefix: str, num_classes: int = 3) -> np.ndarray:
    mod, _, fn = model.partition(":")
    with tf.Graph().as_default() as g:
        logits = getattr(__import__(mod), fn)(num_classes=num_classes)
        saver = V1.train.Saver()
        with _session() as sess:
            saver.restore(sess, prefix)
            x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
            return sess.run(logits, {g.get_tensor_by_name("x:0"): x})


@pytest.mark.parametrize("engine", ["tf", "auto"])
def test_user_model_function(user_model: str, engine: str, tmp_path: Any) -> None:
    values = tiny_values()
    extras = {
        "tiny/fc1/weights/Momentum": values["tiny/fc1/weights"] * 2,
        "tiny/fc1/weights" + EMA: values["tiny/fc1/weights"] * 3,
        "global_step": np.array(7, np.int64),
    }
    archive = _plain_npz(tmp_path / "tiny.npz", {**values, **extras})
    out = str(tmp_path / "out" / "model.ckpt")
    report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(user_model, chunk_bytes=52 << 10 if engine == "tf" else None), engine=engine)
    assert sorted(report.written) == sorted(values)
    assert set(report.dropped) == set(extras)
    got = TfCheckpoint(out)
    assert set(got) == set(values)
    for name, want in values.items():
        C.assert_same_array(got[name], want, name)
    assert_meta_graph(out, archive, max_bytes=1 << 16)
    assert_state_file(out)
    # logits of the rebuilt checkpoint are what the archive's weights give
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    h = np.maximum(x @ values["tiny/fc1/weights"] + values["tiny/fc1/biases"], 0) + values["tiny/table"].sum(dtype=np.float32)
    np.testing.assert_allclose(_tiny_logits(user_model, out), h @ values["tiny/logits/weights"] + values["tiny/logits/biases"], rtol=1e-4, atol=1e-3)

    # use_ema swaps the shadow in; strict refuses the extras
    out2 = str(tmp_path / "ema" / "model.ckpt")
    report = ckptbridge.rebuild(archive, out2, ckptbridge.Naming(select=ckptbridge.Select(use_ema=True)),
                                graph=ckptbridge.Graph(user_model), engine=engine)
    assert report.ema_swaps == {"tiny/fc1/weights": "tiny/fc1/weights" + EMA}
    C.assert_same_array(TfCheckpoint(out2)["tiny/fc1/weights"], extras["tiny/fc1/weights" + EMA], "ema")
    with pytest.raises(MismatchError, match=r"\(strict=True\)"):
        ckptbridge.rebuild(archive, str(tmp_path / "strict" / "m.ckpt"), graph=ckptbridge.Graph(user_model, strict=True), engine=engine)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("engine", ["tf", "auto"])
def test_allow_missing_leaves_initializers(user_model: str, engine: str, tmp_path: Any) -> None:
    values = tiny_values()
    del values["tiny/logits/biases"], values["tiny/fc1/biases"]
    archive = _plain_npz(tmp_path / "tiny.npz", values)
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(archive, str(tmp_path / "m.ckpt"), graph=ckptbridge.Graph(user_model), engine=engine)
    assert "tiny/fc1/biases" in str(e.value) and "tiny/logits/biases" in str(e.value)
    out = str(tmp_path / "out" / "model.ckpt")
    report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(user_model, allow_missing=True), engine=engine)
    assert report.missing == ["tiny/fc1/biases", "tiny/logits/biases"]
    got = TfCheckpoint(out)
    assert set(got) == set(values) | set(report.missing)
    for name in report.missing:  # slim biases start at zeros
        C.assert_same_array(got[name], np.zeros(got.shapes[name], np.float32), name)
    for name, want in values.items():
        C.assert_same_array(got[name], want, name)


def test_user_model_dtype_and_shape_mismatch(user_model: str, tmp_path: Any) -> None:
    values = tiny_values(num_classes=4)
    values["tiny/fc1/weights"] = values["tiny/fc1/weights"].astype(np.float64)
    archive = _plain_npz(tmp_path / "tiny.npz", values)
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(archive, str(tmp_path / "m.ckpt"), graph=ckptbridge.Graph(user_model))
    msg = str(e.value)
    assert "tiny/fc1/weights: graph float32[6, 40] vs archive float64[6, 40]" in msg
    assert "tiny/logits/weights: graph float32[40, 3] vs archive float32[40, 4]" in msg
    # num_classes is passed to the user's function when given
    values["tiny/fc1/weights"] = values["tiny/fc1/weights"].astype(np.float32)
    archive = _plain_npz(tmp_path / "tiny4.npz", values)
    ckptbridge.rebuild(archive, str(tmp_path / "out" / "m.ckpt"), graph=ckptbridge.Graph(user_model, num_classes=4))
    assert TfCheckpoint(str(tmp_path / "out" / "m.ckpt")).shapes["tiny/logits/weights"] == [40, 4]


def _corrupt(path: str, arr: np.ndarray) -> None:
    """Flip one bit inside ``arr``'s stored bytes (found verbatim in the file)."""
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    at = blob.find(arr.tobytes())
    assert at >= 0 and blob.find(arr.tobytes(), at + 1) < 0
    blob[at + arr.nbytes // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(blob)


def _tiny_ckptbridge_archive(tmp_path: Any, fmt: str) -> tuple[str, dict[str, np.ndarray]]:
    """A ckptbridge-written archive (with crc32c records) of the tiny model's values."""
    values = tiny_values()
    src = _plain_npz(tmp_path / "plain_src.npz", values)
    prefix = str(tmp_path / "src_ckpt" / "m.ckpt")
    ckptbridge.rebuild(src, prefix)
    archive = str(tmp_path / f"tiny.{fmt}")
    ckptbridge.export(prefix, archive)
    return archive, values


@pytest.mark.parametrize("engine", ["tf", "auto"])
def test_failure_while_writing_leaves_nothing(user_model: str, engine: str, tmp_path: Any) -> None:
    archive, values = _tiny_ckptbridge_archive(tmp_path, "npz")
    _corrupt(archive, values["tiny/table"])
    out = tmp_path / "new" / "sub" / "model.ckpt"
    with pytest.raises(CorruptError, match="tiny/table"):
        ckptbridge.rebuild(archive, str(out), graph=ckptbridge.Graph(user_model), engine=engine)
    assert not (tmp_path / "new").exists()
    _no_tmp_left(tmp_path)


def test_options_of_another_path_are_errors_not_ignored(user_model: str, tmp_path: Any) -> None:
    """Before, --chunk-mb was ignored without --model and --max-shard-mb with it, silently."""
    archive = _plain_npz(tmp_path / "tiny.npz", tiny_values())
    out = str(tmp_path / "out" / "model.ckpt")
    # the graph's options live on Graph: without one they have no place (the command line says which flags need --model)
    assert_one_line_error(cli("import", archive, out, "--chunk-mb", "1", "--num-classes", "3"),
                          "--chunk-mb, --num-classes apply to a rebuild through a graph; add --model")
    with pytest.raises(CkptBridgeError, match="chunk_bytes sizes the slices fed to TensorFlow's Saver, which writes only with engine='tf'"):
        ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(user_model, chunk_bytes=1 << 20))
    with pytest.raises(CkptBridgeError, match="max_shard_bytes splits the native writer's output"):
        ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(user_model), engine="tf", max_shard_bytes=1 << 20)
    assert not (tmp_path / "out").exists()
    report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(user_model), max_shard_bytes=20 << 10)  # native: 60 KB in several shards
    assert len(glob.glob(out + ".data-*")) > 1 and sorted(report.written) == sorted(tiny_values())


def test_existing_output_refused_without_force_with_model(user_model: str, tmp_path: Any) -> None:
    a = _plain_npz(tmp_path / "a.npz", tiny_values(seed=1))
    b_values = tiny_values(seed=2)
    b = _plain_npz(tmp_path / "b.npz", b_values)
    out = str(tmp_path / "out" / "model.ckpt")
    ckptbridge.rebuild(a, out, graph=ckptbridge.Graph(user_model))
    before = {p: open(p, "rb").read() for p in glob.glob(out + "*")}
    with pytest.raises(OutputExistsError):
        ckptbridge.rebuild(b, out, graph=ckptbridge.Graph(user_model))
    assert {p: open(p, "rb").read() for p in glob.glob(out + "*")} == before
    ckptbridge.rebuild(b, out, graph=ckptbridge.Graph(user_model), engine="native", force=True)
    got = TfCheckpoint(out)
    for name, want in b_values.items():
        C.assert_same_array(got[name], want, name)
    _no_tmp_left(tmp_path)


# --------------------------------------------------------------------------- graph-free round trips

FORMATS = ["npz", "h5"]
ENGINES = ["native", "tf"]
SMALL_CASES = ["sharded_ckpt", "partitioned_ckpt", "dtypes_ckpt", "tf2_ckpt"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", SMALL_CASES)
def test_graph_free_round_trip(case: str, fmt: str, engine: str, request: Any, archive_of: Any, tmp_path: Any) -> None:
    original = request.getfixturevalue(case)
    archive = archive_of(original, fmt)
    out = str(tmp_path / "out" / "model.ckpt")
    report = ckptbridge.rebuild(archive, out, engine=engine)
    n = C.assert_same_as_tf(TfCheckpoint(out), original)
    assert n == len(report.written) and report.dropped == {}
    orig, got = tf.train.load_checkpoint(original), tf.train.load_checkpoint(out)
    has_graph = OBJECT_GRAPH_KEY in orig.get_variable_to_shape_map()
    assert has_graph == (case == "tf2_ckpt")
    assert (OBJECT_GRAPH_KEY in got.get_variable_to_shape_map()) == has_graph
    if has_graph:
        assert got.get_tensor(OBJECT_GRAPH_KEY) == orig.get_tensor(OBJECT_GRAPH_KEY)
    assert_state_file(out)


@pytest.mark.parametrize(
    "case,fmt,engine",
    [("resnet_v2", "npz", "native"), ("resnet_v1", "h5", "tf")],
)
def test_graph_free_round_trip_trained(case: str, fmt: str, engine: str, request: Any, archive_of: Any, tmp_path: Any) -> None:
    """V2 with Momentum slots, EMA and global_step; the model zoo's V1 single-file format."""
    original = request.getfixturevalue(case)
    out = str(tmp_path / "model.ckpt")
    ckptbridge.rebuild(archive_of(original, fmt), out, engine=engine)
    names = C.assert_same_as_tf(TfCheckpoint(out), original)
    assert names == 590  # 267 variables, Momentum and EMA of the 161 trainable ones, global_step


class _Dense(tf.Module):
    """The same object structure as tf_checkpoints.build_tf2, with other initial values."""

    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.zeros([4, 3]), name="w")
        self.b = tf.Variable(tf.ones([3]), name="b")
        self.scale = tf.Variable(tf.constant(0.0, tf.float64), name="scale", trainable=False)


@pytest.mark.parametrize("fmt,engine", [("npz", "native"), ("h5", "tf")])
def test_tf2_checkpoint_restores_object_based(tf2_ckpt: str, fmt: str, engine: str, archive_of: Any, tmp_path: Any) -> None:
    import tf_keras

    out = str(tmp_path / "tf2" / "ckpt-1")
    ckptbridge.rebuild(archive_of(tf2_ckpt, fmt), out, engine=engine)
    model, opt = _Dense(), tf_keras.optimizers.Adam(0.01)
    status = tf.train.Checkpoint(model=model, optimizer=opt).restore(out)
    status.assert_existing_objects_matched()
    orig = tf.train.load_checkpoint(tf2_ckpt)
    for attr in ("w", "b", "scale"):
        want = orig.get_tensor(f"model/{attr}/.ATTRIBUTES/VARIABLE_VALUE")
        got = getattr(model, attr).numpy()
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), attr
    assert int(opt.iterations.numpy()) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_max_shard_mb_splits_into_shards_tf_reads(engine: str, tmp_path: Any) -> None:
    rng = np.random.default_rng(5)
    values = {f"layer{i}/kernel": rng.standard_normal((256, 256)).astype(np.float32) for i in range(6)}  # 256 KiB each
    values["big"] = rng.standard_normal((512, 512)).astype(np.float32)  # 1 MiB, over the shard limit on its own
    values["step"] = np.array(3, np.int64)
    archive = _plain_npz(tmp_path / "a.npz", values)
    out = str(tmp_path / "out" / "model.ckpt")
    ckptbridge.rebuild(archive, out, engine=engine, max_shard_bytes=600 << 10)
    shards = sorted(glob.glob(out + ".data-*"))
    assert len(shards) >= 3, shards
    assert all(s.endswith(f"-of-{len(shards):05d}") for s in shards)
    C.assert_same_as_tf(values, out)


def test_plain_npz_and_h5_import_graph_free(tmp_path: Any) -> None:
    import h5py
    import ml_dtypes

    values = {
        "conv/weights": np.arange(24, dtype=np.float32).reshape(2, 3, 4) * np.float32(0.5),
        "conv/biases": np.array([-0.0, 1.0, np.inf], np.float64),
        "ids": np.array([-(2**40), 2**40], np.int64),
        "mask": np.array([True, False]),
        "half": np.array([1.5, -2.0], np.float16),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.int32),
        "u8": np.arange(5, dtype=np.uint8),
        "c64": np.array([1 + 2j], np.complex64),
    }
    npz = _plain_npz(tmp_path / "plain.npz", values)
    h5 = str(tmp_path / "plain.h5")
    with h5py.File(h5, "w") as f:
        for name, v in values.items():
            f[name] = v
    for i, archive in enumerate([npz, h5]):
        for engine in ENGINES:
            out = str(tmp_path / f"out{i}{engine}" / "model.ckpt")
            ckptbridge.rebuild(archive, out, engine=engine)
            C.assert_same_as_tf(values, out)
    assert ml_dtypes  # bfloat16 in plain archives is covered by test_formats


@pytest.mark.parametrize("engine", ENGINES)
def test_existing_output_refused_graph_free(engine: str, tmp_path: Any) -> None:
    a = _plain_npz(tmp_path / "a.npz", {"w": np.ones(3, np.float32)})
    b = _plain_npz(tmp_path / "b.npz", {"w": np.full(3, 2, np.float32)})
    out = str(tmp_path / "out" / "model.ckpt")
    ckptbridge.rebuild(a, out, engine=engine)
    with pytest.raises(OutputExistsError, match="pass force=True to overwrite"):
        ckptbridge.rebuild(b, out, engine=engine)
    C.assert_same_as_tf({"w": np.ones(3, np.float32)}, out)
    ckptbridge.rebuild(b, out, engine=engine, force=True)
    C.assert_same_as_tf({"w": np.full(3, 2, np.float32)}, out)
    _no_tmp_left(tmp_path)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_free_failure_leaves_nothing(fmt: str, engine: str, tmp_path: Any) -> None:
    archive, values = _tiny_ckptbridge_archive(tmp_path, fmt)
    _corrupt(archive, values["tiny/table"])
    out = tmp_path / "new" / "sub" / "model.ckpt"
    with pytest.raises(CorruptError, match="tiny/table"):
        ckptbridge.rebuild(archive, str(out), engine=engine)
    assert not (tmp_path / "new").exists()
    _no_tmp_left(tmp_path)


# --------------------------------------------------------------------------- over 2 GiB


@pytest.mark.slow
def test_tensor_over_2gib_round_trips(tmp_path: Any) -> None:
    """One float32 tensor of 2 GiB + 4 KiB: every element a distinct bit pattern.

    The source is streamed by the native writer (TensorFlow's SaveV2 would need
    two in-memory copies); TensorFlow reads the result.
    """
    from ckptbridge.bundle import BundleWriter

    n = (1 << 29) + 1024
    step = 1 << 26
    src = str(tmp_path / "src" / "big.ckpt")
    os.makedirs(os.path.dirname(src))
    w = BundleWriter(src)
    w.write_chunks("big", "float32", (n,), (np.arange(i, min(n, i + step), dtype=np.uint32).view(np.float32) for i in range(0, n, step)))
    w.commit()
    archive = str(tmp_path / "big.npz")
    ckptbridge.export(src, archive, read=ckptbridge.ReadOptions(engine="native"))
    os.remove(src + ".data-00000-of-00001")
    out = str(tmp_path / "out" / "big.ckpt")
    ckptbridge.rebuild(archive, out, engine="native")
    os.remove(archive)
    got = tf.train.load_checkpoint(out).get_tensor("big")
    assert got.dtype == np.float32 and got.shape == (n,)
    bits = got.view(np.uint32)
    for i in range(0, n, step):
        assert np.array_equal(bits[i : i + step], np.arange(i, min(n, i + step), dtype=np.uint32)), f"elements {i}..."


def test_image_size_builds_the_net_a_small_input_checkpoint_came_from(inception_v2: str, archive_of: Any, tmp_path: Any) -> None:
    """inception_v3 trained on 139x139 inputs names its AuxLogits kernel after the input size."""
    archive = archive_of(inception_v2, "npz")
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(archive, str(tmp_path / "a" / "model.ckpt"), graph=ckptbridge.Graph("inception_v3"), engine="native")
    assert "AuxLogits" in str(e.value)
    out = str(tmp_path / "b" / "model.ckpt")
    report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph("inception_v3", image_size=139), engine="native")
    assert report.missing == []
    reader = tf.train.load_checkpoint(out)
    with ckptbridge.read(archive) as src:
        for name in report.written:
            got = reader.get_tensor(name)
            assert got.dtype == src[name].dtype and got.tobytes() == src[name].tobytes(), name
