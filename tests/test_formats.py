""".npz and HDF5 sinks and sources, without TensorFlow: property-based round trips and plain archives."""

from __future__ import annotations

import os

import h5py
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptbridge
from ckptbridge import TensorSpec, UnsafeArchiveError
from ckptbridge.formats.hdf5 import Hdf5Sink, Hdf5Source
from ckptbridge.formats.npz import NpzSink, NpzSource
from ckptbridge.spec import ALL_DTYPES, numpy_dtype

from helpers import TMP_SUFFIX, assert_same_array

SINKS = {".npz": (NpzSink, NpzSource), ".h5": (Hdf5Sink, Hdf5Source)}
RESERVED = {"__ckptbridge__", "__ckptbridge_object_graph__"}

# --------------------------------------------------------------------------- strategies

_name_chars = st.sampled_from(list("ab/._ -") + ["é", "✓", "Ω", "\\", ":", "0"])
names_st = st.text(_name_chars, min_size=1, max_size=10).filter(lambda n: n not in RESERVED)


@st.composite
def name_sets(draw) -> list[str]:
    """Names, some of which are prefixes of others ("w", "w/x", "w/x/y")."""
    base = draw(st.lists(names_st, min_size=1, max_size=5, unique=True))
    out = list(base)
    for n in base:
        if draw(st.booleans()):
            out.append(n + "/" + draw(names_st))
    return sorted(set(out))


shapes_st = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def tensors(draw, dtype: str | None = None) -> np.ndarray:
    dtype = dtype or draw(st.sampled_from(ALL_DTYPES))
    shape = draw(shapes_st)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "string":
        arr = np.empty(shape, dtype=object)
        flat = arr.reshape(-1)
        for i, b in enumerate(draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n))):
            flat[i] = b
        return arr
    if dtype == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(shape)
    dt = numpy_dtype(dtype)
    raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))  # every bit pattern: NaN payloads, -0.0
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


def write_archive(path: str, data: dict[str, np.ndarray], *, compress: bool = False) -> None:
    sink_cls, _ = SINKS[os.path.splitext(path)[1]]
    sink = sink_cls(path, compress=compress, source="hypothesis")
    specs = [TensorSpec(n, ckptbridge.spec.dtype_name(a.dtype), a.shape) for n, a in data.items()]
    try:
        sink.begin(specs)
        for n, a in data.items():
            sink.write(n, a)
        sink.commit({"note": "test"})
    except BaseException:
        sink.abort()
        raise


# --------------------------------------------------------------------------- round trips

_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("fmt", sorted(SINKS))
@_settings
@given(data=st.data())
def test_round_trip(fmt, data, tmp_path_factory):
    names = data.draw(name_sets())
    arrays = {n: data.draw(tensors()) for n in names}
    compress = data.draw(st.booleans())
    path = str(tmp_path_factory.mktemp("rt") / f"a{fmt}")
    write_archive(path, arrays, compress=compress)
    assert [p for p in os.listdir(os.path.dirname(path)) if TMP_SUFFIX in p] == []
    with ckptbridge.read(path) as r:
        assert sorted(r) == sorted(arrays)
        for n, a in arrays.items():
            assert r.specs[n].shape == a.shape
            assert_same_array(r[n], a, n)
        meta = r.metadata()
        assert meta["source"] == "hypothesis" and meta["note"] == "test"
        assert set(meta["tensors"]) == set(arrays)
    assert ckptbridge.verify(path).ok


@pytest.mark.parametrize("fmt", sorted(SINKS))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_scalar_and_empty(fmt, dtype, tmp_path):
    """Every dtype as a 0-d scalar, a zero-size tensor and a small matrix, explicitly (not left to chance)."""
    rng = np.random.default_rng(1)
    if dtype == "string":
        scalar = np.empty((), dtype=object)
        scalar[()] = b"\xff\x00"
        arrays = {"s": scalar, "e": np.empty((2, 0), dtype=object), "m": np.array([[b""], [b"\x00a\x00"]], dtype=object)}
    else:
        dt = numpy_dtype(dtype)
        m = np.frombuffer(rng.bytes(6 * dt.itemsize), dtype=dt).reshape(2, 3).copy() if dtype != "bool" else rng.random((2, 3)) > 0.5
        arrays = {"s": m.reshape(-1)[0].reshape(()).copy(), "e": np.empty((2, 0), dtype=dt), "m": m}
    path = str(tmp_path / f"d{fmt}")
    write_archive(path, arrays)
    with ckptbridge.read(path) as r:
        for n, a in arrays.items():
            assert r.specs[n].dtype == dtype
            assert_same_array(r[n], a, n)
        assert r["s"].shape == ()


@pytest.mark.parametrize("fmt", sorted(SINKS))
def test_prefix_names_and_odd_names(fmt, tmp_path):
    names = ["w", "w/ExponentialMovingAverage", "w/ExponentialMovingAverage/x",
             "a.b", "a b", "ünï/cødé", "x/", "/lead", "a//b", ".", "..", "a/./b", "\\"]
    arrays = {n: np.full((2,), i, np.int32) for i, n in enumerate(names)}
    path = str(tmp_path / f"n{fmt}")
    write_archive(path, arrays)
    with ckptbridge.read(path) as r:
        assert sorted(r) == sorted(arrays)
        for n, a in arrays.items():
            assert_same_array(r[n], a, n)


# --------------------------------------------------------------------------- plain archives (no ckptbridge metadata)


def test_plain_np_savez(tmp_path):
    bf = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    arrays = {
        "conv/weights": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "step": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "c": np.array([1 + 2j], dtype=np.complex128),
        "empty": np.zeros((0, 3), np.float16),
        "u": np.array([2**64 - 1], dtype=np.uint64),
    }
    for compressed in (False, True):
        path = tmp_path / f"plain{int(compressed)}.npz"
        (np.savez_compressed if compressed else np.savez)(path, **arrays)
        with ckptbridge.read(str(path)) as r:
            assert r.metadata() == {}
            assert sorted(r) == sorted(arrays)
            for n, a in arrays.items():
                assert_same_array(r[n], a, n)
    # big-endian arrays come back in native order, same values
    path = tmp_path / "be.npz"
    np.savez(path, x=np.arange(5, dtype=">i4"))
    with ckptbridge.read(str(path)) as r:
        assert r["x"].dtype == np.dtype("int32") and r["x"].tolist() == [0, 1, 2, 3, 4]
    # np.savez of bfloat16 keeps an opaque void dtype; we refuse to guess
    path = tmp_path / "bf.npz"
    np.savez(path, bf=bf)
    with pytest.raises(ckptbridge.FormatError):
        with ckptbridge.read(str(path)) as r:
            r["bf"]


def test_plain_h5py(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["vgg_16/conv1/conv1_1/weights"] = np.arange(12, dtype=np.float32).reshape(3, 4)
        f["vgg_16/conv1/conv1_1/biases"] = np.zeros(4, np.float64)
        f["scalar"] = np.int16(-3)
        f["fixed"] = np.array([b"ab", b"c\x00"], dtype="S2")
        f["g/h/deep"] = np.array([True, False])
    with ckptbridge.read(str(path)) as r:
        assert sorted(r) == ["fixed", "g/h/deep", "scalar", "vgg_16/conv1/conv1_1/biases", "vgg_16/conv1/conv1_1/weights"]
        assert r.metadata() == {}
        assert_same_array(r["vgg_16/conv1/conv1_1/weights"], np.arange(12, dtype=np.float32).reshape(3, 4), "w")
        assert r["scalar"].shape == () and r["scalar"].dtype == np.int16
        assert r.specs["fixed"].dtype == "string"
        assert_same_array(r["g/h/deep"], np.array([True, False]), "deep")


def test_plain_h5py_vlen_strings(tmp_path):
    path = tmp_path / "vlen.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("vlen", data=[b"x", b"\xff\xfe"], dtype=h5py.string_dtype("ascii"))
        f.create_dataset("text", data=["é", ""], dtype=h5py.string_dtype("utf-8"))
    with ckptbridge.read(str(path)) as r:
        assert r.specs["vlen"].dtype == "string"
        assert list(r["vlen"]) == [b"x", b"\xff\xfe"]
        assert list(r["text"]) == ["é".encode(), b""]


# --------------------------------------------------------------------------- refusing pickles


class _Boom:
    """Unpickling this would create a file; it must never happen."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_member_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    boom = _Boom()
    boom.marker = str(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, ok=np.arange(3), evil=np.array([boom], dtype=object))
    with pytest.raises(UnsafeArchiveError, match="evil"):
        ckptbridge.read(str(path))
    with pytest.raises(UnsafeArchiveError):
        ckptbridge.verify(str(path))
    assert not marker.exists()
    # even an object array of plain bytes is a pickle: refused
    path = tmp_path / "bytes.npz"
    np.savez(path, s=np.array([b"a", b"b"], dtype=object))
    with pytest.raises(UnsafeArchiveError):
        ckptbridge.read(str(path))


def test_sinks_never_pickle(tmp_path):
    arr = np.array([b"a", b"\x00"], dtype=object)
    path = str(tmp_path / "s.npz")
    write_archive(path, {"s": arr})
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            assert z[k].dtype != object
