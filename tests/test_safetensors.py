""".safetensors: written by our streaming writer, read through the safetensors package.

Every file written here must load, bit for bit, in ``safetensors.numpy`` and
(where installed) ``safetensors.torch``; bad inputs fail with messages naming
the tensor; nothing is left behind when a write is refused.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

import ckptbridge  # noqa: E402
from ckptbridge._source import Source  # noqa: E402
from ckptbridge.errors import CorruptError, FormatError  # noqa: E402
from ckptbridge.formats.safetensors import SafetensorsSink, SafetensorsSource  # noqa: E402
from ckptbridge.pipe.names import make_plan  # noqa: E402
from ckptbridge.pipe.transfer import transfer  # noqa: E402
from ckptbridge.spec import TensorSpec, dtype_name  # noqa: E402

from helpers import leftovers, same  # noqa: E402


class DictSource(Source):
    """An in-memory source, so these tests need no TensorFlow."""

    kind = "dict"

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.path = "<memory>"
        self._a = arrays

    def specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in sorted(self._a.items())}

    def read(self, name: str) -> np.ndarray:
        return self._a[name]


def _write(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, Any] | None = None) -> Any:
    src = DictSource(arrays)
    return transfer(src, SafetensorsSink(path, source="test"), make_plan(list(src.specs())), metadata=metadata)


FLOATS = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-3])
ARRAYS = {
    "f16": FLOATS.astype(np.float16).reshape(2, 4),
    "f32": FLOATS.astype(np.float32),
    "f64": FLOATS,
    "bf16": FLOATS.astype(ml_dtypes.bfloat16).reshape(4, 2),
    "bf16/scalar": np.array(-1.5, dtype=ml_dtypes.bfloat16),
    **{dt: np.array([np.iinfo(dt).min, np.iinfo(dt).max, 0, 1], dtype=dt)
       for dt in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    "bool": np.array([[True, False], [False, True]]),
    "c64": np.array([1 + 2j, complex(np.nan, -0.0)], dtype=np.complex64),
    "scalar": np.array(3.25, dtype=np.float32),
    "empty": np.zeros((3, 0, 2), np.int32),
    "empty/1d": np.zeros((0,), ml_dtypes.bfloat16),
    "a/b/c:0 ü": np.arange(6, dtype=np.uint8),
}


def test_round_trip_every_dtype(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    _write(path, ARRAYS)
    with ckptbridge.read(path) as r:
        assert sorted(r) == sorted(ARRAYS)
        for name, want in ARRAYS.items():
            assert same(r[name], want), name
        md = r.metadata()
    assert md["format"] == "ckptbridge" and set(md["tensors"]) == set(ARRAYS)
    # The package itself loads it, bfloat16 included (NumPy knows the name once ml_dtypes is imported).
    plain = load_file(path)
    for name, want in ARRAYS.items():
        assert same(plain[name], want), name
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    assert header["__metadata__"]["format"] == "tf"
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % np.dtype(ARRAYS[name].dtype).itemsize == 0, name  # every tensor aligned


@pytest.mark.tf  # torch is installed only in the TensorFlow test venv
def test_torch_loads_it(tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load

    path = str(tmp_path / "m.safetensors")
    _write(path, ARRAYS)
    got = torch_load(path)
    assert sorted(got) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        t = got[name]
        assert tuple(t.shape) == want.shape, name
        if want.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16
            assert t.view(torch.int16).numpy().tobytes() == want.tobytes(), name
        else:
            assert same(t.numpy(), want), name


def test_strings_are_refused_naming_the_tensor_and_nothing_is_left(tmp_path: Any) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(FormatError, match=r"'labels/names' is a string tensor.*\(exclude\)"):
        _write(str(path), {"w": np.ones(3, np.float32), "labels/names": np.array([b"a", b"b"], dtype=object)})
    assert os.listdir(tmp_path) == []


def test_control_character_names_are_refused_before_writing(tmp_path: Any) -> None:
    with pytest.raises(FormatError, match=r"control character.*\(rename\)"):
        _write(str(tmp_path / "m.safetensors"), {"a\x1bb": np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == []


def test_a_sink_that_fails_to_open_its_temporary_leaves_nothing(tmp_path: Any, monkeypatch: Any) -> None:
    import ckptbridge.formats.safetensors as st_mod

    def failing_open(*args: Any, **kwargs: Any) -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(st_mod, "open", failing_open, raising=False)
    with pytest.raises(OSError):
        SafetensorsSink(str(tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == []


def test_complex128_is_refused(tmp_path: Any) -> None:
    with pytest.raises(FormatError, match="'z' has dtype complex128"):
        _write(str(tmp_path / "m.safetensors"), {"z": np.ones(2, np.complex128)})
    assert os.listdir(tmp_path) == []


def test_large_metadata_moves_the_data_once(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    dropped = {f"optimizer/slot_{i:05d}": "x" * 60 for i in range(3000)}  # ~240 KB, past the reserved room
    _write(path, ARRAYS, metadata={"dropped": dropped})
    plain = load_file(path)
    for name, want in ARRAYS.items():
        assert same(plain[name], want), name
    with ckptbridge.read(path) as r:
        assert r.metadata()["dropped"] == dropped


def test_foreign_file_reads_and_unknown_dtypes_are_named(tmp_path: Any) -> None:
    path = str(tmp_path / "f.safetensors")
    save_file({"a": np.arange(4, dtype=np.float32), "b": np.array(2, dtype=np.int64)}, path)
    with ckptbridge.read(path) as r:
        assert r.metadata() == {}
        assert same(r["a"], np.arange(4, dtype=np.float32)) and same(r["b"], np.array(2, np.int64))
    # float8 is carried: the safetensors package cannot hand it to NumPy, so it is read from its byte range.
    fp8 = str(tmp_path / "fp8.safetensors")
    want = np.array([0.5, -1.5, 448.0], dtype=ml_dtypes.float8_e4m3fn)
    save_file({"q": want}, fp8)
    with ckptbridge.read(fp8) as r:
        assert r.specs["q"].dtype == "float8_e4m3fn" and same(r["q"], want)
    e8m0 = str(tmp_path / "e8m0.safetensors")
    save_file({"q": np.zeros(2, dtype=ml_dtypes.float8_e8m0fnu)}, e8m0)
    with pytest.raises(FormatError, match="'q' has dtype F8_E8M0"):
        ckptbridge.read(e8m0)


def test_foreign_file_imports_graph_free_bit_exact_from_its_mapped_bytes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the safetensors package wrote (no records): each tensor streams from the mapped file, its crc32c from
    those bytes while the kernel copies them into the checkpoint; float8 and bfloat16 keep their bits."""
    from ckptbridge.bundle import BundleReader
    from ckptbridge.io import chunks

    rng = np.random.default_rng(5)
    want = {"w": rng.standard_normal((64, 33)).astype(np.float32), "bf16": FLOATS.astype(ml_dtypes.bfloat16),
            "fp8": np.array([0.5, -1.5, 448.0, -0.0], dtype=ml_dtypes.float8_e4m3fn), "mask": np.array([True, False, True]),
            "step": np.array(9, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}
    path = str(tmp_path / "f.safetensors")
    save_file(want, path)
    copied: list[int] = []
    real = chunks.kernel_copy

    def counting(*args: Any) -> int:
        n = real(*args)
        copied.append(n)
        return n

    monkeypatch.setattr(chunks, "kernel_copy", counting)
    with SafetensorsSource(path) as src:
        stream = src.read_blocks("w", 1 << 20)
        assert stream is not None and stream.span is not None and stream.stored is None  # no record: read, not moved unread
        assert src.read_blocks("empty", 1 << 20) is None  # nothing to stream: read() gives it
    back = str(tmp_path / "back" / "model.ckpt")
    ckptbridge.rebuild(path, back)
    assert sum(copied) == sum(a.nbytes for a in want.values())
    with BundleReader(back) as r:
        for name, value in want.items():
            got = r.read(name)
            assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes(), name


def test_flipped_byte_is_caught_by_crc(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    arrays = {"w": np.arange(64, dtype=np.float32)}
    _write(path, arrays)
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        b = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    v = ckptbridge.verify(path)
    assert not v.ok and v.bad == "w" and "crc32c" in (v.message or "")
    with ckptbridge.read(path, verify=False) as r:
        assert not same(r["w"], arrays["w"])


def test_truncated_file_is_corrupt(tmp_path: Any) -> None:
    path = tmp_path / "m.safetensors"
    _write(str(path), {"w": np.arange(64, dtype=np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(CorruptError, match="not a readable .safetensors"):
        ckptbridge.read(str(path))


def test_oversized_tensor_claim_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    _write(path, {"w": np.zeros(1 << 16, np.float32)})
    with pytest.raises(ckptbridge.UnsafeArchiveError, match="'w'"):
        ckptbridge.read(path, max_tensor_bytes=1 << 10)


dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "uint16", "int32", "uint64", "bool", "complex64", "bfloat16"])


@settings(max_examples=40, deadline=None)
@given(
    items=st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
        st.tuples(dtypes, st.lists(st.integers(0, 3), max_size=3), st.integers(0, 2**32 - 1)),
        min_size=1, max_size=6,
    )
)
def test_property_round_trip(tmp_path_factory: pytest.TempPathFactory, items: dict[str, Any]) -> None:
    arrays = {}
    for name, (dt, shape, seed) in items.items():
        want = np.dtype(ml_dtypes.bfloat16) if dt == "bfloat16" else np.dtype(dt)
        n = int(np.prod(shape)) if shape else 1
        raw = np.random.default_rng(seed).integers(0, 256, size=n * want.itemsize, dtype=np.uint8)
        if dt == "bool":
            raw = raw & 1
        arrays[name] = raw.view(want).reshape(shape)
    path = str(tmp_path_factory.mktemp("prop") / "m.safetensors")
    _write(path, arrays)
    plain = load_file(path)
    with SafetensorsSource(path) as src:
        for name, want in arrays.items():
            assert same(src.read(name), want), name
            assert same(plain[name], want), name


@pytest.mark.tf
def test_tensorflow_checkpoint_exports_bit_exact(dtypes_ckpt: str, assert_same_as_tf: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "d.safetensors")
    with pytest.raises(FormatError, match="5 tensor.*'dtypes/complex128' has dtype complex128.*'dtypes/string' is a string tensor"):
        ckptbridge.export(dtypes_ckpt, path)
    report = ckptbridge.export(dtypes_ckpt, path, ckptbridge.Naming(select=ckptbridge.Select(exclude=["string", "complex128"])))
    assert leftovers(tmp_path) == []
    with ckptbridge.read(path) as r:
        assert assert_same_as_tf(r, dtypes_ckpt, names=report.written) == len(report.written)
    back = str(tmp_path / "back" / "d.ckpt")
    ckptbridge.rebuild(path, back)
    d = ckptbridge.diff(path, back)
    assert d.identical


def test_compress_is_an_error_for_safetensors_not_ignored(tmp_path: Any) -> None:
    """.safetensors has no compression; --compress used to be dropped without a word."""
    src = str(tmp_path / "a.npz")
    ckptbridge.save({"w": np.ones(4, np.float32)}, src)
    out = tmp_path / "b.safetensors"
    with pytest.raises(FormatError, match="safetensors archives are not compressed"):
        ckptbridge.export(src, str(out), compress=True)
    assert not out.exists()
