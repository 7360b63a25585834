"""Lookup tables survive export -> import (issue 21, critical 1).

A table is saved as one SaveableObject: its object-graph attribute is keyed
``t/.ATTRIBUTES/table`` while its tensors are ``...table-keys`` and ``...table-values``.
The graph must keep that attribute, or TensorFlow restores an empty table.
TensorFlow writes the checkpoint and restores the converted one, in fresh processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ckptbridge.sources import _objgraph

from helpers import cli

_TABLES = """
import tensorflow as tf
t = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
d = tf.lookup.experimental.DenseHashTable(tf.string, tf.int64, default_value=-1, empty_key="", deleted_key="$")
v = tf.Variable([0.5, 1.5])
ck = tf.train.Checkpoint(t=t, d=d, v=v)
"""


def _tf(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_TABLES + code)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tables") / "ckpt")
    _tf(f"""
t.insert(tf.constant(["a", "b"]), tf.constant([1, 2], tf.int64))
d.insert(tf.constant(["a", "b"]), tf.constant([1, 2], tf.int64))
ck.write({prefix!r})
""")
    return prefix


_RESTORE = """
import json, sys
ck.read(sys.argv[1]).assert_consumed()
def dump(tab):
    k, x = tab.export()
    k, x = k.numpy().reshape(-1), x.numpy().reshape(-1)
    pairs = sorted((bytes(a).hex(), int(b)) for a, b in zip(k, x) if a not in (b"", b"$"))
    return {"dtypes": [str(k.dtype), str(x.dtype)], "pairs": pairs, "size": int(tab.size())}
print(json.dumps({"t": dump(t), "d": dump(d), "v": v.numpy().tobytes().hex()}))
"""


def _restored(prefix: str) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_TABLES + _RESTORE), prefix], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_tables_restore_with_their_contents(written, tmp_path, engine, fmt):
    archive, back = str(tmp_path / f"t.{fmt}"), str(tmp_path / "back")
    out = cli("export", "--engine", engine, written, archive)
    assert out.returncode == 0, out.stderr
    assert "not written" not in out.stdout + out.stderr
    out = cli("import", "--engine", engine, archive, back)
    assert out.returncode == 0, out.stderr
    want = _restored(written)
    assert want["t"]["size"] == 2 and want["d"]["size"] == 2
    assert _restored(back) == want


@pytest.mark.tf
def test_safetensors_refuses_string_keys_by_name(written, tmp_path):
    out = cli("export", written, str(tmp_path / "t.safetensors"))
    assert out.returncode != 0 and "t/.ATTRIBUTES/table-keys" in out.stderr
    assert not (tmp_path / "t.safetensors").exists()


def test_a_table_attribute_is_kept_whole_or_not_at_all():
    graph = field_bytes_graph()
    keys = {"t/.ATTRIBUTES/table-keys": "t/.ATTRIBUTES/table-keys", "t/.ATTRIBUTES/table-values": "t/.ATTRIBUTES/table-values"}
    assert _objgraph.rewrite(graph, keys, held=keys) == (graph, None)
    out, note = _objgraph.rewrite(graph, {k: "x/" + k for k in keys}, held=keys)
    assert [a.key for n in _objgraph.describe(out) for a in n.attributes] == ["x/t/.ATTRIBUTES/table"]
    half = {"t/.ATTRIBUTES/table-keys": "t/.ATTRIBUTES/table-keys", "w": "w"}
    with pytest.raises(_objgraph.Unusable):
        _objgraph.rewrite(graph, half, held=[*keys, "w"])
    with pytest.raises(_objgraph.Unusable, match="renamed apart"):
        _objgraph.rewrite(graph, {"t/.ATTRIBUTES/table-keys": "a-keys", "t/.ATTRIBUTES/table-values": "b-values"}, held=keys)


def field_bytes_graph() -> bytes:
    from ckptbridge.io.wire import field_bytes, field_varint

    root = field_bytes(1, field_varint(1, 1) + field_bytes(2, b"t"))
    table = field_bytes(2, field_bytes(1, b"table") + field_bytes(3, b"t/.ATTRIBUTES/table"))
    return field_bytes(1, root) + field_bytes(1, table)
