"""ckptbridge.assign and ckptbridge.init_fn: values into the variables of a model the user already holds.

Real tf-slim nets in the user's own graph and session (inception_v1 with 10 classes where the point
is the session machinery: 230 variables, batch-norm statistics, 26 MB; vgg_16 where the point is
its fc6), a checkpoint TensorFlow's Saver wrote, TensorFlow reading the variables back as the oracle,
and tf-slim's own ``assign_from_values_fn`` beside it.  Comparisons are bit-exact (dtype and bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")

import ckptbridge  # noqa: E402
from ckptbridge.errors import CkptBridgeError, FormatError, MismatchError  # noqa: E402

pytestmark = pytest.mark.tf

NET, CLASSES = "inception_v1", 10
HEAD = "InceptionV1/Logits"
HERE = os.path.dirname(os.path.abspath(__file__))


def _tf() -> Any:
    from ckptbridge.tf.compat import import_tensorflow

    return import_tensorflow()


def config() -> Any:
    tf = _tf()
    c = tf.compat.v1.ConfigProto()
    c.graph_options.rewrite_options.disable_meta_optimizer = True  # each graph runs a few times
    return c


def build(net: str = NET, classes: int = CLASSES) -> tuple[Any, Any, Any]:
    """The net in a fresh graph: (graph, images placeholder, logits)."""
    from ckptbridge.tf.slim import build_net

    return build_net(net, classes)


def users_graph(classes: int, seed: int) -> Any:
    """inception_v1 as a user builds it for fine-tuning: in a seeded graph of their own (so its
    initializers give the same values in every session of it)."""
    from ckptbridge.tf.compat import import_slim

    tf, slim = _tf(), import_slim()
    from tf_slim.nets import inception

    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(seed)
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        with slim.arg_scope(inception.inception_v1_arg_scope()):
            inception.inception_v1(images, num_classes=classes, is_training=False)
    return g


def values(sess: Any, variables: list[Any]) -> dict[str, np.ndarray]:
    return dict(zip([v.op.name for v in variables], sess.run(variables)))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def random_value(rng: np.random.Generator, name: str, shape: list[int], dtype: Any) -> np.ndarray:
    if name.endswith("moving_variance"):
        return rng.uniform(0.5, 2.0, shape).astype(dtype)
    scale = np.sqrt(2.0 / np.prod(shape[:-1])) if len(shape) >= 2 else 0.1
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.fixture(scope="module")
def net() -> Any:
    """The net's graph, built once: each test opens sessions of its own on it (each holds its own variable values)."""
    g, _, _ = build()
    return g


@pytest.fixture(scope="module")
def ckpt(module_tmp: Any, net: Any) -> Iterator[dict[str, Any]]:
    """inception_v1 (10 classes) with random values, saved by TensorFlow's Saver; the arrays TensorFlow reads from it."""
    tf = _tf()
    prefix = str(module_tmp("assign") / "model.ckpt")
    rng = np.random.default_rng(3)
    with net.as_default(), tf.compat.v1.Session(config=config()) as s:
        variables = tf.compat.v1.global_variables()
        # the initializers run once, fed the random values (one run, not one per variable)
        s.run(tf.compat.v1.global_variables_initializer(),
              {v.initial_value: random_value(rng, v.op.name, v.shape.as_list(), v.dtype.as_numpy_dtype) for v in variables})
        tf.compat.v1.train.Saver().save(s, prefix, write_meta_graph=False, write_state=False)
    reader = tf.train.load_checkpoint(prefix)
    arrays = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
    yield {"prefix": prefix, "arrays": arrays}


def test_session_gets_every_variable_bit_exact_and_as_slim_assigns_them(ckpt: dict[str, Any], net: Any) -> None:
    import tf_slim as slim

    tf = _tf()
    arrays = ckpt["arrays"]
    g = net
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        variables = tf.compat.v1.global_variables()
        before = g.as_graph_def().ByteSize()
        # 2 MiB: Mixed_5c's 3x3 kernel (2.6 MB) goes in row slices, the rest in one run
        report = ckptbridge.assign(sess, ckpt["prefix"], chunk_bytes=2 << 20)
        ours = values(sess, variables)
        # the values went through placeholders: the graph grew by its feed ops, not by 26 MB of constants
        assert g.as_graph_def().ByteSize() - before < 1 << 20
    assert sorted(report.written) == sorted(ours) == sorted(arrays)
    assert report.missing == [] and report.nbytes == sum(a.nbytes for n, a in arrays.items() if n in ours)
    assert report.output == "session"
    for name, value in ours.items():
        assert same(value, arrays[name]), name
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        variables = tf.compat.v1.global_variables()
        slim.assign_from_values_fn({v.op.name: arrays[v.op.name] for v in variables})(sess)
        theirs = values(sess, variables)
    assert theirs.keys() == ours.keys()
    for name, value in theirs.items():
        assert same(value, ours[name]), name


def test_a_same_size_wrong_shape_fc6_is_refused_by_name() -> None:
    """fc6 given as [25088, 4096] for [7, 7, 512, 4096]: the same 411 MB, another layout; every misfit is named."""
    tf = _tf()
    g, _, _ = build("vgg_16", 1000)
    fc6 = np.empty((25088, 4096), np.float32)  # never touched: the refusal comes before any value is read
    arrays = {"vgg_16/fc6/weights": fc6, "vgg_16/fc7/biases": np.zeros(4096, np.float16), "vgg_16/fc8/biases": np.zeros(1000, np.float32)}
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        with pytest.raises(MismatchError) as e:
            ckptbridge.assign(sess, arrays, allow_missing=True)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("2 variables of the session do not match the arrays"), msg
        assert "vgg_16/fc6/weights: variable float32[7, 7, 512, 4096] vs the arrays float32[25088, 4096]" in msg
        assert "vgg_16/fc7/biases: variable float32[4096] vs the arrays float16[4096]" in msg
        # nothing was assigned, not even the entry that fits
        left = sess.run(tf.compat.v1.report_uninitialized_variables())
        assert b"vgg_16/fc8/biases" in set(left)


def test_slim_reshapes_what_assign_refuses(ckpt: dict[str, Any], net: Any) -> None:
    """The failure it prevents: tf-slim's assign_from_values_fn loads a transposed kernel of the same size silently."""
    import tf_slim as slim

    tf = _tf()
    name = "InceptionV1/Mixed_3b/Branch_1/Conv2d_0b_3x3/weights"  # [3, 3, 96, 128]
    wrong = np.ascontiguousarray(ckpt["arrays"][name].transpose(3, 2, 0, 1))  # PyTorch's OIHW
    g = net
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        var = next(v for v in tf.compat.v1.global_variables() if v.op.name == name)
        slim.assign_from_values_fn({name: wrong})(sess)
        assert sess.run(var).shape == (3, 3, 96, 128)  # reshaped, no error: the wrong layout is in the model
        with pytest.raises(MismatchError, match=r"Conv2d_0b_3x3/weights: variable float32\[3, 3, 96, 128\] vs the arrays float32\[128, 96, 3, 3\]"):
            ckptbridge.assign(sess, {name: wrong}, var_list=[var])


def test_missing_and_unexpected_entries(ckpt: dict[str, Any], net: Any) -> None:
    tf = _tf()
    arrays = dict(ckpt["arrays"])
    gone = arrays.pop(f"{HEAD}/Conv2d_0c_1x1/biases")
    arrays["extra/thing"] = np.zeros(3, np.float32)
    g = net
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        with pytest.raises(MismatchError) as e:
            ckptbridge.assign(sess, arrays)
        assert str(e.value) == ("1 variables of the session have no value in the arrays: InceptionV1/Logits/Conv2d_0c_1x1/biases; check the "
                                "names (ckptbridge ls), or pass allow_missing=True to leave them as they are")
        sess.run(tf.compat.v1.global_variables_initializer())
        report = ckptbridge.assign(sess, arrays, allow_missing=True)
        assert report.missing == [f"{HEAD}/Conv2d_0c_1x1/biases"]
        assert report.dropped == {"extra/thing": "not a variable of the session"}
        biases = next(v for v in tf.compat.v1.global_variables() if v.op.name == f"{HEAD}/Conv2d_0c_1x1/biases")
        assert np.all(sess.run(biases) == 0) and not np.all(gone == 0)  # left at its initializer
        with pytest.raises(MismatchError, match=r"^1 entries of the arrays are not variables of the session: extra/thing \(strict=True\)$"):
            ckptbridge.assign(sess, arrays, allow_missing=True, strict=True)
        # nothing matched is an error, not a quiet no-op (assign_from_checkpoint_fn returns None)
        with pytest.raises(MismatchError, match=r"^no entry of the arrays is a variable of the session \(nothing was assigned\)"):
            ckptbridge.assign(sess, {"vgg_16/fc8/biases": np.zeros(3, np.float32)}, allow_missing=True)
    with pytest.raises(FormatError, match="^a target is a tf.compat.v1.Session, a tf.Module, a Keras model or an iterable"):
        ckptbridge.assign("model.ckpt", arrays)
    with pytest.raises(FormatError, match="exclude is a sequence of variable scopes"):
        ckptbridge.assign([], arrays, exclude="InceptionV1/Logits")  # type: ignore[arg-type]


def test_init_fn_leaves_the_excluded_head_at_its_initializer(ckpt: dict[str, Any]) -> None:
    """The fine-tuning recipe: 5 classes instead of the checkpoint's 10, through a Scaffold and a MonitoredTrainingSession,
    which finalize the graph before they call init_fn(scaffold, session)."""
    tf = _tf()
    arrays = ckpt["arrays"]
    g = users_graph(5, seed=11)
    with g.as_default():
        variables = tf.compat.v1.global_variables()
        with pytest.raises(MismatchError, match=r"Logits/Conv2d_0c_1x1/weights: variable float32\[1, 1, 1024, 5\] vs .* float32\[1, 1, 1024, 10\]"):
            ckptbridge.init_fn(ckpt["prefix"])
        fn = ckptbridge.init_fn(ckpt["prefix"], exclude=[HEAD])
        with tf.compat.v1.Session(config=config()) as sess:  # what the initializer gives, in this seeded graph
            sess.run(tf.compat.v1.global_variables_initializer())
            initial = values(sess, variables)
        scaffold = tf.compat.v1.train.Scaffold(init_fn=fn)
        with tf.compat.v1.train.MonitoredTrainingSession(scaffold=scaffold, config=config()) as mon:
            assert g.finalized
            got = dict(zip([v.op.name for v in variables], mon.run(variables)))
        with tf.compat.v1.Session(config=config()) as sess:  # and as a plain fn(session)
            sess.run(tf.compat.v1.global_variables_initializer())
            report = fn(sess)
            plain = values(sess, variables)
    head = sorted(n for n in got if n.startswith(HEAD))
    assert head == report.missing == [f"{HEAD}/Conv2d_0c_1x1/biases", f"{HEAD}/Conv2d_0c_1x1/weights"]
    assert report.dropped[f"{HEAD}/Conv2d_0c_1x1/weights"] == "its variable is excluded (exclude=)"
    assert not np.all(initial[head[1]] == 0)  # a real initializer: equal to it is not equal to zeros
    for name in got:
        want = initial[name] if name in head else arrays[name]
        assert same(got[name], want) and same(plain[name], want), name
    with pytest.raises(CkptBridgeError, match=r"^an init_fn is called as fn\(session\) or fn\(scaffold, session\), got 3 arguments$"):
        fn(None, None, None)
    with tf.compat.v1.Session(graph=tf.Graph()) as other, pytest.raises(CkptBridgeError, match="made in another graph"):
        fn(other)


def test_assign_into_a_finalized_graph_says_to_use_init_fn() -> None:
    tf = _tf()
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.get_variable("w", [3])
        g.finalize()
        with tf.compat.v1.Session(config=config()) as sess, \
                pytest.raises(CkptBridgeError, match=r"graph is finalized.*make ckptbridge.init_fn\(\.\.\.\) before"):
            ckptbridge.assign(sess, {"w": np.zeros(3, np.float32)})


def test_tf_module_float32_and_bfloat16_eagerly(tmp_path: Any) -> None:
    import ml_dtypes

    tf = _tf()

    class Block(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="block")
            with self.name_scope:
                self.w = tf.Variable(tf.zeros([300, 64]), name="w")  # 76.8 KB: fed in row slices below
                self.b = tf.Variable(tf.zeros([64], tf.bfloat16), name="b")

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="net")
            with self.name_scope:
                self.block = Block()
                self.scale = tf.Variable(tf.ones([], tf.bfloat16), name="scale")

    net = Net()
    rng = np.random.default_rng(0)
    arrays = {"net/block/w": rng.standard_normal((300, 64)).astype(np.float32),
              "net/block/b": rng.standard_normal(64).astype(ml_dtypes.bfloat16),
              "net/scale": np.asarray(1.5, ml_dtypes.bfloat16)}
    path = str(tmp_path / "w.safetensors")
    ckptbridge.save(arrays, path)
    report = ckptbridge.assign(net, path, chunk_bytes=16 << 10, progress=True)
    assert sorted(report.written) == sorted(arrays) and report.output == "Net 'net'"
    for v in net.variables:
        assert same(v.numpy(), arrays[v.name[:-2]]), v.name
    with pytest.raises(MismatchError, match=r"net/block/b: variable bfloat16\[64\] vs the arrays float32\[64\]"):
        ckptbridge.assign(net, {**arrays, "net/block/b": arrays["net/block/b"].astype(np.float32)})
    # the variables themselves, as an iterable
    report = ckptbridge.assign([net.block.w], {"net/block/w": -arrays["net/block/w"]})
    assert same(net.block.w.numpy(), -arrays["net/block/w"]) and report.written == ["net/block/w"]


def test_partitioned_variable_is_filled_part_by_part(tmp_path: Any) -> None:
    tf = _tf()
    rng = np.random.default_rng(1)
    full = rng.standard_normal((10, 6)).astype(np.float32)
    path = str(tmp_path / "p.npz")
    ckptbridge.save({"emb": full}, path)
    g = tf.Graph()
    with g.as_default():
        part = tf.compat.v1.get_variable("emb", [10, 6], partitioner=tf.compat.v1.fixed_size_partitioner(3))
        with tf.compat.v1.Session(config=config()) as sess:
            report = ckptbridge.assign(sess, path)
            got = sess.run(tf.concat(list(part), axis=0))
    assert report.written == ["emb"] and len(list(part)) == 3
    assert same(got, full)


# --------------------------------------------------------------------------- ports


def test_keras3_model_takes_a_slim_checkpoint_through_the_keras_map(module_tmp: Any) -> None:
    """keras:VGG16 from a slim vgg_16 checkpoint into a Keras 3 model you built: the same logits."""
    pytest.importorskip("keras")
    from test_keras_ports import AGREE, images, keras_logits, keras_model, make_slim, rel

    prefix = str(module_tmp("keras") / "slim" / "model.ckpt")
    x = images(224)
    ref = make_slim("vgg_16", prefix, x, 16)
    model = keras_model("VGG16")
    report = ckptbridge.assign(model, prefix, ckptbridge.Port("keras:VGG16"), strict=True)
    assert len(report.written) == 32 and report.port == "keras:VGG16" and report.missing == []
    got = keras_logits(model, x)
    assert rel(ref[0], ref[1]) > 100 * AGREE
    assert rel(got, ref) < AGREE


def _torch_side(jobs: list[dict[str, Any]], root: Any) -> None:
    """torch_side.py in a process of its own (torch and TensorFlow never share one)."""
    path = str(root / "jobs.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    r = subprocess.run([sys.executable, os.path.join(HERE, "torch_side.py"), "batch", "--jobs", path], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("map_name", ["torchvision:googlenet", pytest.param("torchvision:vgg16", marks=pytest.mark.slow)])
def test_torchvision_state_dict_into_a_slim_session(map_name: str, tmp_path: Any) -> None:
    """A torchvision state_dict (random, written by torch) into the user's slim session through the map's reverse
    layouts: the slim net's logits are torch's (TensorFlow semantics patched in on the torch side), within 1e-5."""
    tf = _tf()
    pmap = ckptbridge.port_map(map_name)
    x = np.random.default_rng(9).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    weights, out = str(tmp_path / "w.safetensors"), str(tmp_path / "torch.npy")
    _torch_side([{"cmd": "random", "map": map_name, "out": weights, "seed": 7},
                 {"cmd": "logits", "map": map_name, "weights": weights, "input": str(tmp_path / "x.npy"), "out": out,
                  "tf_semantics": bool(pmap.caveats)}], tmp_path)
    want = np.load(out)
    g, images, logits = build(pmap.net, pmap.source_classes)
    with g.as_default(), tf.compat.v1.Session(config=config()) as sess:
        report = ckptbridge.assign(sess, weights, ckptbridge.Port(map_name), strict=True)
        got = sess.run(logits, {images: x})
    assert report.missing == [] and report.port == map_name
    if pmap.source_classes == pmap.dest_classes + 1:
        assert np.all(got[:, 0] == 0)  # TensorFlow's background class, inserted as zeros
        got = got[:, 1:]
    scale = np.abs(want).max()
    assert np.abs(want[0] - want[1]).max() > 1e-3 * scale  # logits that depend on the image
    assert np.abs(got.astype(np.float64) - want).max() / scale < 1e-5


def test_init_fn_fits_slim_learning_train(tmp_path: Any) -> None:
    """slim.learning.train(init_fn=...) through its Supervisor: with a zero learning rate, the checkpoint it saves
    after one step holds exactly the source's values, and the excluded head its initializer's."""
    from ckptbridge.tf.compat import import_slim

    tf, slim = _tf(), import_slim()
    rng = np.random.default_rng(4)
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(2)
        images = tf.random.uniform([2, 8, 8, 3], seed=1)
        labels = tf.one_hot([1, 3], 4)
        net = slim.conv2d(images, 6, [3, 3], scope="conv1")
        net = slim.flatten(net)
        logits = slim.fully_connected(net, 4, activation_fn=None, scope="head")
        loss = tf.compat.v1.losses.softmax_cross_entropy(labels, logits)
        train_op = slim.learning.create_train_op(loss, tf.compat.v1.train.GradientDescentOptimizer(0.0))
        body = {v.op.name: rng.standard_normal(v.shape.as_list()).astype(np.float32)
                for v in tf.compat.v1.global_variables() if v.op.name.startswith("conv1/")}
        fn = ckptbridge.init_fn({**body, "head/weights": np.zeros((8, 8), np.float32)}, exclude=["head"], allow_missing=True)
        slim.learning.train(train_op, str(tmp_path / "train"), number_of_steps=1, init_fn=fn, save_summaries_secs=0,
                            save_interval_secs=0, log_every_n_steps=1000, session_config=config())
    reader = tf.train.load_checkpoint(str(tmp_path / "train"))
    for name, value in body.items():
        assert same(reader.get_tensor(name), value), name
    assert not np.all(reader.get_tensor("head/weights") == 0)  # excluded: the initializer's, not the source's zeros


def test_tf_keras_model_and_ema(tmp_path: Any) -> None:
    """A tf_keras model is a tf.Module: its variables by name; Select(use_ema=True) gives each its moving average."""
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(5, name="fc", input_shape=(3,))])
    rng = np.random.default_rng(6)
    kernel, ema = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    arrays = {"fc/kernel": kernel, "fc/kernel/ExponentialMovingAverage": ema, "fc/bias": bias}
    report = ckptbridge.assign(model, arrays, ckptbridge.Naming(select=ckptbridge.Select(use_ema=True)), strict=True)
    assert report.ema_swaps == {"fc/kernel": "fc/kernel/ExponentialMovingAverage"}
    got = {w.name[:-2]: w.numpy() for w in model.weights}
    assert same(got["fc/kernel"], ema) and same(got["fc/bias"], bias)
