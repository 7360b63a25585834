"""``ckptbridge.diff`` and ``ckptbridge diff``: what differs between two checkpoints or archives.

Exact mode compares bit patterns (so -0.0 differs from 0.0 and a NaN equals
only the same NaN); ``--atol``/``--rtol`` compare values as ``numpy.isclose``
does, with NaN equal to NaN.  Exit status 0 identical, 1 different, 2 error.
Checkpoints here are written by ckptbridge's native writer (TensorFlow-free)
or, in the tests marked ``tf``, by TensorFlow itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptbridge
from ckptbridge.errors import CkptBridgeError, NotFoundError

from helpers import in_process, write_checkpoint


def _ckpt(path: Any, values: dict[str, np.ndarray]) -> str:
    """A V2 checkpoint at ``path`` (a prefix) holding ``values``."""
    return write_checkpoint(str(path), values)


def _npz(path: Any, values: dict[str, np.ndarray]) -> str:
    np.savez(str(path), **values)
    return str(path)


def _strings(*items: bytes) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


def f32_bits(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


BASE = {
    "conv/weights": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "conv/biases": np.array([0.5, -1.5, 2.0], np.float32),
    "ids": np.array([1, -2, 2**62], np.int64),
    "mask": np.array([True, False, True]),
    "step": np.array(7, np.int64),
}


def test_identical_archive_and_checkpoint(tmp_path: Any, capsys: Any) -> None:
    a = _npz(tmp_path / "a.npz", BASE)
    b = _ckpt(tmp_path / "ck" / "model.ckpt", BASE)
    d = ckptbridge.diff(a, b)
    assert d.identical and d.compared == len(BASE)
    assert (d.only_a, d.only_b, d.spec_diffs, d.value_diffs) == ([], [], {}, {})
    rc, out, err = in_process("diff", "-q", a, b)
    assert rc == 0 and out == f"identical: {len(BASE)} tensors\n" and err == ""


def test_names_shapes_dtypes_and_values(tmp_path: Any, capsys: Any) -> None:
    other = dict(BASE)
    del other["step"]
    other["extra/kernel"] = np.zeros(2, np.float32)
    other["conv/biases"] = np.array([0.5, -1.5, 2.0, 0.0], np.float32)  # shape
    other["ids"] = BASE["ids"].astype(np.int32)  # dtype
    w = BASE["conv/weights"].copy()
    w[0, 1] += 3.0
    w[2, 3] -= 0.25
    other["conv/weights"] = w
    a = _ckpt(tmp_path / "a" / "m.ckpt", BASE)
    b = _npz(tmp_path / "b.npz", other)
    d = ckptbridge.diff(a, b)
    assert not d.identical
    assert d.only_a == ["step"] and d.only_b == ["extra/kernel"]
    assert set(d.spec_diffs) == {"conv/biases", "ids"}
    assert d.spec_diffs["ids"][0].dtype == "int64" and d.spec_diffs["ids"][1].dtype == "int32"
    assert d.value_diffs == {"conv/weights": (2, pytest.approx(3.0, rel=1e-6))}
    assert d.compared == 4  # conv/weights, conv/biases, ids, mask

    rc, out, _ = in_process("diff", "-q", a, b)
    assert rc == 1
    lines = out.splitlines()
    assert "only in A: step" in lines and "only in B: extra/kernel" in lines
    assert "differs: conv/biases: float32[3] vs float32[4]" in lines
    assert "differs: ids: int64[3] vs int32[3]" in lines
    assert "values differ: conv/weights: 2 elements, max abs diff 3" in lines
    assert lines[-1] == "different: 1 only in A, 1 only in B, 2 shape/dtype, 1 values (4 compared)"


def test_atol_rtol(tmp_path: Any, capsys: Any) -> None:
    a = _npz(tmp_path / "a.npz", {"x": np.array([100.0, 200.0, 0.0], np.float64)})
    b = _npz(tmp_path / "b.npz", {"x": np.array([101.0, 202.0, 0.5], np.float64)})
    assert ckptbridge.diff(a, b).value_diffs == {"x": (3, 2.0)}
    assert ckptbridge.diff(a, b, atol=2.0).identical
    assert ckptbridge.diff(a, b, atol=1.5).value_diffs == {"x": (1, 2.0)}  # only the 2.0, max over the bad ones
    # rtol is relative to B, as in numpy.isclose(a, b)
    assert ckptbridge.diff(a, b, rtol=0.01, atol=0.5).identical
    assert ckptbridge.diff(a, b, rtol=0.0049, atol=0.5).value_diffs == {"x": (2, 2.0)}
    assert ckptbridge.diff(a, b, rtol=0.009).value_diffs == {"x": (3, 2.0)}
    rc, out, _ = in_process("diff", "-q", a, b, "--atol", "2")
    assert rc == 0
    rc, out, _ = in_process("diff", "-q", a, b, "--rtol", "0.01")
    assert rc == 1 and "values differ: x: 1 elements, max abs diff 0.5" in out.splitlines()


def test_integers_beyond_float64_precision(tmp_path: Any) -> None:
    """int64 values past 2**53 that differ by 1 are different even with a tolerance below 1."""
    a = _npz(tmp_path / "a.npz", {"i": np.array([2**62, -(2**63)], np.int64), "u": np.array([2**64 - 1, 0], np.uint64)})
    b = _npz(tmp_path / "b.npz", {"i": np.array([2**62 + 1, 2**63 - 1], np.int64), "u": np.array([2**64 - 2, 2**64 - 1], np.uint64)})
    d = ckptbridge.diff(a, b, atol=0.5)
    assert d.value_diffs["i"] == (2, float(2**64 - 1))
    assert d.value_diffs["u"] == (2, float(2**64 - 1))
    assert ckptbridge.diff(a, b, atol=2.0**65).identical


def test_nan_and_signed_zero(tmp_path: Any) -> None:
    quiet, payload = 0x7FC00000, 0x7FC00123
    a = _ckpt(tmp_path / "a" / "m.ckpt", {
        "same_nan": f32_bits(quiet, payload, 0x3F800000),
        "other_nan": f32_bits(quiet),
        "zero": np.array([0.0, 1.0], np.float32),
        "nan_vs_num": np.array([np.nan], np.float64),
        "bf16": np.array([np.nan, 1.0], ml_dtypes.bfloat16),
    })
    b = _ckpt(tmp_path / "b" / "m.ckpt", {
        "same_nan": f32_bits(quiet, payload, 0x3F800000),
        "other_nan": f32_bits(payload),
        "zero": np.array([-0.0, 1.0], np.float32),
        "nan_vs_num": np.array([1.0], np.float64),
        "bf16": np.array([np.nan, 1.0078125], ml_dtypes.bfloat16),
    })
    exact = ckptbridge.diff(a, b)
    assert "same_nan" not in exact.value_diffs  # the same NaN payload is identical
    assert exact.value_diffs["other_nan"][0] == 1  # another payload is not, in exact mode
    assert exact.value_diffs["zero"] == (1, 0.0)  # -0.0 vs 0.0: different bits, zero distance
    assert exact.value_diffs["nan_vs_num"][0] == 1
    assert exact.value_diffs["bf16"] == (1, 0.0078125)
    loose = ckptbridge.diff(a, b, atol=0.01)
    assert set(loose.value_diffs) == {"nan_vs_num"}  # any NaN equals any NaN, -0.0 == 0.0, bf16 within 0.01


def test_strings_bool_complex_bfloat16(tmp_path: Any, capsys: Any) -> None:
    a_vals = {
        "s": _strings(b"", b"\x00a", b"\xff\xfe", b"same"),
        "b": np.array([[True, False], [True, True]]),
        "c": np.array([1 + 1j, 2 - 2j], np.complex64),
        "h": np.array([1.0, 2.0, 3.0], ml_dtypes.bfloat16),
    }
    b_vals = {
        "s": _strings(b"\x00", b"\x00a", b"\xff\xfd", b"same"),
        "b": np.array([[False, False], [True, False]]),
        "c": np.array([1 + 4j, 2 - 2j], np.complex64),
        "h": np.array([1.0, 2.0, 3.0], ml_dtypes.bfloat16),
    }
    a = _ckpt(tmp_path / "a" / "m.ckpt", a_vals)
    b = _ckpt(tmp_path / "b" / "m.ckpt", b_vals)
    d = ckptbridge.diff(a, b)
    assert d.value_diffs == {"s": (2, None), "b": (2, None), "c": (1, 3.0)}
    rc, out, _ = in_process("diff", "-q", a, b)
    assert rc == 1
    assert "values differ: s: 2 elements" in out.splitlines() and "values differ: b: 2 elements" in out.splitlines()
    assert "values differ: c: 1 elements, max abs diff 3" in out.splitlines()
    same = _ckpt(tmp_path / "c" / "m.ckpt", a_vals)
    assert ckptbridge.diff(a, same).identical


def test_errors_exit_2(tmp_path: Any, capsys: Any) -> None:
    a = _npz(tmp_path / "a.npz", BASE)
    with pytest.raises(NotFoundError):
        ckptbridge.diff(a, str(tmp_path / "nope.npz"))
    rc, out, err = in_process("diff", "-q", a, str(tmp_path / "nope" / "model.ckpt"))
    assert rc == 2 and out == ""
    assert err.startswith("ckptbridge: error: ") and err.count("\n") == 1 and "nope" in err
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    rc, out, err = in_process("diff", "-q", a, str(tmp_path / "bad.npz"))
    assert rc == 2 and err.startswith("ckptbridge: error: ") and err.count("\n") == 1
    with pytest.raises(CkptBridgeError):
        ckptbridge.diff(a, str(tmp_path / "bad.npz"))


def test_python_dash_m_exit_codes(tmp_path: Any) -> None:
    a = _npz(tmp_path / "a.npz", BASE)
    b = _ckpt(tmp_path / "ck" / "m.ckpt", {**BASE, "step": np.array(8, np.int64)})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckptbridge", "diff", *args], capture_output=True, text=True, timeout=120)

    same = run(a, a)
    assert same.returncode == 0 and same.stdout.startswith("identical: 5 tensors"), same
    differ = run(a, os.path.dirname(b))  # a directory: its latest checkpoint
    assert differ.returncode == 1, differ
    assert "values differ: step: 1 elements, max abs diff 1" in differ.stdout.splitlines()
    err = run(a, str(tmp_path / "missing.h5"))
    assert err.returncode == 2 and err.stderr.startswith("ckptbridge: error: ") and err.stdout == ""


# --------------------------------------------------------------------------- against TensorFlow's own checkpoints


@pytest.mark.tf
@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_tf_checkpoint_vs_its_archive(dtypes_ckpt: str, fmt: str, tmp_path: Any, capsys: Any) -> None:
    """Every dtype (bfloat16, strings, NaNs, -0.0, 0-d, empty) compares identical to its own export."""
    archive = str(tmp_path / f"d.{fmt}")
    ckptbridge.export(dtypes_ckpt, archive)
    for engine in ("native", "tf"):
        d = ckptbridge.diff(dtypes_ckpt, archive, read=ckptbridge.ReadOptions(engine=engine))
        assert d.identical, (d.only_a, d.only_b, d.spec_diffs, d.value_diffs)
        assert d.compared == 30
    rc, out, _ = in_process("diff", "-q", dtypes_ckpt, archive)
    assert rc == 0 and out == "identical: 30 tensors\n"


@pytest.mark.tf
def test_tf_checkpoints_that_differ(ckpts: Any, tmp_path: Any, capsys: Any) -> None:
    """Two checkpoints written by TensorFlow: one value, one dtype and one name changed."""
    values = ckpts.dtype_tensors()
    changed = dict(values)
    changed["dtypes/float32"] = values["dtypes/float32"].copy()
    changed["dtypes/float32"][0, 0, 1] = 0.0  # was -0.0
    changed["dtypes/string"] = _strings(b"", b"\x00a\x00", b"other")
    changed["scalar/int64"] = np.array(5, np.int32)
    del changed["global_step"]
    tf = ckpts.tf

    def save(prefix: str, vals: dict[str, np.ndarray]) -> str:
        names = sorted(vals)
        tensors = [tf.constant(vals[n], dtype=tf.string) if vals[n].dtype == object and vals[n].size
                   else tf.zeros(vals[n].shape, tf.string) if vals[n].dtype == object else tf.constant(vals[n]) for n in names]
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
        return prefix

    a = save(str(tmp_path / "a.ckpt"), values)
    b = save(str(tmp_path / "b.ckpt"), changed)
    d = ckptbridge.diff(a, b)
    assert d.only_a == ["global_step"] and d.only_b == []
    assert set(d.spec_diffs) == {"scalar/int64"}
    assert d.value_diffs == {"dtypes/float32": (1, 0.0), "dtypes/string": (1, None)}
    archive = str(tmp_path / "b.h5")
    ckptbridge.export(b, archive)
    assert ckptbridge.diff(a, archive).value_diffs == d.value_diffs
    rc, out, _ = in_process("diff", "-q", a, archive)
    assert rc == 1 and "only in A: global_step" in out.splitlines()
