"""The byte-copy fast path (copy_file_range from a source's file span), our own zip
writer, and durability (fsync before the rename, or not with --no-fsync).

TensorFlow-free: the checkpoints here are written by ckptbridge's own writer,
which tests/test_bundle.py checks against TensorFlow.  Every conversion is
compared bit for bit (dtype and bytes) with the arrays that went in.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptbridge
from ckptbridge._resolve import open_source
from ckptbridge.bundle.writer import BundleWriter
from ckptbridge.formats import _zip
from ckptbridge.io import chunks as _chunks

from helpers import TMP_SUFFIX, leftovers, same

RNG = np.random.default_rng(7)
TENSORS: dict[str, np.ndarray] = {
    "big/weights": RNG.standard_normal((300, 257)).astype(np.float32),  # several blocks at 64 KiB
    "half": RNG.standard_normal((33, 7)).astype(np.float16),
    "bf16": RNG.standard_normal((129, 5)).astype(ml_dtypes.bfloat16),
    "ints": RNG.integers(-(2**62), 2**62, size=(1000,), dtype=np.int64),
    "bytes": RNG.integers(0, 255, size=(77,), dtype=np.uint8),
    "scalar": np.array(3.5, dtype=np.float64),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "flags": RNG.integers(0, 2, size=(9,)).astype(np.bool_),
    "global_step": np.array(1234, dtype=np.int64),
}
SMALL_CHUNK = 64 << 10


def _check(path: str) -> None:
    with open_source(path) as src:
        assert set(src.specs()) == set(TENSORS)
        for name, want in TENSORS.items():
            got = src.read(name)
            assert same(got, want), name


@pytest.fixture(scope="module")
def bundle(module_tmp: Any) -> str:
    prefix = str(module_tmp("fast") / "model.ckpt")
    w = BundleWriter(prefix)
    for name, value in TENSORS.items():
        w.write(name, value)
    w.commit()
    return prefix


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 KiB, so that tensors here span several and the copy jobs overlap."""
    import ckptbridge.pipe.transfer as pipe

    monkeypatch.setattr(pipe, "CHUNK_BYTES", SMALL_CHUNK)  # transfer's default, read when it is called


def _copies(monkeypatch: pytest.MonkeyPatch, mode: str) -> list[int]:
    """Make copy_file_range work, fail as on another file system, or come up short; count calls."""
    calls: list[int] = []
    real = os.copy_file_range

    def fake(src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None) -> int:
        calls.append(count)
        if mode == "exdev":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if mode == "short":  # a few bytes, then "end of file": the rest must come from the view
            if count > 8:
                return real(src, dst, 8, offset_src, offset_dst)
            return 0
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", fake)
    return calls


@pytest.mark.parametrize("mode", ["copy", "exdev", "short"])
@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_export_through_every_copy_outcome_is_exact(bundle: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str, fmt: str) -> None:
    calls = _copies(monkeypatch, mode)
    out = str(tmp_path / f"out.{fmt}")
    ckptbridge.export(bundle, out)
    assert calls, "the fast path was not taken"
    _check(out)
    assert ckptbridge.verify(out).ok
    assert sorted(os.listdir(tmp_path)) == [f"out.{fmt}"]


@pytest.mark.parametrize("mode", ["copy", "exdev"])
@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_graph_free_import_from_each_archive_is_exact(bundle: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, mode: str, fmt: str) -> None:
    archive = str(tmp_path / f"a.{fmt}")
    ckptbridge.export(bundle, archive)
    calls = _copies(monkeypatch, mode)
    prefix = str(tmp_path / "back" / "model.ckpt")
    os.makedirs(os.path.dirname(prefix))
    ckptbridge.rebuild(archive, prefix, engine="native")
    assert calls, "the fast path was not taken"
    _check(prefix)


def test_a_damaged_source_is_caught_even_when_the_kernel_copies(bundle: str, tmp_path: Any) -> None:
    """The crc32c of the views read is checked against the stored one: a flipped byte
    fails the export although copy_file_range never showed the bytes to Python."""
    import shutil

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(os.path.dirname(bundle)):
        shutil.copy(os.path.join(os.path.dirname(bundle), f), bad / f)
    data = bad / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x40  # inside big/weights, the first tensor the writer wrote
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptbridge.CorruptError):
        ckptbridge.export(str(bad / "model.ckpt"), str(tmp_path / "out.npz"))
    assert not (tmp_path / "out.npz").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("compress", [False, True])
def test_zip_writer_output_is_a_standard_zip(tmp_path: Any, compress: bool) -> None:
    path = str(tmp_path / "x.zip")
    payloads = {"a.npy": b"hello" * 1000, "ü/名前.npy": os.urandom(70_000), "empty.npy": b""}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        z = _zip.ZipWriter(fd)
        for name, data in payloads.items():
            with z.member(name, compress=compress) as m:
                for i in range(0, len(data), 4096):
                    m.write(data[i:i + 4096])
        z.close()
    finally:
        os.close(fd)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == list(payloads)
        for info in zf.infolist():
            assert zf.read(info) == payloads[info.filename]
            assert info.CRC == zlib.crc32(payloads[info.filename])
            assert info.compress_type == (zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


def test_zip_writer_refuses_a_duplicate_member(tmp_path: Any) -> None:
    fd = os.open(str(tmp_path / "x.zip"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        z = _zip.ZipWriter(fd)
        with z.member("a"):
            pass
        with pytest.raises(ValueError):
            z.member("a")
    finally:
        os.close(fd)


@pytest.mark.parametrize("compress", [False, True])
def test_npz_reads_with_numpy(bundle: str, tmp_path: Any, compress: bool) -> None:
    out = str(tmp_path / "o.npz")
    ckptbridge.export(bundle, out, compress=compress)
    with np.load(out, allow_pickle=False) as z:
        for name, want in TENSORS.items():
            got = z[name]
            if want.dtype == ml_dtypes.bfloat16:
                got = got.view(ml_dtypes.bfloat16)  # stored as its uint16 bits
            assert same(got, want), name


def test_zip_crc_is_zlibs() -> None:
    data = os.urandom(1 << 20)
    assert _zip.crc32(data) == zlib.crc32(data)
    assert _zip.crc32(data[1000:], _zip.crc32(data[:1000])) == zlib.crc32(data)


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.parametrize("fmt", ["npz", "h5", "ckpt"])
def test_outputs_are_fsynced_before_the_rename_unless_asked_not_to(bundle: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    seen = _fsynced(monkeypatch)
    for fsync in (True, False):
        seen.clear()
        d = tmp_path / str(fsync)
        d.mkdir()
        if fmt == "ckpt":
            archive = str(d / "a.npz")
            ckptbridge.export(bundle, archive, fsync=False)
            seen.clear()
            out = str(d / "model.ckpt")
            ckptbridge.rebuild(archive, out, engine="native", fsync=fsync)
            _check(out)
        else:
            out = str(d / f"o.{fmt}")
            ckptbridge.export(bundle, out, fsync=fsync)
            _check(out)
        files = [p for p in seen if p.endswith(TMP_SUFFIX) or TMP_SUFFIX + "/" in p]
        if fsync:
            assert files, seen  # the temporary was synced (by its temporary name: before the rename)
            assert str(d) in seen  # and the directory after it
        else:
            assert seen == []


def test_a_failed_fsync_publishes_nothing(bundle: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        ckptbridge.export(bundle, str(tmp_path / "o.npz"))
    assert os.listdir(tmp_path) == []


def test_cli_no_fsync(bundle: str, tmp_path: Any) -> None:
    out = str(tmp_path / "o.h5")
    proc = subprocess.run([sys.executable, "-m", "ckptbridge", "export", "-q", "--no-fsync", bundle, out], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _check(out)
    back = str(tmp_path / "model.ckpt")
    proc = subprocess.run([sys.executable, "-m", "ckptbridge", "import", "-q", "--no-fsync", out, back], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _check(back)


def test_write_stream_without_a_span_writes_the_views(tmp_path: Any) -> None:
    arr = RNG.standard_normal((100, 100)).astype(np.float32)
    from ckptbridge.spec import TensorSpec

    spec = TensorSpec("x", "float32", arr.shape)
    blocks = ((sel, arr[sel].reshape(-1)) for _, _, sel in _chunks.c_blocks(arr.shape, 4, 4096))
    stream = _chunks.BlockStream(spec, blocks)
    path = str(tmp_path / "raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        seen = bytearray()
        n = _chunks.write_stream(stream, fd, 16, lambda v: seen.extend(v))
    finally:
        os.close(fd)
    assert n == arr.nbytes
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[16:] == arr.tobytes() == bytes(seen)
    assert stream.crc is not None
