"""The public verbs' shape: a source is a path or an open Reader, options are small values, no verb is wide."""

from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any

import h5py
import numpy as np
import pytest

import ckptbridge
from ckptbridge.errors import CkptBridgeError, FormatError, UnsafeArchiveError

from helpers import assert_one_line_error, cli

# The result records the library builds and returns (a caller reads them, never constructs them).
_RESULTS = {"Report", "DiffReport", "VerifyReport"}


def test_no_public_callable_takes_more_than_twelve_parameters() -> None:
    wide = {}
    for name in ckptbridge.__all__:
        obj = getattr(ckptbridge, name)
        if not callable(obj) or name in _RESULTS:
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        n = len(inspect.signature(obj).parameters)
        if n > 12:
            wide[name] = n
    assert wide == {}
    for verb in ("export", "rebuild", "diff", "verify", "load"):  # and none repeats read()'s options
        params = inspect.signature(getattr(ckptbridge, verb)).parameters
        assert not {"names", "member", "max_tensor_bytes", "verify"} & params.keys(), verb


@pytest.mark.tf
@pytest.mark.parametrize("engine,label", [("native", "native"), ("tf", "tensorflow")])
def test_export_diff_verify_take_an_open_reader(dtypes_ckpt: str, assert_same_as_tf: Any, tmp_path: Any, engine: str,
                                                label: str) -> None:
    out = str(tmp_path / "o.npz")
    with ckptbridge.read(dtypes_ckpt, engine=engine) as r:
        report = ckptbridge.export(r, out)
        assert sorted(report.written) == sorted(r)
        d = ckptbridge.diff(r, out)
        assert d.identical and d.compared == len(r), (d.only_a, d.only_b, d.value_diffs)
        v = ckptbridge.verify(r)
        assert v.ok and v.checked == len(r), v.message
        name = next(iter(r))
        assert r[name].tobytes() == r[name].tobytes()  # the verbs left it open: it is the caller's to close
    with ckptbridge.read(out) as a:
        assert assert_same_as_tf(a, dtypes_ckpt) == len(a)  # bit-exact against TensorFlow's reader
        assert a.metadata()["engine"] == label  # read with the Reader's engine, not a default
    with ckptbridge.read(out) as a, ckptbridge.read(dtypes_ckpt) as b:
        assert ckptbridge.diff(a, b).identical and ckptbridge.verify(a).ok


def _checkpoint(tmp_path: Any) -> str:
    prefix = str(tmp_path / "ck" / "model.ckpt")
    ckptbridge.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16)}, prefix)
    return prefix


def test_a_source_may_be_a_pathlike(tmp_path: Any) -> None:
    prefix = pathlib.Path(_checkpoint(tmp_path))
    out = tmp_path / "o.safetensors"
    ckptbridge.export(prefix, out)
    assert ckptbridge.diff(prefix, out).identical and ckptbridge.verify(out).ok
    back = tmp_path / "back" / "model.ckpt"
    ckptbridge.rebuild(out, back)
    got = ckptbridge.load(back)
    assert {n: (a.dtype, a.tobytes()) for n, a in got.items()} == {n: (a.dtype, a.tobytes()) for n, a in ckptbridge.load(prefix).items()}


def test_reading_options_belong_to_the_reader_not_beside_it(tmp_path: Any) -> None:
    prefix = _checkpoint(tmp_path)
    with ckptbridge.read(prefix) as r:
        with pytest.raises(CkptBridgeError, match="is an open Reader.*read applies to a source given by its path"):
            ckptbridge.export(r, str(tmp_path / "o.npz"), read=ckptbridge.ReadOptions(engine="native"))
    with ckptbridge.read(prefix, verify=False) as r:
        with pytest.raises(CkptBridgeError, match="verify=False, which reads without checking checksums"):
            ckptbridge.verify(r)
    with pytest.raises(FormatError, match="a source is a path .* or an open Reader"):
        ckptbridge.load(42)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="naming is a Naming or a Port, got str; for a port map, Port"):
        ckptbridge.export(prefix, str(tmp_path / "o.npz"), "torchvision:vgg16")  # type: ignore[arg-type]
    assert not (tmp_path / "o.npz").exists()


def _claims_512_gib(tmp_path: Any) -> str:
    """An HDF5 archive of 1.4 KB whose one dataset claims 512 GiB (unwritten chunks)."""
    path = str(tmp_path / "big.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("w", shape=(1 << 37,), dtype="<f4", chunks=(1 << 20,))
    return path


def test_load_and_export_keep_reads_tensor_size_guard(tmp_path: Any) -> None:
    big = _claims_512_gib(tmp_path)
    guard = "claims 549755813888 bytes, over the limit of 68719476736; raise max_tensor_bytes if it is genuine"
    with pytest.raises(UnsafeArchiveError, match=guard):
        ckptbridge.read(big)
    with pytest.raises(UnsafeArchiveError, match=guard):
        ckptbridge.load(big)
    with pytest.raises(UnsafeArchiveError, match=guard):
        ckptbridge.export(big, str(tmp_path / "o.npz"))
    with pytest.raises(UnsafeArchiveError, match="over the limit of 16"):
        ckptbridge.load(big, read=ckptbridge.ReadOptions(max_tensor_bytes=16))
    out = str(tmp_path / "o.npz")
    assert_one_line_error(cli("export", big, out), "over the limit of 68719476736; raise --max-tensor-gb if it is genuine")
    assert_one_line_error(cli("export", big, out, "--max-tensor-gb", "1000"), "only 0 are stored in the file")  # the other bound
    assert sorted(os.listdir(tmp_path)) == ["big.h5"]


def test_select_and_rename_refuse_a_lone_string() -> None:
    with pytest.raises(FormatError, match="Select.include is a sequence of regular expressions"):
        ckptbridge.Select(include="^w$")  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="one pair .*wrap it in a list"):
        ckptbridge.Rename(rules=("^a", "b"))  # type: ignore[arg-type]


def test_verify_says_whether_checksums_were_there_to_check(tmp_path: Any) -> None:
    """A checkpoint (crc32c per tensor) and a ckptbridge archive (crc32c in its metadata) are
    checked; a plain np.savez archive has none, and verify says only readability was checked.
    Which engine read a source is carried on it (Source.engine), not looked up afterwards."""
    ckpt = str(tmp_path / "ck" / "model.ckpt")
    ckptbridge.save({"w": np.arange(3.0)}, ckpt)
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, w=np.arange(3.0))
    ours = str(tmp_path / "ours.npz")
    ckptbridge.export(ckpt, ours)
    assert ckptbridge.verify(ckpt).has_checksums
    assert ckptbridge.verify(ours).has_checksums
    assert not ckptbridge.verify(plain).has_checksums
    with ckptbridge.read(ckpt) as r:
        assert ckptbridge.verify(r).has_checksums  # through the Reader's views, to the engine's source
    r = cli("verify", plain)
    assert r.returncode == 0 and "no checksums recorded" in r.stdout + r.stderr
