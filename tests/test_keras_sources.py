"""Keras files as sources: files Keras itself writes, read under readable names, bit for bit.

tf_keras (``tf.keras`` under TF_USE_LEGACY_KERAS=1) writes the Keras 2 HDF5 files (``save_weights``
and a whole-model ``save`` after one training step, so optimizer weights exist) and a SavedModel;
Keras 3 (``import keras``) writes a ``.weights.h5`` and a ``.keras``.  Each is written in a process
of its own (``python tests/test_keras_sources.py legacy|keras3 DIR``), which also records what
Keras holds: ``expected_<file>.npz``, readable name -> the variable's value, taken from
``model.weights`` (names from the variables' own names and paths), ``layer.save_own_variables``
(the bare ``.weights.h5``'s indices) and the optimizer's variables.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from typing import Any

import numpy as np
import pytest

import ckptbridge

from helpers import ENV, cli, error_line, in_process, same

pytestmark = pytest.mark.tf

HERE = os.path.dirname(os.path.abspath(__file__))

#: file -> the kind ``ls`` reports
KINDS = {
    "legacy_weights.h5": "keras2-weights",
    "legacy_model.h5": "keras2-model",
    "k3.weights.h5": "keras3-weights",
    "k3.keras": "keras3-model",
}


# --------------------------------------------------------------------------- writing the files (subprocesses)


def _write_legacy(out: str) -> None:
    """tf_keras: save_weights and save to HDF5 after one training step, and a SavedModel."""
    import tensorflow as tf

    k = tf.keras
    assert k.__name__.startswith("tf_keras"), k.__name__
    L = k.layers
    model = k.Sequential([
        k.Input((8, 8, 3)), L.Conv2D(4, 3, name="c1"), L.BatchNormalization(name="bn"), L.Conv2D(4, 3, use_bias=False),
        L.BatchNormalization(scale=False, center=False), L.Flatten(), L.Dense(5, name="dense"),
    ])
    model.compile(optimizer=k.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    model.fit(rng.random((4, 8, 8, 3), np.float32), rng.random((4, 5), np.float32), epochs=1, verbose=0)
    weights = {w.name.rsplit(":", 1)[0]: w.numpy() for w in model.weights}
    optimizer = {"optimizer/" + v.name.rsplit(":", 1)[0]: v.numpy() for v in model.optimizer.variables}
    model.save_weights(os.path.join(out, "legacy_weights.h5"))
    model.save(os.path.join(out, "legacy_model.h5"))
    model.save(os.path.join(out, "saved_model"), save_format="tf")
    np.savez(os.path.join(out, "expected_legacy_weights.h5.npz"), **weights)
    np.savez(os.path.join(out, "expected_legacy_model.h5.npz"), **weights, **optimizer)


def _write_keras3(out: str) -> None:
    """Keras 3: save_weights to .weights.h5 and save to .keras after one training step; a nested model too."""
    import keras
    from keras.src.utils.naming import to_snake_case

    L = keras.layers
    head = keras.Sequential([L.Dense(3, name="inner")], name="head")
    model = keras.Sequential([
        keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="c1"), L.BatchNormalization(name="bn"), L.Conv2D(4, 3, use_bias=False),
        L.BatchNormalization(scale=False, center=False), L.Flatten(), L.Dense(5, name="dense"), head,
    ], name="outer")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((4, 8, 8, 3), np.float32), rng.random((4, 3), np.float32), epochs=1, verbose=0)
    optimizer = {f"optimizer/{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
    # With the config (.keras): a variable's own path, less the model's name: c1/kernel, head/inner/kernel.
    named = {w.path.split("/", 1)[1]: np.asarray(w) for w in model.weights}
    # Without it (.weights.h5): the layer's key in the file (its class, counted per class in model order) and the index it saves.
    bare: dict[str, np.ndarray] = {}

    def walk(layers: Any, prefix: str) -> None:
        used: dict[str, int] = {}
        for layer in layers:
            key = to_snake_case(type(layer).__name__)
            used[key] = used.get(key, -1) + 1
            key = key if used[key] == 0 else f"{key}_{used[key]}"
            store: dict[str, Any] = {}
            layer.save_own_variables(store)
            bare.update({f"{prefix}{key}/{i}": np.asarray(v) for i, v in store.items()})
            if isinstance(layer, keras.Sequential):
                walk(layer.layers, f"{prefix}{key}/")

    walk(model.layers, "")
    # bfloat16 weights: Keras 3 stores them as 2-byte opaque data tagged dtype="bfloat16".
    bf = keras.Sequential([keras.Input((4,)), L.Dense(3, dtype="bfloat16", name="d")])
    bf.layers[0].kernel.assign(rng.normal(size=(4, 3)).astype(np.float32))
    bf.save_weights(os.path.join(out, "k3_bf16.weights.h5"))
    np.savez(os.path.join(out, "expected_k3_bf16.npz"), **{f"dense/{i}": np.asarray(v).view(np.uint16) for i, v in enumerate(bf.layers[0].weights)})
    model.save_weights(os.path.join(out, "k3.weights.h5"))
    model.save(os.path.join(out, "k3.keras"))
    np.savez(os.path.join(out, "expected_k3.weights.h5.npz"), **bare, **optimizer)
    np.savez(os.path.join(out, "expected_k3.keras.npz"), **named, **optimizer)


@pytest.fixture(scope="module")
def keras_dir(module_tmp: Any) -> str:
    """The Keras files, written by tf_keras and Keras 3 in two processes at once."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    pytest.importorskip("keras")
    out = str(module_tmp("keras"))
    env = dict(ENV, TF_USE_LEGACY_KERAS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), which, out], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for which in ("legacy", "keras3")]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return out


def _expected(keras_dir: str, name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(keras_dir, f"expected_{name}.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _is_optimizer(name: str) -> bool:
    return name.startswith("optimizer/")


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", list(KINDS))
def test_names_are_readable_and_values_bit_exact(keras_dir: str, name: str) -> None:
    want = _expected(keras_dir, name)
    with ckptbridge.read(os.path.join(keras_dir, name)) as r:
        assert r.kind == KINDS[name]
        assert sorted(r) == sorted(want)
        for n, w in want.items():
            got = r[n]
            assert got.dtype == w.dtype and got.shape == w.shape, (n, got.dtype, w.dtype, got.shape, w.shape)
            assert same(got, w), n
        originals = r.metadata()["original_names"]
    assert set(originals) == set(want)  # every name is a readable one, its HDF5 path kept
    if name.startswith("legacy"):
        assert "c1/kernel" in want and "batch_normalization/moving_mean" in want
        assert originals["c1/kernel"] == ("model_weights/" if name == "legacy_model.h5" else "") + "c1/c1/kernel:0"
    elif name == "k3.keras":
        # Layer names and each class's variable order from config.json; gamma and beta absent where scale/center are off.
        assert {"c1/kernel", "c1/bias", "bn/gamma", "bn/moving_variance", "conv2d/kernel", "head/inner/kernel"} <= set(want)
        assert "batch_normalization/gamma" not in want and originals["head/inner/bias"] == "layers/sequential/layers/dense/vars/1"
    else:
        assert {"conv2d/0", "conv2d/1", "conv2d_1/0", "batch_normalization_1/1", "sequential/dense/0"} <= set(want)
    assert any(_is_optimizer(n) for n in want) or name == "legacy_weights.h5"


@pytest.mark.parametrize("name", list(KINDS))
def test_weights_only_drops_the_optimizer_state(keras_dir: str, name: str, tmp_path: Any) -> None:
    want = _expected(keras_dir, name)
    report = ckptbridge.export(os.path.join(keras_dir, name), str(tmp_path / "w.npz"), ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    assert sorted(report.written) == sorted(n for n in want if not _is_optimizer(n))
    assert sorted(report.dropped) == sorted(n for n in want if _is_optimizer(n))
    assert all(why == "optimizer state (weights only)" for why in report.dropped.values())


@pytest.mark.parametrize("name", list(KINDS))
def test_ls_export_diff_and_the_raw_paths_kept(keras_dir: str, name: str, tmp_path: Any) -> None:
    import h5py

    path = os.path.join(keras_dir, name)
    rc, out, err = in_process("ls", "--json", path)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["kind"] == KINDS[name] and doc["total_tensors"] == len(_expected(keras_dir, name))
    rc, out, err = in_process("ls", path)
    assert rc == 0, err
    assert out.splitlines()[-1].endswith(f"[read as {KINDS[name]}]")
    npz = str(tmp_path / "out.npz")
    rc, out, err = in_process("export", path, npz)
    assert rc == 0, err
    rc, out, err = in_process("diff", path, npz)
    assert rc == 0 and "identical" in out, out + err
    with ckptbridge.read(npz) as a:
        doc = a.metadata()
        assert doc["engine"] == KINDS[name]
        originals = doc["original_names"]
        assert set(originals) == set(a)
        if name == "k3.keras":
            return  # its HDF5 is inside the zip; the same paths as k3.weights.h5's
        with h5py.File(path, "r") as f:  # the recorded paths are Keras's own, holding the same bytes
            for n, raw in originals.items():
                assert same(np.asarray(f[raw][()]), a[n]), n


def test_import_original_names_gives_back_the_hdf5_paths(keras_dir: str, tmp_path: Any) -> None:
    npz = str(tmp_path / "m.npz")
    ckptbridge.export(os.path.join(keras_dir, "legacy_model.h5"), npz)
    report = ckptbridge.rebuild(npz, str(tmp_path / "ckpt" / "model.ckpt"), ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)))
    assert "model_weights/c1/c1/kernel:0" in report.written and "optimizer_weights/iteration:0" in report.written
    ckptbridge.rebuild(os.path.join(keras_dir, "k3.keras"), str(tmp_path / "k3" / "model.ckpt"))  # graph-free import of a Keras file
    assert ckptbridge.diff(os.path.join(keras_dir, "k3.keras"), str(tmp_path / "k3" / "model.ckpt")).identical


def test_recognised_by_content_whatever_the_suffix(keras_dir: str, tmp_path: Any) -> None:
    """A .keras under another name, a Keras HDF5 without a suffix; ckptbridge's own .h5 stays an HDF5 archive."""
    for src, dst in (("k3.keras", "model.zip.bin"), ("legacy_model.h5", "weights"), ("k3.weights.h5", "k3.hdf5")):
        shutil.copy(os.path.join(keras_dir, src), tmp_path / dst)
        with ckptbridge.read(str(tmp_path / dst)) as r, ckptbridge.read(os.path.join(keras_dir, src)) as want:
            assert r.kind == KINDS[src] and sorted(r) == sorted(want)
    ours = str(tmp_path / "ours.h5")
    ckptbridge.export(os.path.join(keras_dir, "k3.keras"), ours)
    with ckptbridge.read(ours) as r:
        assert r.kind == "hdf5" and sorted(r) == sorted(_expected(keras_dir, "k3.keras"))


def _rezip(src: str, dst: str, *, compression: int = zipfile.ZIP_STORED, replace: dict[str, bytes] | None = None, drop: str = "") -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            if info.filename != drop:
                zout.writestr(info.filename, (replace or {}).get(info.filename, zin.read(info)))


def test_a_deflated_keras_file_is_read_in_memory_within_the_limit(keras_dir: str, tmp_path: Any) -> None:
    deflated = str(tmp_path / "deflated.keras")
    _rezip(os.path.join(keras_dir, "k3.keras"), deflated, compression=zipfile.ZIP_DEFLATED)
    assert ckptbridge.diff(deflated, os.path.join(keras_dir, "k3.keras")).identical
    rc, _, err = in_process("ls", deflated, "--max-tensor-gb", "0.000001")
    error_line((rc, err), "model.weights.h5", "over the limit")


# --------------------------------------------------------------------------- what is refused, in one line


def _with_external_link(keras: str, dst: str) -> None:
    import h5py

    with zipfile.ZipFile(keras) as z:
        buf = io.BytesIO(z.read("model.weights.h5"))
    with h5py.File(buf, "a") as f:
        f["layers/dense/vars/2"] = h5py.ExternalLink("/etc/passwd", "/x")
    _rezip(keras, dst, replace={"model.weights.h5": buf.getvalue()})


def test_damaged_and_odd_keras_files_get_one_error_line(keras_dir: str, tmp_path: Any) -> None:
    k3 = os.path.join(keras_dir, "k3.keras")
    data = open(k3, "rb").read()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.keras").write_bytes(b"")
    _rezip(k3, str(tmp_path / "noweights.keras"), drop="model.weights.h5")
    _rezip(k3, str(tmp_path / "badconfig.keras"), replace={"config.json": b"{not json"})
    _with_external_link(k3, str(tmp_path / "external.keras"))
    for name, needles in (("truncated.keras", ("truncated.keras", ".keras")), ("empty.keras", ("empty.keras", "not a readable .keras file")),
                          ("noweights.keras", ("has no model.weights.h5",)), ("badconfig.keras", ("config.json is not valid JSON",)),
                          ("external.keras", ("external link", "/etc/passwd"))):
        # Two as a user runs them (nothing from HDF5's C library on stderr either), the rest in this process.
        r = cli("ls", str(tmp_path / name)) if name in ("truncated.keras", "external.keras") else in_process("ls", str(tmp_path / name))
        line = error_line(r if isinstance(r, subprocess.CompletedProcess) else (r[0], r[2]), *needles)
        assert "checkpoint" not in line, line


def test_models_that_are_not_checkpoints_say_what_to_pass(keras_dir: str, tmp_path: Any) -> None:
    sm = os.path.join(keras_dir, "saved_model")
    variables = os.path.join(sm, "variables", "variables")
    # The directory itself is read (tests/test_savedmodel.py); one of its files names the directory to pass.
    for args in (("ls", os.path.join(sm, "saved_model.pb")), ("diff", os.path.join(sm, "keras_metadata.pb"), os.path.join(keras_dir, "k3.keras"))):
        rc, _, err = in_process(*args)
        line = error_line((rc, err), "SavedModel", f"pass the SavedModel's directory {sm}")
        assert "damaged" not in line, line
    rc, _, err = in_process("import", os.path.join(keras_dir, "legacy_weights.h5"), str(tmp_path / "out.keras"))
    line = error_line((rc, err), "out.keras", "does not write")
    assert "damaged" not in line and not os.listdir(tmp_path)
    # The SavedModel's own weights: --weights-only drops the optimizer and the Keras metrics counters.
    report = ckptbridge.export(variables, str(tmp_path / "sm.npz"), ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    assert any(n.startswith("keras_api/metrics/") for n in report.dropped), report.dropped
    assert report.written and all(n.startswith("layer_with_weights-") for n in report.written), report.written


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    {"legacy": _write_legacy, "keras3": _write_keras3}[sys.argv[1]](sys.argv[2])


def test_keras3_bfloat16_weights_are_read_exactly(keras_dir: str) -> None:
    """Keras 3 writes bfloat16 as opaque 2-byte data with a dtype attribute: read as bfloat16, bit for bit."""
    import ml_dtypes

    got = ckptbridge.load(os.path.join(keras_dir, "k3_bf16.weights.h5"))
    want = _expected(keras_dir, "k3_bf16")
    assert sorted(got) == sorted(want) and want
    for name, bits in want.items():
        assert got[name].dtype == np.dtype(ml_dtypes.bfloat16), name
        assert got[name].tobytes() == bits.tobytes(), name
