"""One pass over the bytes: a tensor that only moves is copied by the kernel and read once, and a
damaged block is still caught, named, and leaves nothing behind.

An export or a graph-free import of a tensor stored as plain bytes (a bundle's ``.data``, a stored
``.npz`` member) has the kernel copy it into the output; the one read of its bytes is the read-back of
the output, compared with the crc32c the source stores (``.npz`` reads the source too, once, for the
zip's CRC-32 and the crc32c together).  These tests count that read, and damage the source and
the output in turn (see docs/durability.md).
"""

from __future__ import annotations

import errno
import glob
import os

import numpy as np
import pytest

import ckptbridge
from ckptbridge.bundle import BundleReader
from ckptbridge.bundle.writer import BundleWriter
from ckptbridge.errors import CorruptError
from ckptbridge.io import checksum, chunks
from ckptbridge.io.atomic import TMP_SUFFIX

from helpers import flip

BIG = (512, 1024)  # 2 MiB of float32: several 256 KiB pieces, one block
NBYTES = 512 * 1024 * 4


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"big": rng.standard_normal(BIG).astype(np.float32), "small": np.arange(6, dtype=np.int64)}


def _ckpt(directory: str) -> str:
    prefix = os.path.join(directory, "src", "model.ckpt")
    os.makedirs(os.path.dirname(prefix))
    w = BundleWriter(prefix)
    for name, value in sorted(_values().items()):
        w.write(name, value)
    w.commit()
    return prefix


def _leftovers(directory: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if TMP_SUFFIX in p]


@pytest.fixture
def crc_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many bytes crc32c (every caller's: the streams', the records', the bundle's) reads."""
    counted = {"n": 0}
    real = checksum.crc32c

    def counting(data, value=0):  # type: ignore[no-untyped-def]
        counted["n"] += memoryview(data).nbytes
        return real(data, value=value)

    monkeypatch.setattr(checksum, "crc32c", counting)
    return counted


@pytest.mark.parametrize("suffix", [".h5", ".safetensors"])
def test_export_reads_each_byte_once(tmp_path, crc_bytes: dict[str, int], suffix: str) -> None:
    prefix = _ckpt(str(tmp_path))
    out = str(tmp_path / f"out{suffix}")
    crc_bytes["n"] = 0
    ckptbridge.export(prefix, out)
    # Before: the source's bytes were read for its check and the output's for the read-back (2x).
    assert NBYTES <= crc_bytes["n"] < 1.1 * NBYTES
    with ckptbridge.read(out) as r:
        for name, value in _values().items():
            got = r[name]
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes()


def test_npz_export_checks_each_piece_once_for_both_checksums(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored member needs its zip CRC-32 before the read-back, so the source is read: once, each
    piece given to the crc32c and then to the CRC-32 while it is in cache; the output is read back."""
    from ckptbridge.formats import _zip

    calls: list[tuple[str, int]] = []
    real_c, real_z = checksum.crc32c, _zip.crc32

    def c(data, value=0):  # type: ignore[no-untyped-def]
        calls.append(("crc32c", memoryview(data).nbytes))
        return real_c(data, value=value)

    def z(data, value=0):  # type: ignore[no-untyped-def]
        calls.append(("crc32", memoryview(data).nbytes))
        return real_z(data, value)

    prefix = _ckpt(str(tmp_path))
    monkeypatch.setattr(checksum, "crc32c", c)
    monkeypatch.setattr(_zip, "crc32", z)
    ckptbridge.export(prefix, str(tmp_path / "out.npz"))
    zipped = [i for i, (kind, n) in enumerate(calls) if kind == "crc32" and n > 1024]
    assert sum(calls[i][1] for i in zipped) == NBYTES
    for i in zipped:  # each piece: crc32c, then the CRC-32 of the same piece, at most SLICE_BYTES
        assert calls[i - 1] == ("crc32c", calls[i][1]) and calls[i][1] <= chunks.SLICE_BYTES
    assert sum(n for kind, n in calls if kind == "crc32c") < 2.1 * NBYTES  # the source once, the read-back once


@pytest.fixture
def copied_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many bytes the kernel copied (``io.chunks.kernel_copy``, both system calls behind it)."""
    counted = {"n": 0}
    real = chunks.kernel_copy

    def counting(*args):  # type: ignore[no-untyped-def]
        n = real(*args)
        counted["n"] += n
        return n

    monkeypatch.setattr(chunks, "kernel_copy", counting)
    return counted


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_import_reads_each_byte_once(tmp_path, crc_bytes: dict[str, int], copied_bytes: dict[str, int], suffix: str) -> None:
    # .safetensors used to be read whole through safe_open, checksummed there, again by the sink and by
    # the read-back: three reads, and the whole tensor in memory.
    prefix = _ckpt(str(tmp_path))
    archive = str(tmp_path / f"a{suffix}")
    ckptbridge.export(prefix, archive)
    back = str(tmp_path / "back" / "model.ckpt")
    crc_bytes["n"] = copied_bytes["n"] = 0
    ckptbridge.rebuild(archive, back)
    assert NBYTES <= crc_bytes["n"] < 1.1 * NBYTES  # the read-back's read of the output
    assert copied_bytes["n"] == sum(v.nbytes for v in _values().values())  # every tensor moved by the kernel, unread
    with BundleReader(back) as r:
        for name, value in _values().items():
            got = r.read(name)
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes()


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_flipped_source_byte_is_named_and_nothing_is_left(tmp_path, suffix: str) -> None:
    prefix = _ckpt(str(tmp_path))
    with BundleReader(prefix) as r:
        at = r._entries[b"big"].offset + NBYTES // 2
    flip(glob.glob(prefix + ".data-*")[0], at)
    out = str(tmp_path / f"out{suffix}")
    # The source's own error (its file, the tensor), not the read-back's "is the disk failing?".
    with pytest.raises(CorruptError, match=r"model\.ckpt\.data-00000-of-00001 \(tensor 'big'\): checksum mismatch"):
        ckptbridge.export(prefix, out)
    assert not os.path.exists(out)
    assert not _leftovers(str(tmp_path))


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_flipped_archive_byte_is_named_on_import(tmp_path, suffix: str) -> None:
    prefix = _ckpt(str(tmp_path))
    archive = str(tmp_path / f"a{suffix}")
    ckptbridge.export(prefix, archive)
    with open(archive, "rb") as f:
        at = f.read().find(_values()["big"][256].tobytes())
    assert at > 0
    flip(archive, at)
    back = str(tmp_path / "back" / "model.ckpt")
    # The archive's own error: its bytes were moved unread, the read-back found them changed, and the
    # archive read again says which side is at fault.
    with pytest.raises(CorruptError, match=rf"a\{suffix}: tensor 'big': checksum mismatch"):
        ckptbridge.rebuild(archive, back)
    assert not os.path.exists(os.path.dirname(back))
    assert not _leftovers(str(tmp_path))


def _rotting_copy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every kernel copy of a tensor's bytes land with one byte changed (a bad disk or kernel)."""
    real = os.copy_file_range
    hits: list[int] = []

    def copy_then_rot(src, dst, count, offset_src=None, offset_dst=None):  # type: ignore[no-untyped-def]
        n = real(src, dst, count, offset_src, offset_dst)
        if n > 4096 and offset_dst is not None:
            at = offset_dst + n // 2
            flip(f"/proc/self/fd/{dst}", at)  # the output may be open write-only
            hits.append(at)
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_then_rot)
    return hits


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_output_damaged_between_write_and_read_back_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    prefix = _ckpt(str(tmp_path))
    out = str(tmp_path / f"out{suffix}")
    hits = _rotting_copy(monkeypatch)
    with pytest.raises(CorruptError, match=r"read-back of .*out.*: tensor 'big' differs from what was written; output discarded"):
        ckptbridge.export(prefix, out)
    assert hits
    assert not os.path.exists(out)
    assert not _leftovers(str(tmp_path))


def test_checkpoint_damaged_between_write_and_read_back_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    prefix = _ckpt(str(tmp_path))
    archive = str(tmp_path / "a.npz")
    ckptbridge.export(prefix, archive)
    hits = _rotting_copy(monkeypatch)
    back = str(tmp_path / "back" / "model.ckpt")
    with pytest.raises(CorruptError, match=r"read-back of .*model\.ckpt: tensor 'big' differs from what was written; output discarded"):
        ckptbridge.rebuild(archive, back)
    assert hits
    assert not os.path.exists(os.path.dirname(back))
    assert not _leftovers(str(tmp_path))


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors", ""])
def test_without_kernel_copies_the_bytes_are_written_from_the_views(tmp_path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    def unsupported(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSYS, "not here")

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    monkeypatch.setattr(os, "sendfile", unsupported, raising=False)
    prefix = _ckpt(str(tmp_path))
    if suffix:
        out = str(tmp_path / f"out{suffix}")
        ckptbridge.export(prefix, out)
    else:
        archive = str(tmp_path / "a.npz")
        ckptbridge.export(prefix, archive)
        out = str(tmp_path / "back" / "model.ckpt")
        ckptbridge.rebuild(archive, out)
    with ckptbridge.read(out) as r:
        for name, value in _values().items():
            got = r[name]
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes()


def test_sendfile_copies_where_copy_file_range_cannot(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "sendfile"):
        pytest.skip("no sendfile here")

    def cross_device(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 64)
    dst = tmp_path / "dst"
    dst.write_bytes(b"x" * 10)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        d.seek(3)
        assert chunks.kernel_copy(s.fileno(), 100, d.fileno(), 10, 5000) == 5000
        assert d.tell() == 3  # the descriptor's own position is left where it was
    assert dst.read_bytes() == b"x" * 10 + (bytes(range(256)) * 64)[100:5100]
