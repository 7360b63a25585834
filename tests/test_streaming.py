"""Chunked streaming through the pipe: every block boundary, bit-exact, damage still caught.

Tensors are small and the block size tiny (down to one byte) so that every
slicing branch of ``_chunks.c_blocks`` runs: several blocks per row, several
rows per block, 0-d and zero-size tensors, block sizes that are not a
multiple of the item size.  The slow test checks the point of it all: a
2.5 GB tensor converts in well under 300 MB of peak RSS.
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import ckptbridge
from ckptbridge._resolve import archive_kind, open_archive_sink, open_checkpoint_sink, open_source
from ckptbridge.bundle import BundleReader
from ckptbridge.bundle.writer import BundleWriter
from ckptbridge.errors import CorruptError
from ckptbridge.formats.npz import NpzSink
from ckptbridge.io.chunks import c_blocks
from ckptbridge.pipe.names import make_plan
from ckptbridge.pipe.transfer import transfer

from helpers import assert_same_array, flip

CHUNKS = [1, 7, 64, 1 << 20]


def _values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {
        "f32/3d": rng.standard_normal((5, 7, 3)).astype(np.float32),
        "f32/row": rng.standard_normal((1, 37)).astype(np.float32),
        "f16": rng.standard_normal((9, 2)).astype(np.float16),
        "f64/nan": np.array([np.nan, -0.0, np.inf, 1e-300], dtype=np.float64),
        "bf16": rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16),
        "bool": rng.random((4, 3, 2)) > 0.5,
        "c64": (rng.standard_normal(10) + 1j * rng.standard_normal(10)).astype(np.complex64),
        "c128": (rng.standard_normal((2, 3)) + 1j).astype(np.complex128),
        "i8": rng.integers(-128, 127, (13,), dtype=np.int8),
        "u64": np.array([0, 2**64 - 1, 12345], dtype=np.uint64),
        "i32/4d": rng.integers(-9, 9, (2, 3, 4, 5), dtype=np.int32),
        "scalar/f32": np.array(2.5, dtype=np.float32),
        "scalar/bf16": np.array(-1.25, dtype=ml_dtypes.bfloat16),
        "empty": np.zeros((3, 0, 2), np.float32),
        "strings": np.array([b"", b"\x00x", b"\xffy"], dtype=object),
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "w/ExponentialMovingAverage": rng.standard_normal((3, 2)).astype(np.float32),
    }
    return out


def _native_ckpt(directory: str, values: dict[str, np.ndarray]) -> str:
    prefix = os.path.join(directory, "src.ckpt")
    w = BundleWriter(prefix)
    for name in sorted(values):
        w.write(name, values[name])
    w.commit()
    return prefix


def _convert(src_path: str, out: str, chunk: int, compress: bool = False) -> dict[str, int]:
    """Run the pipe with ``chunk``-byte blocks; returns how many tensors each side streamed."""
    counts = {"streamed": 0, "whole": 0}
    with open_source(src_path) as src:
        real = src.read_blocks

        def spy(name: str, chunk_bytes: int):  # type: ignore[no-untyped-def]
            stream = real(name, chunk_bytes)
            counts["streamed" if stream is not None else "whole"] += 1
            return stream

        src.read_blocks = spy  # type: ignore[method-assign]
        plan = make_plan(list(src.specs()))
        sink = open_archive_sink(out, compress=compress) if archive_kind(out) else open_checkpoint_sink(out, engine="native")
        transfer(src, sink, plan, chunk_bytes=chunk)
    return counts


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (17,), (1, 37), (5, 7, 3), (2, 3, 4, 5), (1, 1, 9)])
@pytest.mark.parametrize("max_bytes", [1, 4, 7, 12, 60, 10_000])
def test_c_blocks_tile_the_tensor_in_c_order(shape: tuple[int, ...], max_bytes: int) -> None:
    arr = np.arange(math.prod(shape), dtype=np.int32).reshape(shape)
    pos = 0
    for start, n, sel in c_blocks(shape, 4, max_bytes):
        assert start == pos
        block = arr[sel] if sel else arr
        assert block.size == n and (n * 4 <= max_bytes or n == 1)
        assert np.array_equal(np.ravel(block), np.arange(start, start + n)), (shape, max_bytes, sel)
        pos += n
    assert pos == arr.size


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("suffix", [".npz", ".h5", ".h5-gzip"])
def test_export_and_import_stream_bit_exact(tmp_path, chunk: int, suffix: str) -> None:
    """.h5 streams contiguous datasets from the mapped file; gzip'd (chunked) ones through HDF5."""
    values = _values()
    prefix = _native_ckpt(str(tmp_path), values)
    out = str(tmp_path / f"out{suffix.split('-')[0]}")
    counts = _convert(prefix, out, chunk, compress=suffix.endswith("gzip"))
    assert counts == {"streamed": len(values) - 1, "whole": 1}  # only the string tensor is read whole
    with ckptbridge.read(out) as r:
        assert set(r) == set(values)
        for name, want in values.items():
            assert_same_array(r[name], want, name)
    back = str(tmp_path / "back" / "model.ckpt")
    counts = _convert(out, back, chunk)
    assert counts["streamed"] == len(values) - 1
    with BundleReader(back) as r:
        assert set(r.specs()) == set(values)
        for name, want in values.items():
            assert_same_array(r.read(name), want, name)
            if want.dtype != object:  # the stored crc32c is TensorFlow's, computed over the streamed bytes
                stream = r.read_blocks(name, 5)
                assert stream is not None and stream.drain() == r.checksum(name)


def test_streamed_npz_is_plain_numpy(tmp_path) -> None:
    values = _values()
    prefix = _native_ckpt(str(tmp_path), values)
    out = str(tmp_path / "out.npz")
    _convert(prefix, out, 7)
    with np.load(out, allow_pickle=False) as z:
        for name in ("f32/3d", "bool", "c128", "scalar/f32", "empty", "u64"):
            assert_same_array(z[name], values[name], name)
        assert z["bf16"].dtype == np.uint16 and z["bf16"].tobytes() == values["bf16"].tobytes()


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_damaged_checkpoint_fails_midstream_and_leaves_nothing(tmp_path, suffix: str) -> None:
    values = {"big": np.arange(4000, dtype=np.float32).reshape(40, 100), "small": np.ones(3, np.int64)}
    prefix = _native_ckpt(str(tmp_path), values)
    with BundleReader(prefix) as r:
        e = r._entries[b"big"]
        data = glob.glob(prefix + ".data-*")[0]
    flip(data, e.offset + 3000)  # inside a late block: earlier blocks are already written
    out = str(tmp_path / f"out{suffix}")
    with pytest.raises(CorruptError, match="big.*checksum mismatch"):
        _convert(prefix, out, 64)
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_damaged_archive_fails_import(tmp_path) -> None:
    values = {"big": np.arange(4000, dtype=np.float32).reshape(40, 100)}
    prefix = _native_ckpt(str(tmp_path), values)
    out = str(tmp_path / "out.npz")
    _convert(prefix, out, 64)
    with open(out, "rb") as f:
        at = f.read().find(np.float32(3000).tobytes())
    assert at > 0
    flip(out, at)
    with pytest.raises(CorruptError, match="checksum mismatch"):
        _convert(out, str(tmp_path / "back" / "m.ckpt"), 64)
    assert not os.path.exists(str(tmp_path / "back" / "m.ckpt.index"))


def test_streamed_readback_catches_a_bad_disk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"big": np.arange(4000, dtype=np.float32).reshape(40, 100)}
    prefix = _native_ckpt(str(tmp_path), values)
    real_finish = NpzSink.finish

    def finish_then_rot(self, metadata=None):  # type: ignore[no-untyped-def]
        real_finish(self, metadata)
        with open(self.readback_path, "rb") as f:
            at = f.read().find(np.float32(1234).tobytes())
        flip(self.readback_path, at)

    monkeypatch.setattr(NpzSink, "finish", finish_then_rot)
    out = str(tmp_path / "out.npz")
    with pytest.raises(CorruptError, match="read-back"):
        _convert(prefix, out, 64)
    assert not os.path.exists(out)


@pytest.mark.tf
def test_tf_written_checkpoints_stream_bit_exact(tmp_path, dtypes_ckpt: str, partitioned_ckpt: str, sharded_ckpt: str, assert_same_as_tf) -> None:  # type: ignore[no-untyped-def]
    for i, prefix in enumerate((dtypes_ckpt, partitioned_ckpt, sharded_ckpt)):
        for suffix in (".npz", ".h5"):
            out = str(tmp_path / f"{i}{suffix}")
            _convert(prefix, out, 7)
            with ckptbridge.read(out) as r:
                assert_same_as_tf(r, prefix)
            back = str(tmp_path / f"back{i}{suffix[1:]}" / "m.ckpt")
            _convert(out, back, 5)
            with ckptbridge.read(prefix) as r:  # TensorFlow reads what the streamed writer wrote
                assert_same_as_tf(r, back)


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import ckptbridge
    src, out = sys.argv[1], sys.argv[2]
    if out.endswith((".npz", ".h5")):
        ckptbridge.export(src, out)
    else:
        ckptbridge.rebuild(src, out)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


@pytest.mark.slow
def test_multi_gb_tensor_converts_in_bounded_memory(tmp_path) -> None:
    n = (2500 << 20) // 4
    prefix = str(tmp_path / "big.ckpt")
    w = BundleWriter(prefix)
    piece = np.arange(1 << 22, dtype=np.float32)
    w.write_chunks("huge", "float32", (n,), (piece[: min(len(piece), n - i)] + i for i in range(0, n, len(piece))))
    w.write("small", np.ones((3, 3), np.float32))
    w.commit()
    npz = str(tmp_path / "big.npz")
    for src, out in ((prefix, npz), (npz, str(tmp_path / "back" / "m.ckpt"))):
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, src, out], capture_output=True, text=True, check=True)
        assert int(res.stdout.split()[-1]) < 300, f"{src} -> {out}: peak RSS {res.stdout.strip()} MB"
    with BundleReader(str(tmp_path / "back" / "m.ckpt")) as r, BundleReader(prefix) as orig:
        assert r.checksum("huge") == orig.checksum("huge")
