"""Every dtype a TensorFlow checkpoint holds is carried exactly or refused by name: never left out silently.

float8, float4, int4/int2 and the quantized types (written by TensorFlow's SaveV2)
go through ls, export, import, diff and verify on both engines, bit-exact against
TensorFlow's reader; a tf.data iterator's DT_VARIANT state is listed by ls,
refused by export unless excluded, and compared and checked as stored bytes by
the native engine.  Each of these failed on 15c8d4f, where the native engine hid
such tensors and exited 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import ckptbridge  # noqa: E402
from ckptbridge import UncarriedDtypeError  # noqa: E402

from helpers import TMP_SUFFIX, assert_one_line_error, cli  # noqa: E402

pytestmark = pytest.mark.tf

ENGINES = ["native", "tf"]
ITERATOR = "it/.ATTRIBUTES/ITERATOR_STATE"


def tf_dtypes(prefix: str) -> dict[str, str]:
    """TensorFlow's own name -> dtype name listing (its dtype names are ckptbridge's)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {n: d.name for n, d in reader.get_variable_to_dtype_map().items() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def nothing_left(directory: Any) -> None:
    assert [p for p in os.listdir(directory) if TMP_SUFFIX in p] == []


# --------------------------------------------------------------------------- carried: float8, int4, quantized


@pytest.mark.parametrize("engine", ENGINES)
def test_ls_lists_every_tensor_with_tensorflows_dtype(lowbit_ckpt: str, engine: str) -> None:
    proc = cli("ls", lowbit_ckpt, "--json", "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    got = {t["name"]: t["dtype"] for t in doc["tensors"]}
    assert got == tf_dtypes(lowbit_ckpt)
    assert all(t["carried"] for t in doc["tensors"])
    assert doc["total_bytes"] == sum(t["bytes"] for t in doc["tensors"]) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_read_is_bit_exact_against_tensorflow(lowbit_ckpt: str, engine: str, ckpts: Any, assert_same_as_tf: Any) -> None:
    with ckptbridge.read(lowbit_ckpt, engine=engine) as r:
        assert assert_same_as_tf(r, lowbit_ckpt) == len(ckpts.lowbit_tensors())
        # Quantized arrays say what they are: TensorFlow's own NumPy type for them.
        assert r["quantized/qint8"].dtype == np.dtype([("qint8", "i1")])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", [".npz", ".h5"])
def test_export_and_import_round_trip_exactly(lowbit_ckpt: str, engine: str, fmt: str, tmp_path: Any, assert_same_as_tf: Any) -> None:
    out = str(tmp_path / f"a{fmt}")
    report = ckptbridge.export(lowbit_ckpt, out, read=ckptbridge.ReadOptions(engine=engine))
    assert sorted(report.written) == sorted(tf_dtypes(lowbit_ckpt)) and report.dropped == {}
    with ckptbridge.read(out) as r:
        assert_same_as_tf(r, lowbit_ckpt)
        tags = {n: rec["encoding"] for n, rec in r.metadata()["tensors"].items()}
    assert tags["lowbit/float8_e4m3fn"] == "float8_e4m3fn-as-uint8" and tags["quantized/qint16"] == "qint16-as-int16"
    assert ckptbridge.verify(out).ok
    back = str(tmp_path / "back" / "m.ckpt")
    ckptbridge.rebuild(out, back, engine=engine)
    assert tf_dtypes(back) == tf_dtypes(lowbit_ckpt)  # TensorFlow reads the dtypes it wrote
    with ckptbridge.read(back, engine="tf") as r:
        assert_same_as_tf(r, lowbit_ckpt)
    assert ckptbridge.diff(lowbit_ckpt, back, read=ckptbridge.ReadOptions(engine=engine)).identical
    nothing_left(tmp_path)


def test_float8_goes_to_safetensors_natively_and_the_rest_is_refused_by_name(lowbit_ckpt: str, tmp_path: Any, assert_same_as_tf: Any) -> None:
    import safetensors

    out = str(tmp_path / "f8.safetensors")
    native = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]
    ckptbridge.export(lowbit_ckpt, out, ckptbridge.Naming(select=ckptbridge.Select(include=[f"/{n}$" for n in native])))
    with safetensors.safe_open(out, framework="numpy") as f:
        codes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert codes["lowbit/float8_e4m3fn"] == "F8_E4M3" and codes["scalar/float8_e5m2"] == "F8_E5M2"
    with ckptbridge.read(out) as r:
        assert_same_as_tf(r, lowbit_ckpt, names=list(codes))
    proc = cli("export", lowbit_ckpt, str(tmp_path / "all.safetensors"))
    assert_one_line_error(proc, "quantized/qint8", "has dtype qint8", "lowbit/int4")
    assert not os.path.exists(tmp_path / "all.safetensors")
    nothing_left(tmp_path)


@pytest.mark.parametrize("engine", ENGINES)
def test_diff_sees_one_changed_quantized_element(lowbit_ckpt: str, engine: str, ckpts: Any, tmp_path: Any) -> None:
    import tensorflow as tf

    values = ckpts.lowbit_tensors()
    q = values["quantized/qint32"].copy()
    q.view(np.int32)[1, 2] += 1
    values["quantized/qint32"] = q
    prefix = str(tmp_path / "changed" / "m.ckpt")
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=[tf.constant(values[n]) for n in names])
    d = ckptbridge.diff(lowbit_ckpt, prefix, read=ckptbridge.ReadOptions(engine=engine))
    assert d.value_diffs == {"quantized/qint32": (1, 1.0)} and d.compared == len(names)


# --------------------------------------------------------------------------- not carried: variant


@pytest.mark.parametrize("engine", ENGINES)
def test_ls_shows_the_variant_tensor(iterator_ckpts: dict[str, str], engine: str) -> None:
    proc = cli("ls", iterator_ckpts["a"], "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(ITERATOR))
    assert "variant" in line and "(not carried)" in line
    assert "1 of a dtype ckptbridge cannot carry (variant)" in proc.stdout.splitlines()[-1]
    doc = json.loads(cli("ls", iterator_ckpts["a"], "--json", "--engine", engine).stdout)
    rec = next(t for t in doc["tensors"] if t["name"] == ITERATOR)
    assert rec["dtype"] == "variant" and rec["carried"] is False and doc["total_tensors"] == 2
    if engine == "native":
        assert rec["bytes"] > 0  # the stored size is known to the native engine
    with ckptbridge.read(iterator_ckpts["a"], engine=engine) as r:
        assert list(r) == ["v/.ATTRIBUTES/VARIABLE_VALUE"] and list(r.uncarried) == [ITERATOR]


@pytest.mark.parametrize(("engine", "fmt"), [("native", ".npz"), ("native", ".h5"), ("native", ".safetensors"), ("tf", ".npz")])
def test_export_refuses_the_variant_by_name_and_writes_nothing(iterator_ckpts: dict[str, str], engine: str, fmt: str, tmp_path: Any) -> None:
    out = tmp_path / f"out{fmt}"
    proc = cli("export", iterator_ckpts["a"], str(out), "--engine", engine)
    line = assert_one_line_error(proc, repr(ITERATOR), "variant", "--exclude")
    assert "^it/\\.ATTRIBUTES/ITERATOR_STATE$" in line
    assert not out.exists()
    nothing_left(tmp_path)
    with pytest.raises(UncarriedDtypeError) as e:
        ckptbridge.export(iterator_ckpts["a"], str(out), read=ckptbridge.ReadOptions(engine=engine))
    assert e.value.tensors == {ITERATOR: "variant"}


@pytest.mark.parametrize("engine", ENGINES)
def test_excluding_the_variant_is_reported_and_recorded(iterator_ckpts: dict[str, str], engine: str, tmp_path: Any) -> None:
    out = tmp_path / "out.npz"
    proc = cli("export", iterator_ckpts["a"], str(out), "--engine", engine, "--exclude", "ITERATOR_STATE")
    assert proc.returncode == 0, proc.stderr
    assert f"dropped {ITERATOR}: matched by an exclude pattern; its dtype variant is not carried" in proc.stderr
    with ckptbridge.read(str(out)) as r:
        assert list(r) == ["v/.ATTRIBUTES/VARIABLE_VALUE"]
        assert ITERATOR in r.metadata()["dropped"]


# A tf.data iterator's state changes shape from run to run (its element count is not fixed), so the
# byte comparisons below use a TensorList, a scalar variant that serializes the same way every time.
LIST = "list"


def test_native_verify_checks_the_variant_bytes(tensor_list_ckpts: dict[str, str], iterator_ckpts: dict[str, str], tmp_path: Any) -> None:
    import shutil

    for prefix in (tensor_list_ckpts["a"], iterator_ckpts["a"]):
        proc = cli("verify", prefix)
        assert proc.returncode == 0 and "ok: 2 tensors (1 of a dtype ckptbridge does not carry, checked as stored bytes)" in proc.stdout
    # Flip one byte inside the variant's stored bytes: verify names it.
    src = os.path.dirname(tensor_list_ckpts["a"])
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    prefix = str(bad / os.path.basename(tensor_list_ckpts["a"]))
    with ckptbridge.read(prefix) as r:
        assert r.read_raw(LIST)
        e = r._source._entries[r._source._keys[LIST]]  # where TensorFlow put it
    data = next(p for p in os.listdir(bad) if ".data-" in p)
    with open(bad / data, "r+b") as f:
        f.seek(e.offset + e.size // 2)
        b = f.read(1)
        f.seek(e.offset + e.size // 2)
        f.write(bytes([b[0] ^ 0x40]))
    proc = cli("verify", prefix)
    assert proc.returncode == 1 and proc.stdout.startswith(f"BAD: {LIST}:"), proc.stdout


def test_tf_engine_cannot_read_variants_and_says_so(tensor_list_ckpts: dict[str, str], iterator_ckpts: dict[str, str]) -> None:
    assert_one_line_error(cli("verify", iterator_ckpts["a"], "--engine", "tf"), repr(ITERATOR), "variant", "--engine native")
    assert_one_line_error(cli("diff", tensor_list_ckpts["a"], tensor_list_ckpts["b"], "--engine", "tf"), repr(LIST), "--engine native")


def test_native_diff_compares_variant_bytes(tensor_list_ckpts: dict[str, str]) -> None:
    same = cli("diff", tensor_list_ckpts["a"], tensor_list_ckpts["a2"])
    assert same.returncode == 0 and same.stdout.startswith("identical: 2 tensors (1 of a dtype"), same.stdout
    other = cli("diff", tensor_list_ckpts["a"], tensor_list_ckpts["b"])
    assert other.returncode == 1, other.stdout
    assert f"stored bytes differ: {LIST} (variant" in other.stdout
    d = ckptbridge.diff(tensor_list_ckpts["a"], tensor_list_ckpts["b"])
    assert d.raw_diffs == {LIST: "variant"} and not d.identical and d.value_diffs == {}


# --------------------------------------------------------------------------- sizes


def test_ls_counts_the_bytes_of_string_tensors(tmp_path: Any) -> None:
    """A 2 MiB string listed as 0 bytes hid it from anyone sizing a checkpoint by its listing."""
    import tensorflow as tf

    prefix = str(tmp_path / "s" / "m.ckpt")
    big = b"\xff" * (2 << 20)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["s", "w"], shape_and_slices=["", ""],
                      tensors=[tf.constant([big, b"x"]), tf.constant([1.0])])
    archive = str(tmp_path / "s.npz")
    ckptbridge.export(prefix, archive)
    for path in (prefix, archive, str(tmp_path / "s.h5")):
        if path.endswith(".h5"):
            ckptbridge.export(prefix, path)
        doc = json.loads(cli("ls", path, "--json").stdout)
        size = {t["name"]: t["bytes"] for t in doc["tensors"]}
        assert size["s"] >= len(big) + 1 and doc["total_bytes"] == size["s"] + 4, (path, size)
    # TensorFlow's reader tells no size without reading the value: shown as unknown, never as 0.
    proc = cli("ls", prefix, "--engine", "tf")
    assert proc.returncode == 0 and "1 string tensor(s) of unknown size not counted" in proc.stdout
    assert json.loads(cli("ls", prefix, "--json", "--engine", "tf").stdout)["tensors"][0]["bytes"] is None
