"""The TF2 object graph stays true to the tensors written (issue 17, item 2), and
recorded original names are checked like every other archive name (hostile finding 9).

TF-free tests build TrackableObjectGraph bytes with a small encoder below
(field numbers from tensorflow/core/protobuf/trackable_object_graph.proto); the
tf-marked ones take checkpoints TensorFlow wrote for a tf-keras model and its
Adam optimizer, convert them with the CLI, and restore the result in a fresh
TensorFlow process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptbridge
from ckptbridge.io.wire import field_bytes, field_varint

from helpers import ERR, assert_one_line_error, cli, in_process

V = "/.ATTRIBUTES/VARIABLE_VALUE"


def _og() -> Any:
    # Imported per test, so that on a tree without the module only its own tests fail.
    from ckptbridge.sources import _objgraph as objgraph

    return objgraph


# --------------------------------------------------------------------------- a tiny encoder


def _node(children=(), attrs=(), slots=(), has_values: bool | None = None, saver: str | None = None, unknown: bytes = b"") -> bytes:
    """One TrackableObject: children [(id, local name)], attrs [checkpoint key], slots [(original id, slot name, slot id)]."""
    out = b""
    for nid, name in children:
        out += field_bytes(1, (field_varint(1, nid) if nid else b"") + field_bytes(2, name.encode()))
    for key in attrs:
        out += field_bytes(2, field_bytes(1, b"VARIABLE_VALUE") + field_bytes(2, b"full/" + key.encode()) + field_bytes(3, key.encode()))
    for orig, name, slot in slots:
        out += field_bytes(3, field_varint(1, orig) + field_bytes(2, name.encode()) + field_varint(3, slot))
    if saver is not None:
        out += field_bytes(4, field_bytes(1, saver.encode()) + field_bytes(2, b"obj"))
    if has_values is not None:
        out += field_bytes(5, field_varint(1, 1) if has_values else b"")
    return out + unknown


def _graph(*nodes: bytes, unknown: bytes = b"") -> bytes:
    return b"".join(field_bytes(1, n) for n in nodes) + unknown


def keras_like(unknown: bytes = b"") -> bytes:
    """root -> model (two dense layers, one weightless dropout), optimizer (legacy: iter + m slots), save_counter."""
    return _graph(
        _node([(1, "model"), (2, "optimizer"), (3, "save_counter")], has_values=True),  # 0
        _node([(4, "layer_with_weights-0"), (4, "layer-0"), (5, "layer-1"), (6, "layer_with_weights-1")], has_values=True),  # 1
        _node([(7, "iter")], slots=[(8, "m", 12), (9, "m", 13)], has_values=True),  # 2
        _node(attrs=["save_counter" + V], has_values=True),  # 3
        _node([(8, "kernel")], has_values=True),  # 4
        _node(has_values=False, unknown=unknown),  # 5: dropout
        _node([(9, "kernel"), (10, "bias")], has_values=True),  # 6
        _node(attrs=["optimizer/iter" + V], has_values=True),  # 7
        _node(attrs=["model/layer_with_weights-0/kernel" + V], has_values=True),  # 8
        _node(attrs=["model/layer_with_weights-1/kernel" + V], has_values=True),  # 9
        _node(attrs=["model/layer_with_weights-1/bias" + V], has_values=True),  # 10
        _node(has_values=False),  # 11: an unreferenced empty object
        _node(attrs=["model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m" + V], has_values=True),  # 12
        _node(attrs=["model/layer_with_weights-1/kernel/.OPTIMIZER_SLOT/optimizer/m" + V], has_values=True),  # 13
        unknown=unknown,
    )


KEYS = [  # every checkpoint key of keras_like(), in node order
    "save_counter" + V,
    "optimizer/iter" + V,
    "model/layer_with_weights-0/kernel" + V,
    "model/layer_with_weights-1/kernel" + V,
    "model/layer_with_weights-1/bias" + V,
    "model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m" + V,
    "model/layer_with_weights-1/kernel/.OPTIMIZER_SLOT/optimizer/m" + V,
]


def decode(payload: bytes) -> list[dict[str, Any]]:
    """The graph as plain data, through the module's own reader (no TensorFlow)."""
    og = _og()
    _, nodes = og._parse(payload)
    out = []
    for n in nodes:
        hv = [f for f in n.fields if f.number == 5]
        out.append({
            "children": list(n.children.values()),
            "attrs": [a.key for a in n.attrs.values()],
            "slots": list(n.slots.values()),
            "has_values": None if not hv else og._flag(hv[-1]),
        })
    return out


def identity(names: Any) -> dict[str, str]:
    return {k: k for k in names}


# --------------------------------------------------------------------------- rewrite and prune (TF-free)


def test_unchanged_graph_is_the_same_bytes():
    og = _og()
    g = keras_like()
    out, note = og.carry(g, identity(KEYS + ["an/extra/tensor"]))
    assert out is g and note is None


def test_weights_only_prunes_optimizer_and_save_counter():
    og = _og()
    kept = [k for k in KEYS if k.startswith("model/") and "OPTIMIZER_SLOT" not in k]
    out, note = og.carry(keras_like(), identity(kept))
    assert note is not None and "pruned to" in note and "4 values not written" in note
    nodes = decode(out)
    # root, model, layer0, dropout, layer1, three variables, the unreferenced empty object;
    # the optimizer, its slots and save_counter are gone.
    assert len(nodes) == 9
    assert nodes[0]["children"] == [1]
    assert nodes[1]["children"] == [2, 2, 3, 4]
    assert sorted(k for n in nodes for k in n["attrs"]) == sorted(kept)
    assert nodes[3] == {"children": [], "attrs": [], "slots": [], "has_values": False}  # the dropout stays, as TF wrote it
    assert nodes[8] == nodes[3]
    assert all(n["has_values"] for i, n in enumerate(nodes) if i not in (3, 8))


def test_excluding_a_variable_keeps_it_for_its_slot():
    """A written slot restores through its optimizer and its variable: both stay, the variable without a value."""
    og = _og()
    kept = [k for k in KEYS if k != "model/layer_with_weights-0/kernel" + V]
    out, _ = og.carry(keras_like(), identity(kept))
    nodes = decode(out)
    keys = [n["attrs"] for n in nodes]
    var = next(i for i, n in enumerate(nodes) if n["attrs"] == [] and n["has_values"] and not n["children"] and i > 3)
    slot = keys.index(["model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m" + V])
    opt = next(i for i, n in enumerate(nodes) if n["slots"])
    assert (var, slot) in nodes[opt]["slots"]
    assert var in nodes[next(i for i, n in enumerate(nodes) if n["children"] == [var])]["children"]


def test_dropped_slot_drops_its_reference_and_renumbers():
    og = _og()
    kept = [k for k in KEYS if "layer_with_weights-1/kernel/.OPTIMIZER_SLOT" not in k]
    out, _ = og.carry(keras_like(), identity(kept))
    nodes = decode(out)
    opt = nodes[nodes[0]["children"][1]]
    assert len(opt["slots"]) == 1
    orig, slot = opt["slots"][0]
    assert nodes[orig]["attrs"] == ["model/layer_with_weights-0/kernel" + V]
    assert nodes[slot]["attrs"] == ["model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m" + V]


def test_optimizer_excluded_but_slots_written_keeps_the_optimizer_for_them():
    og = _og()
    kept = [k for k in KEYS if not k.startswith("optimizer/")]
    nodes = decode(og.carry(keras_like(), identity(kept))[0])
    opt = nodes[nodes[0]["children"][1]]
    assert opt["children"] == [] and len(opt["slots"]) == 2 and opt["has_values"]


def test_rename_rewrites_keys_and_keeps_everything_else_verbatim():
    og = _og()
    unknown = field_varint(99, 7) + field_bytes(98, b"\x00opaque")
    g = keras_like(unknown)
    ren = {k: "net/" + k for k in KEYS}
    out, note = og.carry(g, ren)
    assert note is not None and f"{len(KEYS)} keys renamed" in note
    assert sorted(og.checkpoint_keys(out)) == sorted(ren.values())
    assert out.endswith(unknown) and out.count(unknown) == 2  # the graph's and the dropout node's
    assert out.count(b"full/save_counter") == 1  # full_name kept
    back, _ = og.carry(out, {v: k for k, v in ren.items()})
    assert back == g


def test_ema_swap_keeps_the_variable_its_own_key():
    """--use-ema writes X from X/ExponentialMovingAverage; the graph's X is still X, and the EMA object goes."""
    og = _og()
    ema = "/ExponentialMovingAverage"
    g = _graph(_node([(1, "w"), (2, "ema")], has_values=True), _node(attrs=["w" + V], has_values=True),
               _node(attrs=["w" + V + ema], has_values=True))
    from ckptbridge.pipe.names import make_plan

    plan = make_plan(["w" + V, "w" + V + ema], use_ema=True)
    keys = og.key_map(plan.mapping, plan.ema_swaps)
    assert keys == {"w" + V: "w" + V}
    nodes = decode(og.carry(g, keys)[0])
    assert [n["attrs"] for n in nodes] == [[], ["w" + V]]


def test_key_map_goes_through_a_renaming_view():
    og = _og()
    keys = og.key_map({"new/a": "new/a", "new/b": "new/b"}, {}, {"new/a": "a", "new/b": "b"}.__getitem__)
    assert keys == {"a": "new/a", "b": "new/b"}


@pytest.mark.parametrize("payload, why", [
    (b"\x0a\xff", "not a readable"),
    (_graph(_node([(5, "x")]), _node(attrs=["a"])), "not a readable"),  # a child id past the end
    (_graph(_node([(1, "s")]), _node(attrs=["a"], saver="tf.Saver")), "registered savers (tf.Saver)"),
    (_graph(_node([(1, "x")]), _node(attrs=["gone"])), "describes none of the tensors written"),
])
def test_graphs_that_cannot_be_made_true_are_left_out_with_a_reason(payload, why):
    og = _og()
    out, note = og.carry(payload, {"a-renamed": "a-renamed"} if "saver" not in why else {"b": "b"})
    assert out is None
    assert note is not None and note.startswith("left out: ") and why in note


def test_a_graph_past_the_field_budget_is_left_out(monkeypatch):
    og = _og()
    monkeypatch.setattr(og, "MAX_FIELDS", 20)
    out, note = og.carry(keras_like(), identity(KEYS[:2]))
    assert out is None and "more than 20 protobuf fields" in note


def test_registered_saver_graph_is_carried_when_nothing_changes():
    og = _og()
    g = _graph(_node([(1, "s")]), _node(attrs=["a"], saver="tf.Saver"))
    assert og.carry(g, {"a": "a"}) == (g, None)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=len(KEYS), max_size=len(KEYS)), st.booleans())
def test_any_selection_gives_a_graph_of_exactly_those_keys(keep, rename):
    og = _og()
    chosen = [k for k, b in zip(KEYS, keep) if b]
    keys = {k: ("x/" + k if rename else k) for k in chosen}
    out, note = og.carry(keras_like(), keys)
    if not chosen:
        assert out is None and "none of the tensors" in note
        return
    assert sorted(og.checkpoint_keys(out)) == sorted(keys.values())
    nodes = decode(out)
    assert nodes[0]["has_values"]
    # Every object left has a value below it, or never had one (the dropout).
    assert all(n["has_values"] or (not n["attrs"] and not n["children"] and not n["slots"]) for n in nodes)
    again, note2 = og.carry(out, identity(keys.values()))
    assert again is out and note2 is None  # true graphs are left alone


# --------------------------------------------------------------------------- through the pipe (TF-free)


def _write_tf2_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    from ckptbridge.bundle.writer import BundleWriter

    arrays = {k: np.arange(i + 2, dtype=np.float32) for i, k in enumerate(KEYS)}
    w = BundleWriter(prefix)
    for k in sorted(arrays):
        w.write(k, arrays[k])
    w.write_extra("object_graph", keras_like())
    w.commit()
    return arrays


def _graph_of(prefix: str) -> bytes | None:
    with ckptbridge.read(prefix) as r:
        return r.extras().get("object_graph")


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors"])
def test_filtered_export_records_a_true_graph_and_import_writes_it(tmp_path, fmt):
    og = _og()
    pytest.importorskip({"npz": "numpy", "h5": "h5py", "safetensors": "safetensors"}[fmt])
    src = str(tmp_path / "src")
    _write_tf2_checkpoint(src)
    out = str(tmp_path / f"w.{fmt}")
    report = ckptbridge.export(src, out, ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    assert report.object_graph is not None and "pruned" in report.object_graph
    with ckptbridge.read(out) as r:
        assert r.metadata()["object_graph"] == report.object_graph
        assert sorted(og.checkpoint_keys(r.extras()["object_graph"])) == sorted(r)
    back = str(tmp_path / "back" / "ckpt")
    rep2 = ckptbridge.rebuild(out, back, ckptbridge.Naming(select=ckptbridge.Select(exclude=["layer_with_weights-1/bias"])))
    with ckptbridge.read(back) as r:
        assert sorted(og.checkpoint_keys(r.extras()["object_graph"])) == sorted(r) == sorted(rep2.written)


def test_rename_and_original_names_round_trip_the_graph_bytes(tmp_path):
    src = str(tmp_path / "src")
    _write_tf2_checkpoint(src)
    out = str(tmp_path / "r.npz")
    ckptbridge.export(src, out, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^model/', 'net/')])))
    back = str(tmp_path / "back" / "ckpt")
    report = ckptbridge.rebuild(out, back, ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)))
    assert report.object_graph is not None and "renamed" in report.object_graph
    assert _graph_of(back) == keras_like()


def test_cli_says_when_the_graph_is_left_out(tmp_path):
    from ckptbridge.bundle.writer import BundleWriter

    src = str(tmp_path / "src")
    w = BundleWriter(src)
    for k in ("a", "b"):
        w.write(k, np.ones(2, np.float32))
    w.write_extra("object_graph", _graph(_node([(1, "s")]), _node(attrs=["a", "b"], saver="tf.Saver")))
    w.commit()
    out = tmp_path / "a.npz"
    proc = cli("export", src, str(out), "--exclude", "^b$")
    assert proc.returncode == 0, proc.stderr
    assert "TF2 object graph left out: objects in it use registered savers (tf.Saver)" in proc.stderr
    with ckptbridge.read(str(out)) as r:
        assert "object_graph" not in r.extras()
        assert r.metadata()["object_graph"].startswith("left out: ")


# --------------------------------------------------------------------------- --original-names (hostile finding 9)


def _archive_with_original_names(path: str, originals: dict[str, str], **entries: Any) -> None:
    import crc32c

    w = np.zeros(3, np.float32)
    doc = {"format": "ckptbridge", "format_version": 1, "original_names": originals, **entries,
           "tensors": {"w": {"dtype": "float32", "shape": [3], "encoding": "raw", "crc32c": crc32c.crc32c(w.tobytes())}}}

    def npy(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        np.lib.format.write_array(b, a)
        return b.getvalue()

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy(w))
        z.writestr("__ckptbridge__.npy", npy(np.frombuffer(json.dumps(doc).encode(), np.uint8)))


HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mHELLO"


@pytest.mark.parametrize("command", ["import", "export"])
def test_original_names_with_escape_sequences_are_refused(tmp_path, command):
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, {"w": HOSTILE})
    if command == "import":
        out = tmp_path / "ck"
        proc = cli("import", arc, str(out / "model.ckpt"), "--original-names")
    else:
        out = tmp_path / "out.npz"
        proc = cli("export", arc, str(out))
    line = assert_one_line_error(proc, "e.npz", "original name")
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "\x00" not in proc.stderr
    assert line.startswith(ERR)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]


@pytest.mark.parametrize("originals", [{"w": "a\x00b"}, {"w": "w\u009b31m"}, {"w": "x\ty"}, {"w": ""}, {"\x1b[2Jw": "w"}])
@pytest.mark.parametrize("dry_run", [False, True])
def test_every_unsafe_original_name_is_refused_before_anything_is_written(tmp_path, originals, dry_run):
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, originals)
    with pytest.raises(ckptbridge.CorruptError, match="original name"):
        ckptbridge.rebuild(arc, str(tmp_path / "ck" / "model.ckpt"), ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)),
                           dry_run=dry_run)
    with pytest.raises(ckptbridge.CorruptError, match="original name"):
        ckptbridge.export(arc, str(tmp_path / "out.npz"), dry_run=dry_run)
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]
    with ckptbridge.read(arc) as r:  # names are only refused where they are used
        assert list(r) == ["w"]


@pytest.mark.parametrize("record", [{"w": "a\x00b"}, {"w": "x\ty"}, {"w": ""}, {"\x1b[2Jw": "w"}, ["w"]])
def test_every_unsafe_readable_name_record_is_refused_by_a_plain_import(tmp_path, record):
    """A plain import writes the recorded keys of readable names (readable_names): checked as original names are."""
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, {}, readable_names=record)
    for dry_run in (False, True):
        with pytest.raises(ckptbridge.CorruptError, match="recorded checkpoint key"):
            ckptbridge.rebuild(arc, str(tmp_path / "ck" / "model.ckpt"), dry_run=dry_run)
        with pytest.raises(ckptbridge.CorruptError, match="recorded checkpoint key"):
            ckptbridge.export(arc, str(tmp_path / "out.npz"), dry_run=dry_run)
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]
    report = ckptbridge.rebuild(arc, str(tmp_path / "ck" / "model.ckpt"), read=ckptbridge.ReadOptions(names="readable"), dry_run=True)
    assert report.written == ["w"]  # the record is only read where it is used


def test_a_hostile_readable_name_record_is_one_clean_line(tmp_path):
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, {}, readable_names={"w": HOSTILE})
    proc = cli("import", arc, str(tmp_path / "ck" / "model.ckpt"))
    line = assert_one_line_error(proc, "e.npz", "recorded checkpoint key")
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and line.startswith(ERR)
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]


# --------------------------------------------------------------------------- restored by TensorFlow


_BUILD = textwrap.dedent(
    """
    import os, sys
    import tensorflow as tf, tf_keras
    out = sys.argv[1]

    def model():
        return tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,)), tf_keras.layers.Dropout(0.1), tf_keras.layers.Dense(2)])

    for kind, cls in (("adam", tf_keras.optimizers.Adam), ("legacy", tf_keras.optimizers.legacy.Adam)):
        tf.keras.utils.set_random_seed(1)
        m, opt = model(), cls(0.01)
        x = tf.random.stateless_normal([2, 3], seed=[1, 2])
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(m(x) ** 2)
        opt.apply_gradients(zip(t.gradient(loss, m.trainable_variables), m.trainable_variables))
        tf.train.Checkpoint(model=m, optimizer=opt).save(os.path.join(out, kind, "ckpt"))
    """
)

_RESTORE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf, tf_keras
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    result = {}
    for name, (prefix, optimizer, check) in cases.items():
        try:
            tf.keras.utils.set_random_seed(99)  # not the seed the checkpoints were made with
            m = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,)), tf_keras.layers.Dropout(0.1), tf_keras.layers.Dense(2)])
            objects = {"model": m}
            if optimizer:
                opt = (tf_keras.optimizers.legacy.Adam if optimizer == "legacy" else tf_keras.optimizers.Adam)(0.5)
                opt.apply_gradients(zip([tf.zeros_like(v) for v in m.trainable_variables], m.trainable_variables))  # builds its slots
                objects["optimizer"] = opt
            status = tf.train.Checkpoint(**objects).restore(prefix)
            status.assert_consumed() if check == "consumed" else status.expect_partial()
            np.savez(f"{out}/{name}.npz", **{str(i): v.numpy() for i, v in enumerate(m.weights)})
            result[name] = "ok"
        except Exception as e:
            result[name] = f"{type(e).__name__}: {e}"[:2000]
    print(json.dumps(result))
    """
)


def _tf_env() -> dict[str, str]:
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


#: name -> (source checkpoint, archive suffix, export options, import options, optimizer to restore with too,
#: "partial" (expect_partial) or "consumed" (assert_consumed))
CASES: dict[str, tuple[str, str, list[str], list[str], str | None, str]] = {
    "weights_only": ("adam", "npz", ["--weights-only"], [], None, "partial"),
    "exclude_optimizer": ("legacy", "h5", ["--exclude", "^optimizer/"], [], "legacy", "partial"),  # its slots stay
    "exclude_on_import": ("adam", "safetensors", [], ["--exclude", "^(optimizer|save_counter)/"], None, "partial"),
    "rename": ("adam", "npz", ["--rename", "^model/=net/"], [], None, "partial"),
    "rename_then_original_names": ("legacy", "h5", ["--rename", "^model/=net/", "--weights-only"], ["--original-names"], None, "partial"),
    "rename_unfiltered_consumed": ("legacy", "npz", ["--rename", "layer_with_weights=L"], [], "legacy", "consumed"),
    "unfiltered_consumed": ("legacy", "safetensors", [], [], "legacy", "consumed"),
    "unfiltered_consumed_adam": ("adam", "npz", [], [], "adam", "consumed"),
}


@pytest.fixture(scope="module")
def restored(module_tmp: Any) -> dict[str, Any]:
    """Build both checkpoints in one TensorFlow process, convert each case with the CLI
    (export, then graph-free import), restore every result in one fresh TensorFlow process."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    d = module_tmp("objgraph")
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(d)], capture_output=True, text=True, env=_tf_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = {k: str(d / k / "ckpt-1") for k in ("adam", "legacy")}
    cases: dict[str, Any] = {"original_adam": (src["adam"], None, "partial"), "original_legacy": (src["legacy"], None, "partial")}
    logs = {}
    for name, (kind, fmt, exp, imp, optimizer, check) in CASES.items():
        arc = str(d / f"{name}.{fmt}")
        prefix = str(d / name / "ckpt")
        logs[name] = (in_process("export", src[kind], arc, *exp), in_process("import", arc, prefix, *imp))  # no TensorFlow for these
        cases[name] = (prefix, optimizer, check)
    proc = subprocess.run([sys.executable, "-c", _RESTORE, json.dumps(cases), str(d)], capture_output=True, text=True,
                          env=_tf_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": d, "src": src, "logs": logs, "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def _weights(d: Any, name: str) -> list[np.ndarray]:
    with np.load(d / f"{name}.npz") as z:
        return [z[str(i)] for i in range(len(z.files))]


@pytest.mark.tf
@pytest.mark.parametrize("case", list(CASES))
def test_tensorflow_restores_the_converted_checkpoint(restored, case):
    (rc1, _, err1), (rc2, _, err2) = restored["logs"][case]
    assert rc1 == 0 and rc2 == 0, (err1, err2)
    assert restored["result"][case] == "ok", restored["result"][case]
    kind, _, exp, imp, _, _ = CASES[case]
    assert restored["result"][f"original_{kind}"] == "ok"
    want = _weights(restored["dir"], f"original_{kind}")
    got = _weights(restored["dir"], case)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()
    assert ("TF2 object graph rewritten to match the tensors written" in err1 + err2) == bool(exp or imp), err1 + err2


@pytest.mark.tf
def test_tensorflow_parses_the_rewritten_graph_as_it_would_write_it(restored):
    """TensorFlow's own proto and has_checkpoint_values rule agree with the rewritten graph."""
    og = _og()
    from tensorflow.core.protobuf import trackable_object_graph_pb2 as pb
    from tensorflow.python.checkpoint import util

    with ckptbridge.read(restored["src"]["legacy"]) as r:
        g = r.extras()["object_graph"]
        names = list(r)
    for keep in ([n for n in names if n.startswith("model/") and "OPTIMIZER_SLOT" not in n],
                 [n for n in names if not n.startswith("optimizer/")]):
        out, _ = og.carry(g, identity(keep))
        proto = pb.TrackableObjectGraph.FromString(out)
        assert sorted(a.checkpoint_key for n in proto.nodes for a in n.attributes) == sorted(keep)
        mine = [n.has_checkpoint_values.value for n in proto.nodes]
        util.add_checkpoint_values_check(proto)
        assert mine == [n.has_checkpoint_values.value for n in proto.nodes]
        original = pb.TrackableObjectGraph.FromString(g)
        assert {n.attributes[0].full_name for n in proto.nodes if n.attributes} <= {n.attributes[0].full_name for n in original.nodes if n.attributes}


@pytest.mark.tf
def test_rename_and_original_names_give_back_tensorflows_graph_bytes(restored):
    d = restored["dir"]
    with ckptbridge.read(restored["src"]["legacy"]) as a:
        want = a.extras()["object_graph"]
    arc = str(d / "bytes.npz")
    assert in_process("export", restored["src"]["legacy"], arc, "--rename", "^model/=net/")[0] == 0
    assert in_process("import", arc, str(d / "bytes" / "ckpt"), "--original-names")[0] == 0
    assert _graph_of(str(d / "bytes" / "ckpt")) == want
