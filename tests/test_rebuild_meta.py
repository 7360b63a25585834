"""``import ARCHIVE OUT --graph GRAPH.meta``: a checkpoint rebuilt through a MetaGraphDef the user already has.

The graph is a small tf-slim training job's (convolutions, batch norm, a partitioned
fully connected layer, Momentum slots, a global step), exported by TensorFlow with
``export_meta_graph``; its checkpoint goes to ``.npz`` through ckptbridge and back
through the command line.  TensorFlow is the oracle: ``import_meta_graph(OUT.meta)``
restores the result, every variable equals ``tf.train.load_checkpoint`` of the original
bit for bit, and the logits equal the original's.  Bad input is one line, and nothing
is left at OUT.  A ``.meta`` whose ``_output_shapes`` are stale (as TensorFlow 1.12's
were for FusedBatchNormGrad: ``[0]`` where today's inference says ``[C]``) is crafted
from the TF-written one, one attribute changed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

import ckptbridge  # noqa: E402
from ckptbridge.errors import FormatError, MismatchError  # noqa: E402
from ckptbridge.tf.metagraph import STALE_SHAPES  # noqa: E402

import tf_checkpoints as C  # noqa: E402  (tests/ is on sys.path through conftest.py)
from helpers import cli, error_line, in_process, leftovers  # noqa: E402

pytestmark = pytest.mark.tf

tf = C.tf
slim = C.slim
V1 = tf.compat.v1
X = np.random.default_rng(7).standard_normal((2, 28, 28, 1)).astype(np.float32)
#: a node whose static shape only its _output_shapes attribute knows (a set_shape after a reshape to a fed shape)
SET_SHAPE_NODE = "features_for_export"


def _lenet_training_graph() -> Any:
    """A lenet-like slim net as a training job builds it: batch norm, a partitioned layer, Momentum, a step."""
    images = V1.placeholder(tf.float32, [None, 28, 28, 1], name="images")
    labels = V1.placeholder(tf.int64, [None], name="labels")
    with slim.arg_scope([slim.conv2d, slim.fully_connected], normalizer_fn=slim.batch_norm,
                        normalizer_params={"is_training": False}):
        net = slim.conv2d(images, 6, [5, 5], scope="conv1")
        net = slim.max_pool2d(net, [2, 2], scope="pool1")
        net = slim.conv2d(net, 8, [5, 5], scope="conv2")
        net = slim.max_pool2d(net, [2, 2], scope="pool2")
        net = slim.flatten(net)
    shape = V1.placeholder_with_default(tf.constant([-1, 392]), [2], name="feature_shape")
    fed = tf.reshape(net, shape)
    fed.set_shape([None, 392])
    tf.identity(fed, name=SET_SHAPE_NODE)
    with V1.variable_scope("fc3", partitioner=V1.fixed_size_partitioner(2)):
        w = V1.get_variable("weights", [392, 32], initializer=V1.glorot_uniform_initializer())
    b = V1.get_variable("fc3/biases", [32], initializer=V1.random_normal_initializer())
    net = tf.nn.relu(tf.matmul(net, w) + b)
    logits = slim.fully_connected(net, 10, activation_fn=None, normalizer_fn=None, scope="logits")
    tf.identity(logits, name="output")
    loss = V1.losses.sparse_softmax_cross_entropy(labels, logits)
    step = V1.train.get_or_create_global_step()
    V1.train.MomentumOptimizer(0.01, 0.9).minimize(loss, global_step=step)
    return logits


@pytest.fixture(scope="module")
def job(module_tmp: Any) -> dict[str, Any]:
    """The training job's files: its checkpoint, its .meta, the archive, and the logits on X."""
    d = module_tmp("metajob")
    prefix, meta = str(d / "train" / "model.ckpt-1"), str(d / "train" / "model.ckpt-1.meta")
    with tf.Graph().as_default():
        V1.set_random_seed(3)
        logits = _lenet_training_graph()
        saver = V1.train.Saver()
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            # moving statistics and slots away from their initializers, so a value left unfed shows
            for v in V1.global_variables():
                if "moving" in v.op.name or "Momentum" in v.op.name:
                    sess.run(v.assign(tf.random.normal(v.shape, seed=1)))
            want = sess.run(logits, {"images:0": X})
            saver.save(sess, prefix, write_meta_graph=False)
        V1.train.export_meta_graph(filename=meta, saver_def=saver.saver_def)
    archive = str(d / "job.npz")
    ckptbridge.export(prefix, archive)
    return {"dir": d, "prefix": prefix, "meta": meta, "archive": archive, "logits": want}


def _restore(meta: str, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray], Any]:
    """``import_meta_graph(meta).restore(sess, prefix)`` as a user runs it: (logits on X, every variable, the graph's def)."""
    with tf.Graph().as_default() as g:
        saver = V1.train.import_meta_graph(meta)
        variables = V1.global_variables()
        with V1.Session() as sess:
            saver.restore(sess, prefix)
            logits = sess.run("output:0", {"images:0": X})
            values = dict(zip([v.op.name for v in variables], sess.run(variables)))
        return logits, values, g.as_graph_def()


def _assert_rebuilt(job: dict[str, Any], out: str, meta: str | None = None) -> Any:
    logits, values, graph_def = _restore(out + ".meta", out)
    assert logits.dtype == job["logits"].dtype and logits.tobytes() == job["logits"].tobytes(), "logits differ from the job's"
    want, got = tf.train.load_checkpoint(job["prefix"]), tf.train.load_checkpoint(out)
    names = sorted(want.get_variable_to_shape_map())
    assert sorted(got.get_variable_to_shape_map()) == names
    assert "fc3/weights" in names and "fc3/weights/part_0" in values  # partitioned: one name, parts in the graph
    for name in names:
        C.assert_same_array(np.asarray(got.get_tensor(name)), np.asarray(want.get_tensor(name)), name)
    # the written .meta is the job's graph: the same nodes, none of ckptbridge's feed ops, the same Saver
    job_meta = V1.MetaGraphDef()
    with open(meta or job["meta"], "rb") as f:
        job_meta.ParseFromString(f.read())
    written = V1.MetaGraphDef()
    with open(out + ".meta", "rb") as f:
        written.ParseFromString(f.read())
    assert {n.name for n in written.graph_def.node} == {n.name for n in job_meta.graph_def.node}
    assert written.saver_def == job_meta.saver_def
    assert sorted(written.collection_def) == sorted(job_meta.collection_def)
    assert len(values) == len(V1.MetaGraphDef.FromString(pathlib.Path(job["meta"]).read_bytes()).collection_def["variables"].bytes_list.value)
    return written


def _shape_of(meta: Any, node: str, output: int = 0) -> list[int]:
    n = next(n for n in meta.graph_def.node if n.name == node)
    return [d.size for d in n.attr["_output_shapes"].list.shape[output].dim]


def _line(result: tuple[int, str, str], *needles: str) -> str:
    """The one ``ckptbridge: error:`` line of a failed in-process command (exit 2, nothing on stdout)."""
    status, out, err = result
    assert status == 2 and out == "", (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptbridge: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _import(*argv: str, subprocess: bool = False) -> str:
    """``ckptbridge import ARGV`` (as a user runs it, or in this process to save TensorFlow's start-up): its stderr."""
    if subprocess:
        r = cli("import", *argv)
        status, err = r.returncode, r.stderr
    else:
        status, _, err = in_process("import", *argv)
    assert status == 0, err
    return err


@pytest.mark.parametrize("engine", ["auto", "tf"])
def test_import_through_the_jobs_meta_restores_with_import_meta_graph(job: dict[str, Any], engine: str) -> None:
    out = str(job["dir"] / f"out-{engine}" / "model.ckpt")
    err = _import(job["archive"], out, "--graph", job["meta"], "--engine", engine, subprocess=engine == "auto")
    assert "wrote" in err and "note:" not in err  # a graph TensorFlow imports as it is is not touched
    written = _assert_rebuilt(job, out)
    # its _output_shapes were consistent, so they were kept: a shape only the attribute knew is still there
    assert _shape_of(written, SET_SHAPE_NODE) == [-1, 392]
    assert not leftovers(job["dir"])


def _save_copy(meta: Any, path: str) -> str:
    with open(path, "wb") as f:
        f.write(meta.SerializeToString())
    return path


def test_stale_output_shapes_are_left_out_only_when_tensorflow_refuses_them(job: dict[str, Any]) -> None:
    meta = V1.MetaGraphDef()
    with open(job["meta"], "rb") as f:
        meta.ParseFromString(f.read())
    # conv1's batch norm has 6 channels: its batch mean is [6]; a [0] there is what musicnn's 2019 .meta carries.
    node = next(n for n in meta.graph_def.node if n.op == "FusedBatchNormV3" and n.name.startswith("conv1/"))
    node.attr["_output_shapes"].list.shape[1].dim[0].size = 0
    stale = _save_copy(meta, str(job["dir"] / "stale.meta"))
    with tf.Graph().as_default(), pytest.raises(ValueError, match=STALE_SHAPES):
        V1.train.import_meta_graph(stale)  # TensorFlow itself refuses it: the case is real
    out = str(job["dir"] / "out-stale" / "model.ckpt")
    err = _import(job["archive"], out, "--graph", stale)
    note = next(line for line in err.splitlines() if line.startswith("note:"))
    assert "_output_shapes" in note and node.name in note and "imported without them" in note
    written = _assert_rebuilt(job, out, stale)  # and the written .meta imports in TensorFlow as it is
    assert _shape_of(written, node.name, 1) == [6]
    # the cost of leaving them out, which is why only a refused graph loses them: inference alone cannot know this one
    assert _shape_of(written, SET_SHAPE_NODE) == [-1, -1]


def test_missing_and_mismatched_variables_are_named_and_nothing_is_left(job: dict[str, Any], tmp_path: Any) -> None:
    with ckptbridge.read(job["archive"]) as a:
        values = {n: a[n] for n in a}
    lacking = str(tmp_path / "lacking.npz")
    np.savez(lacking, **{n: v for n, v in values.items() if n not in ("conv2/weights", "fc3/weights")})
    out = str(tmp_path / "out" / "model.ckpt")
    line = error_line(in_process("import", lacking, out, "--graph", job["meta"])[::2], "2 variables of the graph in", "conv2/weights",
                      "fc3/weights", "--allow-missing")
    assert job["meta"] in line
    assert not os.path.exists(tmp_path / "out")
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, **{**values, "logits/weights": values["logits/weights"][:, :9].copy()})
    _line(in_process("import", wrong, out, "--graph", job["meta"], "--engine", "tf"),
          "logits/weights: graph float32[32, 10] vs archive float32[32, 9]")
    assert not os.path.exists(tmp_path / "out")
    # what the archive has and the graph's Saver does not save is listed, or with --strict refused
    extra = str(tmp_path / "extra.npz")
    np.savez(extra, **{**values, "head/weights": np.ones(3, np.float32)})
    report = ckptbridge.rebuild(extra, out, graph=ckptbridge.Graph(meta=job["meta"]))
    assert report.dropped == {"head/weights": f"not a variable of the graph in {job['meta']}"}
    with pytest.raises(MismatchError, match=r"head/weights \(strict=True\)"):
        ckptbridge.rebuild(extra, str(tmp_path / "strict" / "m.ckpt"), graph=ckptbridge.Graph(meta=job["meta"], strict=True))
    assert not os.path.exists(tmp_path / "strict") and not leftovers(tmp_path)


def test_allow_missing_leaves_a_partitioned_variable_at_its_initializer(job: dict[str, Any], tmp_path: Any) -> None:
    with ckptbridge.read(job["archive"]) as a:
        values = {n: a[n] for n in a if n != "fc3/weights"}
    lacking = str(tmp_path / "lacking.npz")
    np.savez(lacking, **values)
    for engine in ("auto", "tf"):
        out = str(tmp_path / engine / "model.ckpt")
        report = ckptbridge.rebuild(lacking, out, graph=ckptbridge.Graph(meta=job["meta"], allow_missing=True), engine=engine)
        assert report.missing == ["fc3/weights"]
        got = tf.train.load_checkpoint(out)
        w = got.get_tensor("fc3/weights")
        assert w.shape == (392, 32) and np.all(np.abs(w) <= np.sqrt(6 / (196 + 32)) + 1e-6) and np.any(w != 0)  # glorot, per part
        for name, want in values.items():
            C.assert_same_array(np.asarray(got.get_tensor(name)), want, name)


def test_a_file_that_is_no_meta_graph_is_one_line(job: dict[str, Any], tmp_path: Any) -> None:
    with open(job["meta"], "rb") as f:
        blob = f.read()
    with tf.Graph().as_default() as g:
        tf.constant(1.0, name="c")
        graph_def = g.as_graph_def().SerializeToString()
        no_variables = V1.train.export_meta_graph().SerializeToString()
    cases = {
        "garbage.meta": (np.random.default_rng(5).bytes(4096), "not a MetaGraphDef"),
        "truncated.meta": (blob[: len(blob) // 2], "not a MetaGraphDef"),
        "frozen.pb": (graph_def, "it is a GraphDef"),
        "empty.meta": (b"", "not a MetaGraphDef"),
        "constants.meta": (no_variables, "has no variables"),
    }
    out = str(tmp_path / "out" / "model.ckpt")
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        line = error_line(in_process("import", job["archive"], out, "--graph", str(path))[::2], str(path), needle)
        assert "MetaGraphDef" in line or name == "constants.meta", line
        assert not os.path.exists(tmp_path / "out"), name
    _line(in_process("import", job["archive"], out, "--graph", str(tmp_path / "nope.meta")), "nope.meta: no such file")
    assert not os.path.exists(tmp_path / "out")


def test_graph_options_that_cannot_apply_are_refused(job: dict[str, Any], tmp_path: Any) -> None:
    out = str(tmp_path / "out" / "model.ckpt")
    error_line(in_process("import", job["archive"], out, "--graph", job["meta"], "--model", "vgg_16")[::2], "--model or imported from --graph")
    error_line(in_process("import", job["archive"], out, "--graph", job["meta"], "--num-classes", "10")[::2], "--num-classes", "leave them out")
    with pytest.raises(FormatError, match="give one of them"):
        ckptbridge.Graph()
    with pytest.raises(FormatError, match="image_size"):
        ckptbridge.Graph(meta=job["meta"], image_size=28)
    assert not os.path.exists(tmp_path / "out")


def _small_graph(path: str, *, device: str = "", var_list: Any = None, as_text: bool = False, use_resource: bool = True) -> None:
    """A graph of two variables and ``y = ones @ w + b``, exported as a training job would (Saver ``var_list``)."""
    with tf.Graph().as_default(), tf.device(device):
        w = V1.get_variable("w", [3, 4], use_resource=use_resource)
        b = V1.get_variable("b", [4], initializer=V1.zeros_initializer(), use_resource=use_resource)
        tf.identity(tf.matmul(tf.ones([1, 3]), w) + b, name="y")
        saver = V1.train.Saver(var_list=var_list(w, b) if var_list else None)
        V1.train.export_meta_graph(filename=path, saver_def=saver.saver_def, as_text=as_text)


def _y(prefix: str) -> np.ndarray:
    with tf.Graph().as_default():
        saver = V1.train.import_meta_graph(prefix + ".meta")
        with V1.Session(config=V1.ConfigProto(allow_soft_placement=True)) as sess:
            saver.restore(sess, prefix)
            return np.asarray(sess.run("y:0"))


@pytest.mark.parametrize("use_resource", [True, False], ids=["resource", "ref"])  # ref: TF1's VariableV2, as 2019 .meta files have
def test_the_checkpoint_holds_what_the_graphs_saver_saves(tmp_path: Any, use_resource: bool) -> None:
    w, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.full(4, 0.5, np.float32)
    archive = str(tmp_path / "a.npz")
    np.savez(archive, w=w, b=b)
    # a Saver of w alone: b is no part of the checkpoint (listed as dropped), and restore fills w
    only_w = str(tmp_path / "only_w.meta")
    _small_graph(only_w, var_list=lambda w, b: [w], use_resource=use_resource)
    ops = {n.op for n in V1.MetaGraphDef.FromString(pathlib.Path(only_w).read_bytes()).graph_def.node}
    assert ("VarHandleOp" if use_resource else "VariableV2") in ops
    for engine in ("auto", "tf"):
        out = str(tmp_path / engine / "m.ckpt")
        report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(meta=only_w), engine=engine)
        assert report.written == ["w"] and report.dropped == {"b": f"not a variable of the graph in {only_w}"}
        got = tf.train.load_checkpoint(out)
        assert sorted(got.get_variable_to_shape_map()) == ["w"]
        C.assert_same_array(np.asarray(got.get_tensor("w")), w, "w")
    # a Saver that saves under names of its own cannot be matched by name: refused, naming them
    renamed = str(tmp_path / "renamed.meta")
    _small_graph(renamed, var_list=lambda w, b: {"model/w": w, "b": b})
    with pytest.raises(MismatchError, match=r"saves 1 names that are no variable's own name: model/w"):
        ckptbridge.rebuild(archive, str(tmp_path / "r" / "m.ckpt"), graph=ckptbridge.Graph(meta=renamed))
    assert not os.path.exists(tmp_path / "r")


def test_a_text_meta_pinned_to_another_job_imports_with_its_devices_cleared(tmp_path: Any) -> None:
    w, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.full(4, 0.5, np.float32)
    archive = str(tmp_path / "a.npz")
    np.savez(archive, w=w, b=b)
    want = np.ones((1, 3), np.float32) @ w + b
    for device, cleared in (("/job:worker/replica:0/task:1/device:CPU:0", True), ("/device:GPU:3", False)):
        meta = str(tmp_path / "job.pbtxt")
        _small_graph(meta, device=device, as_text=True)
        for engine in ("auto", "tf"):
            out = str(tmp_path / f"{engine}-{cleared}" / "m.ckpt")
            report = ckptbridge.rebuild(archive, out, graph=ckptbridge.Graph(meta=meta), engine=engine)
            assert any("clear_devices=True" in n for n in report.notes) == cleared, report.notes
            assert _y(out).tobytes() == want.tobytes()
            written = V1.MetaGraphDef.FromString(pathlib.Path(out + ".meta").read_bytes())
            assert next(n.device for n in written.graph_def.node if n.name == "w") == ("" if cleared else device)
