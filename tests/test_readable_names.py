"""Readable names for TF2 object-based checkpoints (``names="readable"``, ``--names readable``).

Each serialized tensor's ``full_name`` in the checkpoint's own TrackableObjectGraph
names it (``dense/kernel``, ``Adam/m/dense/kernel``); the key stays in
``original_names``, so ``import --original-names`` writes the exact checkpoint back,
and the carried object graph is rewritten through the names either way, so
``tf.train.Checkpoint.restore`` restores both imports (the ``tf`` tests, with
test_object_graph's builder and restorer).  The TensorFlow-free tests use the
committed SavedModel fixture's ``variables/variables``, a TF2 object-based
checkpoint, and its records (tests/test_savedmodel.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from test_object_graph import _BUILD, _RESTORE, _tf_env
from test_savedmodel import MODEL, VARIABLES, WEIGHTS, expected

import ckptbridge

from helpers import in_process, same

METRICS = [f"keras_api/metrics/{i}/{v}/.ATTRIBUTES/VARIABLE_VALUE" for i in (0, 1) for v in ("count", "total")]


def test_a_tf2_checkpoint_keeps_its_keys_unless_readable_names_are_asked_for():
    rec = expected()["tensors"]
    with ckptbridge.read(VARIABLES) as r:
        assert sorted(r) == sorted(rec) and "original_names" not in r.metadata()
    with ckptbridge.read(VARIABLES, names="readable") as r:
        originals = r.metadata()["original_names"]
        assert sorted(originals.get(n, n) for n in r) == sorted(rec)
        assert set(WEIGHTS) <= set(r) and "Adam/m/dense/kernel" in r and "iteration" in r
        assert sorted(n for n in r if n not in originals) == METRICS  # shared names (total, count) keep their keys
        for name, key in expected()["restored"].items():  # full_name names what tf.saved_model.load restores there
            assert originals[name] == key


def test_full_names_agree_with_the_savedmodels_variable_names():
    with ckptbridge.read(VARIABLES, names="readable") as a, ckptbridge.read(MODEL) as b:
        assert list(a) == list(b)
        assert a.metadata()["original_names"] == b.metadata()["original_names"]


def test_readable_export_and_original_names_import_give_back_the_checkpoint(tmp_path):
    arc = tmp_path / "c.h5"
    rc, _, err = in_process("export", VARIABLES, str(arc), "--names", "readable", "--weights-only")
    assert rc == 0, err
    with ckptbridge.read(str(arc)) as r:
        assert sorted(r) == WEIGHTS
    full = tmp_path / "full.npz"
    assert in_process("export", VARIABLES, str(full), "--names", "readable")[0] == 0
    prefix = tmp_path / "back" / "ckpt"
    assert in_process("import", str(full), str(prefix), "--original-names")[0] == 0
    assert ckptbridge.diff(str(prefix), VARIABLES).identical
    with ckptbridge.read(str(prefix)) as a, ckptbridge.read(VARIABLES) as b:
        assert a.extras()["object_graph"] == b.extras()["object_graph"]


def test_diff_of_a_checkpoint_and_its_readable_export_applies_names_to_the_checkpoint_only(tmp_path):
    arc = tmp_path / "c.npz"
    ckptbridge.export(VARIABLES, str(arc), read=ckptbridge.ReadOptions(names="readable"))
    assert not ckptbridge.diff(VARIABLES, str(arc)).identical  # keys against readable names
    assert ckptbridge.diff(VARIABLES, str(arc), read=ckptbridge.ReadOptions(names="readable")).identical
    assert in_process("diff", VARIABLES, str(arc), "--names", "readable")[0] == 0


# --------------------------------------------------------------------------- with TensorFlow


@pytest.fixture(scope="module")
def restored(module_tmp: Any) -> dict[str, Any]:
    """test_object_graph's two TF2 checkpoints (Adam, legacy Adam), exported with readable names and imported
    graph-free with --original-names, with no flags (keys written back) and with --names readable, each restored
    by tf.train.Checkpoint in a fresh process."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    d = module_tmp("readable")
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(d)], capture_output=True, text=True, env=_tf_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = {k: str(d / k / "ckpt-1") for k in ("adam", "legacy")}
    cases: dict[str, Any] = {f"original_{k}": (p, k, "consumed") for k, p in src.items()}
    logs = {}
    for kind, prefix in src.items():
        arc = str(d / f"{kind}.npz")
        logs[kind] = in_process("export", prefix, arc, "--names", "readable")
        for how, extra in (("keys", ["--original-names"]), ("plain", []), ("readable", ["--names", "readable"])):
            out = str(d / f"{kind}_{how}" / "ckpt")
            logs[f"{kind}_{how}"] = in_process("import", arc, out, *extra)
            cases[f"{kind}_{how}"] = (out, kind, "consumed")
    proc = subprocess.run([sys.executable, "-c", _RESTORE, json.dumps(cases), str(d)], capture_output=True, text=True,
                          env=_tf_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": d, "src": src, "logs": logs, "result": json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["adam", "legacy"])
def test_readable_names_are_the_variables_names_and_bit_exact(restored, kind):
    import tensorflow as tf

    assert restored["logs"][kind][0] == 0, restored["logs"][kind][2]
    reader = tf.train.load_checkpoint(restored["src"][kind])
    with ckptbridge.read(str(restored["dir"] / f"{kind}.npz")) as r:
        originals = r.metadata()["original_names"]
        assert len(r) == len(reader.get_variable_to_shape_map()) - 1  # all but the object graph
        for name in r:
            assert same(r[name], np.asarray(reader.get_tensor(originals.get(name, name)))), name
        kernels = sorted(n for n in r if n.endswith("/kernel") and "/" not in n[: -len("/kernel")])
        assert len(kernels) == 2, list(r)  # dense*/kernel, not model/layer_with_weights-N/...
        slot = r"^Adam/m/dense(_\d+)?/kernel$" if kind == "adam" else r"^Adam/dense(_\d+)?/kernel/m$"
        assert len([n for n in r if re.match(slot, n)]) == 2, list(r)  # one first-moment slot per kernel


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["adam", "legacy"])
@pytest.mark.parametrize("how", ["keys", "plain"])
def test_tensorflow_restores_the_import_of_a_readable_export(restored, kind, how):
    """--original-names, or no flag at all: the keys go back and TensorFlow restores by object."""
    case = f"{kind}_{how}"
    rc, _, err = restored["logs"][case]
    assert rc == 0, err
    assert restored["result"][f"original_{kind}"] == "ok"
    assert restored["result"][case] == "ok", restored["result"][case]  # assert_consumed: model and optimizer
    d = restored["dir"]
    with np.load(d / f"original_{kind}.npz") as w, np.load(d / f"{case}.npz") as g:
        assert len(w.files) == len(g.files) == 4
        for k in w.files:
            assert w[k].dtype == g[k].dtype and w[k].tobytes() == g[k].tobytes()
    with ckptbridge.read(str(d / case / "ckpt")) as r, ckptbridge.read(restored["src"][kind]) as o:
        assert list(r) == list(o) and r.extras() == o.extras()


@pytest.mark.tf
@pytest.mark.parametrize("kind", ["adam", "legacy"])
def test_an_import_under_readable_names_says_it_cannot_carry_the_object_graph(restored, kind):
    """TensorFlow finds each object by the part of its key before /.ATTRIBUTES/: a graph keyed by readable
    names fails inside restore (measured: ValueError 'substring not found'), so it is left out, with the reason."""
    case = f"{kind}_readable"
    rc, _, err = restored["logs"][case]
    assert rc == 0, err
    assert "object graph left out" in err and "/.ATTRIBUTES/" in err and "original names recorded at export" in err, err
    with ckptbridge.read(str(restored["dir"] / case / "ckpt")) as r:
        assert r.extras() == {} and any(re.match(r"^dense(_\d+)?/kernel$", n) for n in r)
    assert restored["result"][case] != "ok"  # without the graph, restore by object finds nothing to restore


def test_a_checkpoints_graph_keeps_the_key_shape_tensorflow_parses_an_archives_need_not():
    from ckptbridge.sources import _objgraph

    with ckptbridge.read(VARIABLES, names="readable") as r:
        graph = r.extras()["object_graph"]
        keys = {r.metadata()["original_names"].get(n, n): n for n in r}
    archive, note = _objgraph.carry(graph, keys)
    assert archive is not None and "renamed" in (note or "")
    checkpoint, why = _objgraph.carry(graph, keys, restorable=True)
    assert checkpoint is None and "/.ATTRIBUTES/" in (why or "") and "extract_object_name" in (why or "")
    back, _ = _objgraph.carry(archive, {n: k for k, n in keys.items()}, restorable=True)
    assert back == graph  # renamed and renamed back: TensorFlow's bytes
