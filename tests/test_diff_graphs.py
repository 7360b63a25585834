"""``diff`` compares TF2 object graphs as restore uses them (issue 21).

tf.train.Checkpoint restores by walking the ``_CHECKPOINTABLE_OBJECT_GRAPH``
record: objects by their children's local names, each attribute's checkpoint
key, an optimizer's slot links.  A graph that lost an object, an attribute (a
lookup table's ``table``, whose ``-keys``/``-values`` tensors are still there)
or a slot link restores nothing into it, silently; so ``diff`` says so, one
line each, exit 1.  Node order and the graph's bytes do not count.

The graph-free tests use the TF-written SavedModel checkpoint in tests/data
(Keras layers reached by two names each); those marked ``tf`` have TensorFlow
write a table, a Dense layer and a legacy Adam with slots.  Edited graphs are
written with ckptbridge's own writer, next to the same tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

import ckptbridge
from ckptbridge import _api
from ckptbridge.bundle import BundleWriter
from ckptbridge.io.wire import field_bytes, field_varint
from ckptbridge.sources import _objgraph

from helpers import cli, in_process

VARIABLES = os.path.join(os.path.dirname(__file__), "data", "savedmodel", "keras_dense", "variables", "variables")
NODES, CHILDREN, ATTRIBUTES, SLOTS = 1, 1, 2, 3


def graph_of(path: str) -> bytes:
    with _api.open_source(path) as s:
        return s.extras()["object_graph"]


def edit(payload: bytes, node: int, drop: Callable[[Any], bool]) -> bytes:
    """The graph with the fields of node ``node`` for which ``drop`` is true left out, the rest as it was."""
    out, k = bytearray(), -1
    for f in _objgraph._fields(payload):
        if f.number == NODES:
            k += 1
            if k == node:
                out += field_bytes(NODES, b"".join(g.raw for g in _objgraph._fields(f.value) if not drop(g)))
                continue
        out += f.raw
    return bytes(out)


def local_name(f: Any) -> str:
    return _objgraph._text(_objgraph._last(_objgraph._fields(f.value), 2, 2))


def copy_with_graph(src: str, prefix: str, graph: bytes | None) -> str:
    """A checkpoint at ``prefix`` with every tensor of ``src`` and ``graph`` as its object graph."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    w = BundleWriter(prefix)
    with _api.open_source(src) as s:
        for n in s.specs():
            w.write(n, s.read(n))
    if graph is not None:
        w.write_extra("object_graph", graph)
    w.commit()
    return prefix


def diff_lines(a: str, b: str, *args: str) -> tuple[int, list[str]]:
    status, out, err = in_process("diff", *args, a, b)
    assert "Traceback" not in err, err
    return status, out.splitlines()


# --- the graph-free side: a TF-written Keras checkpoint from tests/data --------------------------


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors"])
def test_a_round_trip_compares_the_object_graph_and_finds_it_identical(tmp_path: Any, fmt: str) -> None:
    archive, back = str(tmp_path / f"a.{fmt}"), str(tmp_path / "back" / "ckpt")
    ckptbridge.export(VARIABLES, archive)
    status, _, err = in_process("import", "-q", archive, back)
    assert status == 0, err
    objects = _objgraph.count_reachable(graph_of(VARIABLES))
    assert objects > 40
    for x, y in ((VARIABLES, archive), (VARIABLES, back), (archive, back)):
        d = ckptbridge.diff(x, y)
        assert d.identical and d.graph_diffs == [] and d.graph_objects == objects, (x, y, d.graph_diffs)
    status, lines = diff_lines(VARIABLES, back)
    assert status == 0 and lines[-1].endswith(f"and the TF2 object graph ({objects} objects)"), lines


def test_a_re_serialized_graph_is_identical_node_order_and_bytes_aside(tmp_path: Any) -> None:
    """Children in another order, an attribute's full_name changed, nodes renumbered by a pruning
    rewrite that prunes nothing restore reaches: other bytes, the same graph for restore."""
    g = graph_of(VARIABLES)
    top = _objgraph._fields(g)
    root = _objgraph._fields(top[0].value)
    reordered = field_bytes(NODES, b"".join(f.raw for f in reversed(root))) + b"".join(f.raw for f in top[1:])
    renamed = reordered.replace(b"batch_normalization/gamma", b"batch_normalization/GAMMA")
    assert renamed != g and len(renamed) == len(g)
    other = copy_with_graph(VARIABLES, str(tmp_path / "other" / "ckpt"), renamed)
    d = ckptbridge.diff(VARIABLES, other)
    assert d.identical and d.graph_objects == _objgraph.count_reachable(g), d.graph_diffs


def test_a_lost_name_of_an_object_reached_by_two_is_one_line(tmp_path: Any) -> None:
    """Keras tracks a layer as ``layer-1`` and ``layer_with_weights-0``: losing one name is one difference."""
    g = graph_of(VARIABLES)
    dropped = edit(g, 0, lambda f: f.number == CHILDREN and local_name(f) == "layer-1")
    other = copy_with_graph(VARIABLES, str(tmp_path / "o" / "ckpt"), dropped)
    d = ckptbridge.diff(VARIABLES, other)
    assert not d.identical and d.value_diffs == {} and d.only_a == []
    assert d.graph_diffs == ["object graph: (root): child 'layer-1' only in A (the object B reaches as layer_with_weights-0)"], d.graph_diffs
    status, lines = diff_lines(VARIABLES, other)
    assert status == 1 and lines[0] == d.graph_diffs[0] and lines[-1].endswith(", 1 in the object graph"), lines


def test_a_lost_attribute_is_named_with_its_key(tmp_path: Any) -> None:
    g = graph_of(VARIABLES)
    node = next(i for i, n in enumerate(_objgraph.describe(g))
                if any(a.key == "layer_with_weights-1/gamma/.ATTRIBUTES/VARIABLE_VALUE" for a in n.attributes))
    other = copy_with_graph(VARIABLES, str(tmp_path / "o" / "ckpt"), edit(g, node, lambda f: f.number == ATTRIBUTES))
    status, lines = diff_lines(VARIABLES, other)
    assert status == 1, lines
    assert lines[0].endswith("/gamma: attribute 'VARIABLE_VALUE' (key layer_with_weights-1/gamma/.ATTRIBUTES/VARIABLE_VALUE) only in A"), lines
    assert len(lines) == 2, lines
    status, lines = diff_lines(other, VARIABLES)  # the other way round: only in B
    assert status == 1 and lines[0].endswith(" only in B"), lines


def test_a_lost_object_is_named_in_a_checkpoint_and_in_an_archive_of_it(tmp_path: Any) -> None:
    g = graph_of(VARIABLES)
    # the root's `optimizer` child and everything only it reaches
    kept = {k: k for k in _objgraph.checkpoint_keys(g) if not k.startswith("optimizer/")}
    pruned, note = _objgraph.rewrite(g, kept, held=set(_objgraph.checkpoint_keys(g)))
    assert note and "pruned" in note
    other = copy_with_graph(VARIABLES, str(tmp_path / "o" / "ckpt"), pruned)
    archive = str(tmp_path / "o.npz")
    ckptbridge.export(other, archive)
    for b in (other, archive):
        d = ckptbridge.diff(VARIABLES, b)
        assert not d.identical and d.only_a == d.only_b == [] and d.value_diffs == {}
        assert any(line.startswith("object graph: optimizer: object only in A") for line in d.graph_diffs), d.graph_diffs
        assert all(" only in A" in line for line in d.graph_diffs), d.graph_diffs


def test_an_archive_that_dropped_the_graph_is_a_difference_unless_tensors_only(tmp_path: Any) -> None:
    h5py = pytest.importorskip("h5py")
    archive = str(tmp_path / "a.h5")
    ckptbridge.export(VARIABLES, archive)
    with h5py.File(archive, "r+") as f:
        del f[".ckptbridge/object_graph"]
    d = ckptbridge.diff(VARIABLES, archive)
    assert not d.identical and d.value_diffs == {} and d.only_a == d.only_b == []
    assert d.graph_diffs == ["object graph: only A has a TF2 object graph; B has none, so tf.train.Checkpoint restores no object "
                             "from B (its tensors still load by name)"], d.graph_diffs
    status, lines = diff_lines(VARIABLES, archive)
    assert status == 1 and lines[0] == d.graph_diffs[0], lines
    status, lines = diff_lines(archive, VARIABLES, "--tensors-only")
    assert status == 0 and lines[-1].startswith("identical: ") and "object graph" not in lines[-1], lines
    assert ckptbridge.diff(archive, VARIABLES, graphs=False).identical


def test_an_unreadable_graph_is_one_difference_not_an_error(tmp_path: Any) -> None:
    other = copy_with_graph(VARIABLES, str(tmp_path / "o" / "ckpt"), b"\x0a\xff\xff\xff\x0f")
    d = ckptbridge.diff(VARIABLES, other)
    assert len(d.graph_diffs) == 1 and d.graph_diffs[0].startswith("object graph: B's cannot be compared: it is not a readable"), d.graph_diffs


def test_a_deep_hostile_chain_is_compared_in_bounded_time(tmp_path: Any) -> None:
    """50,000 objects in a chain, the last one lost: one line, its path elided, in seconds."""
    n = 50_000

    def chain(count: int) -> bytes:
        nodes = []
        for i in range(count):
            child = field_bytes(CHILDREN, field_varint(1, i + 1) + field_bytes(2, b"c")) if i + 1 < count else b""
            nodes.append(field_bytes(NODES, child))
        return b"".join(nodes)

    a = copy_with_graph(VARIABLES, str(tmp_path / "a" / "ckpt"), chain(n))
    b = copy_with_graph(VARIABLES, str(tmp_path / "b" / "ckpt"), chain(n - 1))
    t = time.monotonic()
    d = ckptbridge.diff(a, b)
    assert time.monotonic() - t < 30
    assert len(d.graph_diffs) == 1 and d.graph_diffs[0].startswith("object graph: …/c/c/"), d.graph_diffs[0][:200]
    assert len(d.graph_diffs[0]) < 300 and d.graph_objects == n - 1


# --- TensorFlow writes a table, a Dense layer and a legacy Adam's slots --------------------------

_OBJECTS = """
import sys, tensorflow as tf
t = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
dense = tf.keras.layers.Dense(3)
dense.build((None, 4))
opt = tf.keras.optimizers.legacy.Adam(0.01)
"""

_WRITE = """
t.insert(tf.constant(["a", "b"]), tf.constant([1, 2], tf.int64))
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(dense(tf.ones([2, 4])) ** 2)
grads = tape.gradient(loss, dense.trainable_variables)
opt.apply_gradients(zip(grads, dense.trainable_variables))
tf.train.Checkpoint(table=t, dense=dense, optimizer=opt).write(sys.argv[1])
tf.train.Checkpoint(table=t, dense=dense, optimizer=opt, extra=tf.Module()).write(sys.argv[2])
"""

_RESTORE = """
ck = tf.train.Checkpoint(table=t, dense=dense, optimizer=opt)
ck.read(sys.argv[1]).expect_partial()
print(int(t.size()))
"""


def _tf(code: str, *argv: str) -> str:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_OBJECTS + code), *argv], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def written(tmp_path_factory: Any) -> tuple[str, str]:
    pytest.importorskip("tensorflow")
    d = tmp_path_factory.mktemp("graphs")
    a, b = str(d / "a" / "ckpt"), str(d / "b" / "ckpt")
    _tf(_WRITE, a, b)
    return a, b


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_a_table_dense_and_adam_round_trip_with_their_graph(written: tuple[str, str], tmp_path: Any, engine: str, fmt: str) -> None:
    src = written[0]
    objects = _objgraph.count_reachable(graph_of(src))
    assert objects == 15  # root, table, dense + 2, optimizer + 5, 4 slot variables
    archive, back = str(tmp_path / f"a.{fmt}"), str(tmp_path / "back" / "ckpt")
    for argv in (("export", "--engine", engine, src, archive), ("import", "--engine", engine, archive, back)):
        r = cli(*argv)
        assert r.returncode == 0, r.stderr
    for x, y in ((src, archive), (src, back)):
        d = ckptbridge.diff(x, y, read=ckptbridge.ReadOptions(engine=engine))
        assert d.identical and d.graph_objects == objects, (engine, x, y, d.graph_diffs)
    r = cli("diff", "--engine", engine, src, back)
    assert r.returncode == 0 and r.stdout.strip() == f"identical: 13 tensors and the TF2 object graph ({objects} objects)", r.stdout + r.stderr


@pytest.mark.tf
def test_checkpoints_of_different_objects_with_the_same_tensors_differ(written: tuple[str, str]) -> None:
    a, b = written
    d = ckptbridge.diff(a, b)
    assert d.only_a == d.only_b == [] and d.value_diffs == {} and d.compared == 13
    assert d.graph_diffs == ["object graph: extra: object only in B (no attributes); A has no object there"], d.graph_diffs
    r = cli("diff", a, b)
    assert r.returncode == 1 and r.stdout.splitlines()[0] == d.graph_diffs[0], r.stdout + r.stderr


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
def test_a_table_that_lost_its_attribute_or_a_lost_slot_link_is_named(written: tuple[str, str], tmp_path: Any, engine: str) -> None:
    """Its ``-keys``/``-values`` tensors are still there, but TensorFlow restores an empty table: diff says why."""
    src = written[0]
    g = graph_of(src)
    table = next(i for i, n in enumerate(_objgraph.describe(g)) if any(a.key == "table/.ATTRIBUTES/table" for a in n.attributes))
    no_table = copy_with_graph(src, str(tmp_path / "t" / "ckpt"), edit(g, table, lambda f: f.number == ATTRIBUTES))
    assert _tf(_RESTORE, no_table).split()[-1] == "0"  # what the user would get, silently
    d = ckptbridge.diff(src, no_table, read=ckptbridge.ReadOptions(engine=engine))
    assert d.only_a == d.only_b == [] and d.value_diffs == {} and d.compared == 13
    assert d.graph_diffs == ["object graph: table: attribute 'table' (key table/.ATTRIBUTES/table) only in A"], d.graph_diffs

    optimizer = next(i for i, n in enumerate(_objgraph.describe(g)) if any(name == "iter" for name, _ in n.children))
    first = []
    no_slot = copy_with_graph(src, str(tmp_path / "s" / "ckpt"),
                              edit(g, optimizer, lambda f: f.number == SLOTS and not first and not first.append(f)))
    d = ckptbridge.diff(src, no_slot, read=ckptbridge.ReadOptions(engine=engine))
    assert len(d.graph_diffs) == 1, d.graph_diffs
    assert d.graph_diffs[0].startswith("object graph: optimizer: slot variable ") and d.graph_diffs[0].endswith(" only in A"), d.graph_diffs
    assert "/.OPTIMIZER_SLOT/optimizer/" in d.graph_diffs[0]
