"""SavedModel and TF1 Hub module directories as sources (ckptbridge/sources/_savedmodel.py, _readable.py).

tests/data/savedmodel/keras_dense/ is a tf_keras model (Dense, BatchNormalization,
Dense; Adam after one fit step, an "mae" metric) saved by ``model.save(dir)`` as a
SavedModel; tests/data/savedmodel/expected.json records what TensorFlow reads of it:

* ``tensors``: per checkpoint key of ``variables/variables``, its dtype, shape and
  the SHA-256 of its bytes (``tf.train.load_checkpoint``);
* ``saved_variables``: node id -> ``SavedVariable.name``, parsed by TensorFlow's
  own protobuf classes (the oracle of the TensorFlow-free parser);
* ``restored``: variable name -> checkpoint key, as ``tf.saved_model.load``
  restores them (each loaded variable's value found among the checkpoint's, where
  it is unique): the oracle of the names layer's node-id correspondence.

The TensorFlow-free tests hold ckptbridge to those records; the ``tf`` tests check
the records against TensorFlow, and carry fresh SavedModels and a TF1 Hub module
through export, a graph-free import and TensorFlow's own loaders.  Regenerate the
fixture (TensorFlow venv, ``TF_USE_LEGACY_KERAS=1``) with

    PYTHONPATH=.:tests python tests/test_savedmodel.py --regenerate
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge.errors import CorruptError, FormatError
from ckptbridge.sources import _readable, _savedmodel

from helpers import error_line, in_process, leftovers, same

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "savedmodel")
MODEL = os.path.join(DATA, "keras_dense")
EXPECTED = os.path.join(DATA, "expected.json")
VARIABLES = os.path.join(MODEL, "variables", "variables")
GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
WEIGHTS = ["batch_normalization/beta", "batch_normalization/gamma", "batch_normalization/moving_mean",
           "batch_normalization/moving_variance", "dense/bias", "dense/kernel", "dense_1/bias", "dense_1/kernel"]


def _record(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    import hashlib

    return {"dtype": dtype, "shape": list(arr.shape), "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}


def _status(*argv: str) -> tuple[int, str]:
    """The CLI run in this process: (exit status, stderr)."""
    rc, _, err = in_process(*argv)
    return rc, err


def expected() -> dict[str, Any]:
    with open(EXPECTED) as f:
        return json.load(f)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- building with TensorFlow


def build_keras_savedmodel(out: str, seed: int = 7, how: str = "model.save") -> Any:
    """A small tf_keras model, trained one step, saved as a SavedModel at ``out`` by tf_keras's
    ``model.save(dir)`` or by ``tf.saved_model.save``; returns the model."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,))
    x = keras.layers.Dense(3, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    m = keras.Model(inp, keras.layers.Dense(2)(x))
    m.compile(optimizer="adam", loss="mse", metrics=["mae"])
    rng = np.random.default_rng(seed)
    m.fit(rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32), verbose=0, epochs=1)
    if how == "model.save":
        m.save(out)
    else:
        import tensorflow as tf

        tf.saved_model.save(m, out)
    return m


def build_module_savedmodel(out: str, seed: int) -> None:
    """A plain ``tf.Module`` (no Keras) with named variables and a serving signature, by ``tf.saved_model.save``."""
    import tensorflow as tf

    class Affine(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="affine")
            g = tf.random.Generator.from_seed(seed)
            self.w = tf.Variable(g.normal([4, 2]), name="affine/w")
            self.b = tf.Variable(g.normal([2]), name="affine/b")
            self.steps = tf.Variable(3, dtype=tf.int64, name="steps")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return {"y": tf.matmul(x, self.w) + self.b}

    m = Affine()
    tf.saved_model.save(m, out, signatures=m.__call__)


def tf_records(model_dir: str) -> dict[str, Any]:
    """What TensorFlow reads of a SavedModel directory (see the module docstring)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    from ckptbridge.tf.engine import tf_dtype_name

    reader = tf.train.load_checkpoint(os.path.join(model_dir, "variables", "variables"))
    values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != GRAPH_KEY}
    dtypes = reader.get_variable_to_dtype_map()
    tensors = {k: _record(np.asarray(v), tf_dtype_name(dtypes[k])) for k, v in values.items()}
    sm = saved_model_pb2.SavedModel.FromString(open(os.path.join(model_dir, "saved_model.pb"), "rb").read())
    saved = {str(i): n.variable.name for i, n in enumerate(sm.meta_graphs[0].object_graph_def.nodes) if n.WhichOneof("kind") == "variable"}
    restored = {}
    for v in tf.saved_model.load(model_dir).variables:
        value = v.numpy()
        keys = [k for k, x in values.items() if x.dtype == value.dtype and x.shape == value.shape and x.tobytes() == value.tobytes()]
        if len(keys) == 1:
            restored[v.name.split(":")[0]] = keys[0]
    return {"tensors": tensors, "saved_variables": saved, "restored": restored}


def regenerate() -> None:
    shutil.rmtree(MODEL, ignore_errors=True)
    build_keras_savedmodel(MODEL)
    shutil.rmtree(os.path.join(MODEL, "assets"), ignore_errors=True)  # empty; git keeps no empty directory
    with open(EXPECTED, "w") as f:
        json.dump(tf_records(MODEL), f, indent=1, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- TensorFlow-free: the parser


def test_parser_reads_every_saved_variable_as_tensorflow_does():
    objects = _savedmodel.read_objects(os.path.join(MODEL, "saved_model.pb"))
    assert objects is not None
    got = {str(i): o.variable for i, o in enumerate(objects) if o.variable is not None}
    assert got == expected()["saved_variables"]
    assert len(got) == 26  # 8 weights, 12 Adam slots, iteration, learning_rate, 2 x (total, count)


def test_the_two_object_graphs_correspond_node_for_node():
    with ckptbridge.read(VARIABLES) as r:
        graph = r.extras()["object_graph"]
    from ckptbridge.sources import _objgraph

    objects = _objgraph.describe(graph)
    saved = _savedmodel.read_objects(os.path.join(MODEL, "saved_model.pb"))
    assert saved is not None and _readable.corresponds(objects, saved)
    # and the check can fail: the same graphs with two nodes' places swapped do not correspond
    swapped = list(saved)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert not _readable.corresponds(objects, swapped)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "not-utf8"])
def test_a_damaged_saved_model_pb_is_one_clear_error(tmp_path, damage):
    d = tmp_path / "sm"
    shutil.copytree(MODEL, d)
    pb = d / "saved_model.pb"
    data = pb.read_bytes()
    pb.write_bytes({"empty": b"", "garbage": b"\xff" * 64, "truncated": data[: len(data) // 2],
                    "not-utf8": data.replace(b"dense_1/kernel", b"dense_1/\xffernel")}[damage])
    with pytest.raises(CorruptError, match="saved_model.pb"):
        ckptbridge.read(str(d))
    out = tmp_path / "out.npz"
    line = error_line(_status("export", str(d), str(out)), "saved_model.pb", "variables")
    assert "not a readable SavedModel" in line or "is empty" in line or "damaged" in line
    assert not out.exists() and not leftovers(tmp_path)
    # its weights stay readable under their keys
    assert in_process("ls", str(d / "variables" / "variables"))[0] == 0


def test_graphs_that_do_not_correspond_give_the_checkpoints_own_names_and_say_so(tmp_path):
    """A saved_model.pb whose objects' children differ from the checkpoint's (here a child renamed, the
    file still valid) is not trusted for names: the checkpoint's full_name names them, and ls says why."""
    d = tmp_path / "sm"
    shutil.copytree(MODEL, d)
    pb = d / "saved_model.pb"
    pb.write_bytes(pb.read_bytes().replace(b"layer_with_weights-0", b"layer_with_weightsX0"))
    with ckptbridge.read(str(d)) as r, ckptbridge.read(VARIABLES, names="readable") as own:
        assert list(r) == list(own) and "dense/kernel" in r
        assert "does not match its checkpoint's" in r.metadata()["names_note"]
    rc, out, _ = in_process("ls", str(d))
    assert rc == 0 and "names: " in out and "does not match" in out
    with ckptbridge.read(MODEL) as r:
        assert "names_note" not in r.metadata()


def test_damaged_saved_model_pbs_fail_only_with_corrupt_error(tmp_path):
    """Seeded truncations and byte flips of the fixture's saved_model.pb: parsed, or one CorruptError."""
    data = open(os.path.join(MODEL, "saved_model.pb"), "rb").read()
    rng = np.random.default_rng(14)
    pb = tmp_path / "saved_model.pb"
    outcomes = {"parsed": 0, "refused": 0}
    for i in range(200):
        b = bytearray(data)
        if i % 3 == 0:
            b = b[: int(rng.integers(1, len(b)))]
        else:
            for at in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
                b[at] ^= int(rng.integers(1, 256))
        pb.write_bytes(bytes(b))
        try:
            _savedmodel.read_objects(str(pb))
            outcomes["parsed"] += 1
        except CorruptError as e:
            assert "saved_model.pb" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and outcomes["parsed"] > 0, outcomes


def test_the_parse_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(_savedmodel, "MAX_FIELDS", 100)
    with pytest.raises(CorruptError, match="more than 100 protobuf fields"):
        ckptbridge.read(MODEL)


def test_a_crafted_graph_of_millions_of_objects_is_refused(tmp_path):
    """Three million empty objects in 6 MB: refused at the field budget, before they are all built."""
    from ckptbridge.io.wire import field_bytes

    d = tmp_path / "sm"
    shutil.copytree(MODEL, d)
    graph = b"\x0a\x00" * 3_000_000  # SavedObjectGraph.nodes, each an empty SavedObject
    (d / "saved_model.pb").write_bytes(field_bytes(2, field_bytes(7, graph)))
    line = error_line(_status("ls", str(d)), "more than 2,000,000 protobuf fields")
    assert "saved_model.pb" in line


def test_a_saved_model_without_variables_says_so(tmp_path):
    d = tmp_path / "sm"
    shutil.copytree(MODEL, d)
    shutil.rmtree(d / "variables")
    line = error_line(_status("ls", str(d)), "no complete variables checkpoint", "copy")
    assert str(d) in line


def test_the_graph_file_itself_points_at_its_directory():
    line = error_line(_status("ls", os.path.join(MODEL, "saved_model.pb")), "pass the SavedModel's directory")
    assert MODEL in line


# --------------------------------------------------------------------------- TensorFlow-free: names and values


def test_readable_names_are_the_variables_tensorflow_restores():
    want = expected()["restored"]
    assert sorted(want) == WEIGHTS  # the oracle covers every weight of the model
    with ckptbridge.read(MODEL) as r:
        originals = r.metadata()["original_names"]
        for name, key in want.items():
            assert originals[name] == key


def test_every_tensor_is_bit_exact_under_its_readable_name():
    rec = expected()["tensors"]
    with ckptbridge.read(MODEL) as r:
        assert r.kind == "saved-model"
        originals = r.metadata()["original_names"]
        assert sorted(originals.get(n, n) for n in r) == sorted(rec)
        for name in r:
            assert _record(r[name], r.specs[name].dtype) == rec[originals.get(name, name)], name


def test_shared_names_keep_their_keys():
    """tf_keras names both metrics' variables total and count: never merged, they keep their keys."""
    with ckptbridge.read(MODEL) as r:
        metrics = sorted(n for n in r if "metrics" in n)
        assert metrics == [f"keras_api/metrics/{i}/{v}/.ATTRIBUTES/VARIABLE_VALUE" for i in (0, 1) for v in ("count", "total")]
        assert "total" not in r and "count" not in r
        assert len(set(r.metadata()["original_names"].values())) == len(r.metadata()["original_names"])


def test_settle_never_merges_two_tensors():
    keys = ["a/.ATTRIBUTES/VARIABLE_VALUE", "b/.ATTRIBUTES/VARIABLE_VALUE", "c", "d/.ATTRIBUTES/VARIABLE_VALUE", "e"]
    proposed = {keys[0]: "w", keys[1]: "w", keys[3]: "c", "e": "bad\x01name"}
    assert _readable.settle(keys, proposed) == {k: k for k in keys}
    assert _readable.settle(keys, {keys[0]: "w"}) == {"w": keys[0], **{k: k for k in keys[1:]}}


def test_names_keys_shows_the_checkpoint_keys():
    with ckptbridge.read(MODEL, names="keys") as r, ckptbridge.read(VARIABLES) as v:
        assert list(r) == list(v)
        assert "original_names" not in r.metadata()


def test_ls_shows_both_names():
    rc, out, _ = in_process("ls", MODEL)
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("dense/kernel "))
    assert line.endswith("<- layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    rc, out, _ = in_process("ls", MODEL, "--json")
    doc = json.loads(out)
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["dense/kernel"]["original_name"] == "layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert doc["kind"] == "saved-model"


def test_weights_only_leaves_optimizer_and_metrics_out_whatever_their_names():
    report = ckptbridge.export(MODEL, "unused.npz", ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)), dry_run=True)
    assert sorted(report.written) == WEIGHTS
    assert "iteration" in report.dropped and "learning_rate" in report.dropped and "Adam/m/dense/kernel" in report.dropped
    # Each reason true to what the tensor holds: the "mae" and loss metrics' totals are not the optimizer's.
    metrics = {n for n in report.dropped if n.startswith("keras_api/metrics/")}
    assert len(metrics) == 4
    assert all(why == ("metric state" if n in metrics else "optimizer state") + " (weights only)" for n, why in report.dropped.items())


def test_filters_and_renames_see_the_readable_names(tmp_path):
    out = tmp_path / "w.safetensors"
    ckptbridge.export(MODEL, str(out),
                      ckptbridge.Naming(select=ckptbridge.Select(include=["^dense"]), rename=ckptbridge.Rename(rules=[('^dense_1/', 'head/')])))
    with ckptbridge.read(str(out)) as r:
        assert sorted(r) == ["dense/bias", "dense/kernel", "head/bias", "head/kernel"]
        assert r.metadata()["original_names"]["head/kernel"] == "layer_with_weights-2/kernel/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.mark.parametrize("flags", [[], ["--original-names"], ["--names", "keys"]])
@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors"])
def test_export_then_import_gives_back_the_variables_checkpoint(tmp_path, fmt, flags):
    """A plain import writes the keys of the names --names gave back, as --original-names does."""
    arc = tmp_path / f"m.{fmt}"
    assert in_process("export", MODEL, str(arc))[0] == 0
    with ckptbridge.read(str(arc)) as r:
        assert "dense/kernel" in r and r.metadata()["engine"] == "native"
    prefix = tmp_path / "variables" / "variables"
    assert in_process("import", str(arc), str(prefix), *flags)[0] == 0
    d = ckptbridge.diff(str(prefix), VARIABLES)
    assert d.identical, (d.only_a, d.only_b, d.value_diffs)
    with ckptbridge.read(str(prefix)) as a, ckptbridge.read(VARIABLES) as b:
        assert a.extras()["object_graph"] == b.extras()["object_graph"]  # byte for byte: TensorFlow restores by it
    # and a SavedModel directory diffs and verifies like a checkpoint
    assert in_process("diff", MODEL, str(arc))[0] == 0
    rc, out, _ = in_process("verify", MODEL)
    assert rc == 0 and "ok: 26 tensors" in out


def test_import_reads_a_savedmodel_directory_as_its_source(tmp_path):
    for flags in ([], ["--original-names"]):
        keys = tmp_path / f"keys{len(flags)}" / "variables"
        rc, _, err = in_process("import", MODEL, str(keys), *flags)
        assert rc == 0, err
        assert ckptbridge.diff(str(keys), VARIABLES).identical
    readable = tmp_path / "readable" / "ckpt"
    rc, _, err = in_process("import", MODEL, str(readable), "--include", "^(dense|batch)", "--names", "readable")
    assert rc == 0, err
    assert "object graph left out" in err and "/.ATTRIBUTES/" in err  # TensorFlow could not restore it by object
    with ckptbridge.read(str(readable)) as r:
        assert sorted(r) == WEIGHTS and r.extras() == {}


def test_import_keeps_an_export_rename_and_writes_the_other_keys_back(tmp_path):
    """Only the names the names layer gave go back to their keys: the user's --rename survives."""
    arc = tmp_path / "m.npz"
    assert in_process("export", MODEL, str(arc), "--rename", "^dense_1/=head/")[0] == 0
    prefix = tmp_path / "ck" / "variables"
    rc, _, err = in_process("import", str(arc), str(prefix))
    assert rc == 0, err
    head = {"head/kernel": "layer_with_weights-2/kernel/.ATTRIBUTES/VARIABLE_VALUE",
            "head/bias": "layer_with_weights-2/bias/.ATTRIBUTES/VARIABLE_VALUE"}
    with ckptbridge.read(str(prefix)) as got, ckptbridge.read(VARIABLES) as want:
        assert sorted(got) == sorted([*head, *(k for k in want if k not in head.values())])
        for name in got:
            assert same(got[name], want[head.get(name, name)]), name
    # an import --rename is the user's too; --original-names undoes every rename
    report = ckptbridge.rebuild(str(arc), str(tmp_path / "x" / "ckpt"),
                                ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^dense/', 'first/')])), dry_run=True)
    assert {"first/kernel", "head/kernel", "layer_with_weights-1/gamma/.ATTRIBUTES/VARIABLE_VALUE"} <= set(report.written)
    report = ckptbridge.rebuild(str(arc), str(tmp_path / "x" / "ckpt"), ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)),
                                dry_run=True)
    assert set(report.written) == set(expected()["tensors"])
    # through a graph, whose variables are matched by name, the readable names stay
    report = ckptbridge.rebuild(str(arc), str(tmp_path / "x" / "ckpt"), graph=ckptbridge.Graph("vgg_16"), dry_run=True)
    assert "dense/kernel" in report.written and "head/kernel" in report.written


def test_import_names_readable_keeps_the_readable_names(tmp_path):
    arc = tmp_path / "m.safetensors"
    assert in_process("export", MODEL, str(arc))[0] == 0
    prefix = tmp_path / "ck" / "ckpt"
    rc, _, err = in_process("import", str(arc), str(prefix), "--names", "readable")
    assert rc == 0, err
    assert "object graph left out" in err
    with ckptbridge.read(str(prefix)) as got, ckptbridge.read(str(arc)) as want:
        assert list(got) == list(want) and "dense/kernel" in got
        assert all(same(got[n], want[n]) for n in got)
    line = error_line(_status("import", str(arc), str(tmp_path / "y" / "ckpt"), "--names", "readable", "--original-names"),
                      "--original-names", "--names readable")
    assert "give one of them" in line and not (tmp_path / "y").exists()


def test_names_readable_on_an_archive_is_refused(tmp_path):
    arc = tmp_path / "m.npz"
    ckptbridge.export(MODEL, str(arc))
    error_line(_status("ls", str(arc), "--names", "readable"), "--names readable", "archive")
    with pytest.raises(FormatError, match="names='keys'"):
        ckptbridge.read(str(arc), names="keys")


# --------------------------------------------------------------------------- with TensorFlow


def _tf() -> Any:
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        pytest.skip("needs TF_USE_LEGACY_KERAS=1 (tf_keras saves the SavedModel)")
    pytest.importorskip("tf_keras")
    return pytest.importorskip("tensorflow")


@pytest.mark.tf
def test_the_records_are_what_tensorflow_reads():
    _tf()
    assert tf_records(MODEL) == expected()


def _build(how: str, out: str, seed: int) -> None:
    if how == "tf.Module":
        build_module_savedmodel(out, seed)
    else:
        build_keras_savedmodel(out, seed, how)


#: how the SavedModel is written -> names its export must show
BUILT = {"model.save": ["dense/kernel", "Adam/m/dense/kernel", "batch_normalization/moving_mean"],
         "tf.saved_model.save": ["dense/kernel", "Adam/m/dense/kernel", "batch_normalization/moving_mean"],
         "tf.Module": ["affine/w", "affine/b", "steps"]}


@pytest.mark.tf
@pytest.mark.parametrize("how", list(BUILT))
def test_a_fresh_savedmodel_round_trips_graph_free_and_runs_identically(tmp_path, how):
    """Export a SavedModel with readable names, bit-exact against TensorFlow; import it graph-free
    under its keys into a copy of the SavedModel; TensorFlow loads both and computes the same outputs."""
    tf = _tf()
    src = str(tmp_path / "sm")
    _build(how, src, seed=11)
    reader = tf.train.load_checkpoint(os.path.join(src, "variables", "variables"))
    arc = tmp_path / "m.npz"
    assert in_process("export", src, str(arc))[0] == 0
    with ckptbridge.read(str(arc)) as r:
        originals = r.metadata()["original_names"]
        unnumbered = {re.sub(r"_\d+(?=/)", "", n) for n in r}  # tf_keras numbers a process's second "dense" dense_1
        assert set(BUILT[how]) <= unnumbered, list(r)
        for name in r:
            want = np.asarray(reader.get_tensor(originals.get(name, name)))
            assert same(r[name], want), name
        assert len(r) == len(reader.get_variable_to_shape_map()) - 1  # all but the object graph, which is carried
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("variables"))
    assert in_process("import", str(arc), str(copy / "variables" / "variables"), "--original-names")[0] == 0
    x = tf.constant(np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32))
    outs = []
    for d in (src, str(copy)):
        loaded = tf.saved_model.load(d)
        outs.append(loaded.signatures["serving_default"](x))
    assert list(outs[0]) == list(outs[1])
    for k in outs[0]:
        assert outs[0][k].numpy().tobytes() == outs[1][k].numpy().tobytes()
    # the check can fail: a SavedModel with other weights computes something else
    other = str(tmp_path / "other")
    _build(how, other, seed=12)
    (y,) = tf.saved_model.load(other).signatures["serving_default"](x).values()  # its output is named by its own layer
    (want,) = outs[0].values()
    assert y.numpy().tobytes() != want.numpy().tobytes()


def _variables(tf: Any, model_dir: str) -> list[Any]:
    """Every variable ``tf.saved_model.load`` restores of a SavedModel, in its object graph's order."""
    loaded = tf.saved_model.load(model_dir)
    return [o for o in tf.train.TrackableView(loaded).descendants() if isinstance(o, tf.Variable)]


@pytest.mark.tf
def test_a_plain_export_and_import_restores_every_variable_bit_exact(tmp_path):
    """Export a fresh SavedModel (readable names), import the archive with no flags into a copy of it:
    tf.saved_model.load restores every variable of the copy, bit for bit.  (A tf.Module's would restore
    by name without its object graph; tf_keras's metrics share the names total and count.)"""
    tf = _tf()
    how = "model.save"
    src = str(tmp_path / "sm")
    _build(how, src, seed=13)
    arc = tmp_path / "m.h5"
    assert in_process("export", src, str(arc))[0] == 0
    with ckptbridge.read(str(arc)) as r:
        assert any("/.ATTRIBUTES/" not in n for n in r)  # the archive holds readable names
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("variables"))
    rc, _, err = in_process("import", str(arc), str(copy / "variables" / "variables"))
    assert rc == 0, err
    want, got = _variables(tf, src), _variables(tf, str(copy))
    n = len(tf.train.load_checkpoint(os.path.join(src, "variables", "variables")).get_variable_to_shape_map()) - 1
    assert len(want) == len(got) == n  # every tensor of the checkpoint but its object graph is a variable restored
    for a, b in zip(want, got):
        assert a.name == b.name and same(b.numpy(), a.numpy()), a.name
    _build(how, str(tmp_path / "other"), seed=14)
    other = _variables(tf, str(tmp_path / "other"))
    assert not all(same(a.numpy(), b.numpy()) for a, b in zip(want, other))  # the comparison can fail


HUB_MODULE_DEF = b"\x08\x03"  # tensorflow_hub's ModuleDef {format: FORMAT_V3}


def build_tf1_hub_module(out: str, seed: int) -> list[str]:
    """A TF1 Hub-format module (what ``hub.create_module_spec(...).export`` writes): a TF1 SavedModel from
    ``tf.compat.v1.saved_model.Builder`` and ``tfhub_module.pb``; returns its variables' names."""
    import tensorflow as tf

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        v1.set_random_seed(seed)
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        with v1.variable_scope("module"):
            w = v1.get_variable("dense/kernel", [4, 3], initializer=v1.random_normal_initializer(seed=seed))
            b = v1.get_variable("dense/bias", [3], initializer=v1.random_normal_initializer(seed=seed + 1))
            steps = v1.get_variable("steps", [], dtype=tf.int64, initializer=v1.constant_initializer(7))
            y = tf.nn.relu(tf.matmul(x, w) + b, name="y")
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(out)
            sig = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(sess, [v1.saved_model.SERVING], signature_def_map={"default": sig})
            builder.save()
        names = [v.op.name for v in (w, b, steps)]
    with open(os.path.join(out, _savedmodel.HUB_MODULE_PB), "wb") as f:
        f.write(HUB_MODULE_DEF)
    return names


def _run_tf1(tf: Any, model_dir: str, x: np.ndarray) -> np.ndarray:
    v1 = tf.compat.v1
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        meta = v1.saved_model.loader.load(sess, [v1.saved_model.SERVING], model_dir)
        sig = meta.signature_def["default"]
        return sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: x})  # type: ignore[no-any-return]


@pytest.mark.tf
def test_a_tf1_hub_module_round_trips_graph_free_and_runs_identically(tmp_path):
    tf = _tf()
    src = str(tmp_path / "hub")
    names = build_tf1_hub_module(src, seed=5)
    reader = tf.train.load_checkpoint(os.path.join(src, "variables", "variables"))
    with ckptbridge.read(src) as r:
        assert r.kind == "hub-module"
        assert sorted(r) == sorted(names) == sorted(reader.get_variable_to_shape_map())  # TF1 names already
        assert "original_names" not in r.metadata()
        for name in r:
            assert same(r[name], np.asarray(reader.get_tensor(name))), name
    arc = tmp_path / "hub.h5"
    assert in_process("export", src, str(arc))[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("variables"))
    assert in_process("import", str(arc), str(copy / "variables" / "variables"), "--original-names")[0] == 0
    assert ckptbridge.diff(src, str(copy)).identical
    x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    want = _run_tf1(tf, src, x)
    got = _run_tf1(tf, str(copy), x)
    assert want.dtype == got.dtype and want.tobytes() == got.tobytes()
    other = str(tmp_path / "other")
    build_tf1_hub_module(other, seed=6)
    assert _run_tf1(tf, other, x).tobytes() != want.tobytes()  # the comparison can fail


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        regenerate()
    else:
        sys.exit("usage: PYTHONPATH=.:tests python tests/test_savedmodel.py --regenerate   (in the TensorFlow venv)")
