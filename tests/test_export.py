"""``ckptbridge.export``: checkpoints TensorFlow wrote -> .npz / HDF5, bit-exact against TensorFlow.

Every checkpoint comes from a session fixture in conftest.py; TensorFlow's own
reader (``tf.train.load_checkpoint``) is the oracle for every comparison.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")

import crc32c  # noqa: E402
import h5py  # noqa: E402
import ml_dtypes  # noqa: E402

import ckptbridge  # noqa: E402
from ckptbridge import CkptBridgeError, FormatError, OutputExistsError  # noqa: E402

from helpers import TMP_SUFFIX, flip, offset_of  # noqa: E402

pytestmark = pytest.mark.tf

FORMATS = [".npz", ".h5"]
EMA = "/ExponentialMovingAverage"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def tf_names(prefix: str) -> list[str]:
    import tensorflow as tf

    return sorted(n for n in tf.train.load_checkpoint(prefix).get_variable_to_shape_map() if n != OBJECT_GRAPH_KEY)


def tf_tensor(prefix: str, name: str) -> object:
    import tensorflow as tf

    return tf.train.load_checkpoint(prefix).get_tensor(name)


def leftovers(directory: str) -> list[str]:
    return [p for p in os.listdir(directory) if TMP_SUFFIX in p]


def export_and_compare(ckpt, out, assert_same_as_tf, *, oracle=None, **kw):
    """Export, check the report and the directory, then compare the archive with TensorFlow."""
    report = ckptbridge.export(ckpt, str(out), **kw)
    assert os.path.isfile(out)
    assert leftovers(os.path.dirname(out)) == []
    with ckptbridge.read(str(out)) as r:
        n = assert_same_as_tf(r, oracle or ckpt)
    assert sorted(report.written) == tf_names(oracle or ckpt)
    assert report.dropped == {} and report.ema_swaps == {}
    return n


# --------------------------------------------------------------------------- exactness matrix

SMALL = ["dtypes_ckpt", "sharded_ckpt", "partitioned_ckpt", "tf2_ckpt"]
BIG_V2 = ["resnet_v2", "inception_v2"]
V1_CKPTS = ["resnet_v1", "inception_v1"]


@pytest.mark.parametrize("engine", ["auto", "tf"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", SMALL + BIG_V2)
def test_export_v2_exact(which, fmt, engine, request, tmp_path, assert_same_as_tf):
    ckpt = request.getfixturevalue(which)
    out = tmp_path / f"out{fmt}"
    try:
        assert export_and_compare(ckpt, str(out), assert_same_as_tf, read=ckptbridge.ReadOptions(engine=engine)) > 0
    finally:
        if out.exists():
            out.unlink()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", V1_CKPTS)
def test_export_v1_exact(which, fmt, request, tmp_path, assert_same_as_tf):
    """The 2016 model-zoo layout: one .ckpt file written by Saver(write_version=V1)."""
    ckpt = request.getfixturevalue(which)
    assert os.path.isfile(ckpt) and not os.path.exists(ckpt + ".index")
    out = tmp_path / f"out{fmt}"
    try:
        export_and_compare(ckpt, str(out), assert_same_as_tf)
    finally:
        if out.exists():
            out.unlink()


def test_v1_and_v2_exports_agree(resnet_ckpts, tmp_path):
    """Saved by one session in both layouts, the two exports hold the same tensors."""
    a, b = tmp_path / "v1.npz", tmp_path / "v2.npz"
    inc = [r"^resnet_v1_50/block4/unit_3/"]
    ckptbridge.export(resnet_ckpts["v1"], str(a), ckptbridge.Naming(select=ckptbridge.Select(include=inc)))
    ckptbridge.export(resnet_ckpts["v2"], str(b), ckptbridge.Naming(select=ckptbridge.Select(include=inc)))
    d = ckptbridge.diff(str(a), str(b))
    assert d.identical and d.compared > 10


def test_v1_read_by_native_engine_as_tensorflow_reads_it(resnet_v1, tmp_path):
    """The model zoo's V1 files need no TensorFlow: the native engine's export equals TensorFlow's."""
    a, b = str(tmp_path / "native.npz"), str(tmp_path / "tf.npz")
    ckptbridge.export(resnet_v1, a, read=ckptbridge.ReadOptions(engine="native"))
    ckptbridge.export(resnet_v1, b, read=ckptbridge.ReadOptions(engine="tf"))
    d = ckptbridge.diff(a, b)
    assert d.identical and d.compared > 100


@pytest.mark.parametrize("engine", ["auto", "tf"])
@pytest.mark.parametrize("which", SMALL)
def test_read_checkpoint_matches_tf(which, engine, request, assert_same_as_tf, ckpts):
    """The source side of export: reading the checkpoint directly, with true dtypes and shapes."""
    ckpt = request.getfixturevalue(which)
    expected = ckpts.tf_expected(ckpt)
    with ckptbridge.read(ckpt, engine=engine) as r:
        assert OBJECT_GRAPH_KEY not in r
        specs = r.specs
        for name, (dtype, shape) in expected.items():
            assert specs[name].shape == shape, name
            assert specs[name].dtype == dtype, name
        assert_same_as_tf(r, ckpt)


# --------------------------------------------------------------------------- vgg_16 (one export per format)


@pytest.fixture(scope="module")
def vgg_exports(vgg16_ckpt, module_tmp):
    d = module_tmp("vgg_out")
    outs = {}
    for fmt in FORMATS:
        out = str(d / f"vgg_16{fmt}")
        ckptbridge.export(vgg16_ckpt, out)
        outs[fmt] = out
    yield outs
    for out in outs.values():
        os.unlink(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_vgg16_exact(vgg_exports, vgg16_ckpt, fmt, assert_same_as_tf):
    with ckptbridge.read(vgg_exports[fmt]) as r:
        assert r["vgg_16/fc6/weights"].shape == (7, 7, 512, 4096)
        assert r["vgg_16/fc8/biases"].shape == (10,)
        assert assert_same_as_tf(r, vgg16_ckpt) == 32


def test_vgg16_plain_h5py(vgg_exports, vgg16_ckpt):
    want = tf_tensor(vgg16_ckpt, "vgg_16/conv1/conv1_1/weights")
    with h5py.File(vgg_exports[".h5"], "r") as f:
        ds = f["vgg_16/conv1/conv1_1/weights"]
        assert ds.dtype == np.float32 and ds.shape == (3, 3, 3, 64)
        assert ds[()].tobytes() == want.tobytes()
        assert ds.attrs["ckptbridge_name"] == "vgg_16/conv1/conv1_1/weights"
        assert ds.attrs["ckptbridge_dtype"] == "float32"


def test_vgg16_plain_np_load(vgg_exports, vgg16_ckpt):
    with np.load(vgg_exports[".npz"], allow_pickle=False) as z:
        got = z["vgg_16/fc8/weights"]
        assert got.dtype == np.float32 and got.shape == (1, 1, 4096, 10)
        assert got.tobytes() == tf_tensor(vgg16_ckpt, "vgg_16/fc8/weights").tobytes()


# --------------------------------------------------------------------------- plain readers, dtypes, prefixes


@pytest.fixture(scope="module")
def dtype_exports(dtypes_ckpt, module_tmp):
    d = module_tmp("dtype_out")
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = str(d / f"dtypes{fmt}")
        ckptbridge.export(dtypes_ckpt, outs[fmt])
    return outs


def test_np_load_returns_numeric_tensors_with_their_dtype(dtype_exports, dtypes_ckpt, ckpts):
    """Plain NumPy, no pickle: every numeric tensor (not bfloat16) has its dtype, shape and bytes."""
    expected = ckpts.tf_expected(dtypes_ckpt)
    with np.load(dtype_exports[".npz"], allow_pickle=False) as z:
        files = set(z.files)
        for name, (dtype, shape) in expected.items():
            assert name in files, name
            got = z[name]  # would raise ValueError for a pickled member
            assert got.dtype != object, name
            if dtype in ("bfloat16", "string"):
                continue
            assert got.dtype == np.dtype(dtype), name
            assert got.shape == shape, name
            assert got.tobytes() == np.asarray(tf_tensor(dtypes_ckpt, name)).tobytes(), name
        # bfloat16 is stored as its uint16 bit pattern, readable without ml_dtypes
        bf = z["dtypes/bfloat16"]
        assert bf.dtype == np.uint16
        assert bf.tobytes() == tf_tensor(dtypes_ckpt, "dtypes/bfloat16").view(np.uint16).tobytes()
        # members are exactly the tensors plus ckptbridge's metadata
        assert files - set(expected) == {"__ckptbridge__"}


def test_no_pickled_member_ever(dtype_exports, tf2_ckpt, tmp_path):
    out = tmp_path / "tf2.npz"
    ckptbridge.export(tf2_ckpt, str(out))
    for path in (dtype_exports[".npz"], str(out)):
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    _, _, dtype = read_header(f)
                assert not dtype.hasobject, member


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_and_strings_exact_through_read(dtype_exports, dtypes_ckpt, fmt):
    with ckptbridge.read(dtype_exports[fmt]) as r:
        bf = r["dtypes/bfloat16"]
        assert bf.dtype == np.dtype(ml_dtypes.bfloat16)
        assert bf.view(np.uint16).tobytes() == tf_tensor(dtypes_ckpt, "dtypes/bfloat16").view(np.uint16).tobytes()
        s = r["dtypes/string"]
        assert s.dtype == object and s.shape == (3,)
        assert list(s) == [b"", b"\x00a\x00", b"\xff\xfe non-utf8"]
        assert all(type(x) is bytes for x in s)
        s0 = r["scalar/string"]
        assert s0.shape == () and s0[()] == b"\xff\x00scalar"
        assert r["empty/string"].shape == (0,) and r["empty/string"].dtype == object
        assert r["scalar/bfloat16"].shape == () and r["scalar/bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_scalars_stay_0d_and_zero_size_survives(dtype_exports, fmt):
    with ckptbridge.read(dtype_exports[fmt]) as r:
        for name in ("scalar/float32", "scalar/int64", "scalar/bool", "scalar/uint8", "global_step"):
            assert isinstance(r[name], np.ndarray) and r[name].shape == (), name
            assert r.specs[name].shape == (), name
        assert r["scalar/int64"][()] == -(2**62)
        assert r["empty/int32_3x0x2"].shape == (3, 0, 2) and r["empty/int32_3x0x2"].dtype == np.int32
        assert r["empty/float32"].shape == (0,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefix_names_both_survive(dtype_exports, dtypes_ckpt, fmt):
    """"w" is a dataset/member and also the prefix of "w/ExponentialMovingAverage"."""
    with ckptbridge.read(dtype_exports[fmt]) as r:
        for name in ("w", "w/ExponentialMovingAverage", "w/Momentum"):
            assert name in r
            assert r[name].tobytes() == tf_tensor(dtypes_ckpt, name).tobytes(), name
        assert r["w"].tobytes() != r["w/ExponentialMovingAverage"].tobytes()


def test_prefix_names_in_plain_h5py(dtype_exports, dtypes_ckpt):
    """In plain h5py the shorter name lives under its group, labelled with its true name."""
    with h5py.File(dtype_exports[".h5"], "r") as f:
        ema = f["w/ExponentialMovingAverage"]
        assert ema.attrs["ckptbridge_name"] == "w/ExponentialMovingAverage"
        by_name = {}
        f.visititems(lambda p, o: by_name.__setitem__(o.attrs.get("ckptbridge_name"), p) if isinstance(o, h5py.Dataset) else None)
        assert f[by_name["w"]][()].tobytes() == tf_tensor(dtypes_ckpt, "w").tobytes()


# --------------------------------------------------------------------------- CHECKPOINT given in every form


def _check_form(path, want_prefix, tmp_path, assert_same_as_tf, **kw):
    out = tmp_path / "o.npz"
    ckptbridge.export(path, str(out), ckptbridge.Naming(select=ckptbridge.Select(**kw)))
    with ckptbridge.read(str(out)) as r:
        if kw.get("include"):
            names = [n for n in tf_names(want_prefix) if re.search(kw["include"][0], n)]
            assert names
            assert_same_as_tf(r, want_prefix, names=names)
        else:
            assert_same_as_tf(r, want_prefix)


@pytest.mark.parametrize("form", ["prefix", "index", "data0", "data2", "directory"])
def test_checkpoint_forms_sharded(sharded_ckpt, form, tmp_path, assert_same_as_tf):
    shards = sorted(glob.glob(sharded_ckpt + ".data-*"))
    assert [os.path.basename(s)[-19:] for s in shards] == ["data-00000-of-00003", "data-00001-of-00003", "data-00002-of-00003"]
    path = {
        "prefix": sharded_ckpt,
        "index": sharded_ckpt + ".index",
        "data0": shards[0],
        "data2": shards[2],
        "directory": os.path.dirname(sharded_ckpt),
    }[form]
    _check_form(path, sharded_ckpt, tmp_path, assert_same_as_tf)


@pytest.mark.parametrize("form", ["v2_prefix", "v2_index", "v2_data", "v2_dir", "v1_file", "v1_dir"])
def test_checkpoint_forms_trained(resnet_ckpts, form, tmp_path, assert_same_as_tf):
    v2 = resnet_ckpts["v2"]
    path = {
        "v2_prefix": v2,
        "v2_index": v2 + ".index",
        "v2_data": v2 + ".data-00000-of-00001",
        "v2_dir": resnet_ckpts["v2_dir"],
        "v1_file": resnet_ckpts["v1"],
        "v1_dir": resnet_ckpts["v1_dir"],
    }[form]
    want = resnet_ckpts["v1"] if form.startswith("v1") else v2
    _check_form(path, want, tmp_path, assert_same_as_tf, include=[r"^resnet_v1_50/conv1/"])


def test_tf2_directory_form(tf2_ckpt, tmp_path, assert_same_as_tf):
    _check_form(os.path.dirname(tf2_ckpt), tf2_ckpt, tmp_path, assert_same_as_tf)


def test_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(ckptbridge.NotFoundError):
        ckptbridge.export(str(tmp_path / "nope.ckpt"), str(tmp_path / "o.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckptbridge.NotFoundError):
        ckptbridge.export(str(tmp_path / "empty"), str(tmp_path / "o.npz"))
    assert not (tmp_path / "o.npz").exists()


# --------------------------------------------------------------------------- name policies


def test_include_exclude(resnet_v2, tmp_path, assert_same_as_tf):
    names = tf_names(resnet_v2)
    inc = [r"^resnet_v1_50/block1/", r"^resnet_v1_50/logits/"]
    exc = [r"/Momentum$", EMA]
    out = tmp_path / "f.h5"
    report = ckptbridge.export(resnet_v2, str(out), ckptbridge.Naming(select=ckptbridge.Select(include=inc, exclude=exc)))
    want = [n for n in names if any(re.search(p, n) for p in inc) and not any(re.search(p, n) for p in exc)]
    assert len(want) > 20
    assert sorted(report.written) == want
    assert set(report.dropped) == set(names) - set(want)
    assert report.dropped["global_step"] == "not matched by any include pattern"
    assert report.dropped["resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/weights/Momentum"] == "matched by an exclude pattern"
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, resnet_v2, names=want)
        assert set(r.metadata()["dropped"]) == set(report.dropped)


def test_filtering_everything_is_an_error(sharded_ckpt, tmp_path):
    with pytest.raises(CkptBridgeError, match="filtered out"):
        ckptbridge.export(sharded_ckpt, str(tmp_path / "o.npz"), ckptbridge.Naming(select=ckptbridge.Select(include=["^no-such-name$"])))
    with pytest.raises(FormatError, match=r"^exclude '\(unclosed'"):
        ckptbridge.export(sharded_ckpt, str(tmp_path / "o.npz"), ckptbridge.Naming(select=ckptbridge.Select(exclude=["(unclosed"])))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_only_drops_momentum_and_global_step(resnet_v2, fmt, tmp_path, assert_same_as_tf):
    names = tf_names(resnet_v2)
    slots = {n for n in names if n.endswith("/Momentum")} | {"global_step"}
    assert len(slots) > 100
    out = tmp_path / f"w{fmt}"
    report = ckptbridge.export(resnet_v2, str(out), ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    assert set(report.dropped) == slots
    assert all(why == "optimizer state (weights only)" for why in report.dropped.values())
    assert report.ema_swaps == {}
    kept = sorted(set(names) - slots)
    assert any(n.endswith(EMA) for n in kept), "EMA shadows are weights, not optimizer state"
    assert any(n.endswith("moving_variance") for n in kept)
    assert sorted(report.written) == kept
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, resnet_v2, names=kept)
        assert set(r.metadata()["dropped"]) == slots


def test_weights_only_tf2_drops_optimizer_and_save_counter(tf2_ckpt, tmp_path, assert_same_as_tf):
    names = tf_names(tf2_ckpt)
    dropped = {n for n in names if n.startswith("optimizer/") or n.startswith("save_counter/")}
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in dropped and len(dropped) >= 6
    out = tmp_path / "w.npz"
    report = ckptbridge.export(tf2_ckpt, str(out), ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    assert set(report.dropped) == dropped
    kept = sorted(set(names) - dropped)
    assert kept == ["model/b/.ATTRIBUTES/VARIABLE_VALUE", "model/scale/.ATTRIBUTES/VARIABLE_VALUE", "model/w/.ATTRIBUTES/VARIABLE_VALUE"]
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, tf2_ckpt, names=kept)


@pytest.mark.parametrize("fmt", FORMATS)
def test_use_ema_swaps_in_the_shadow_values(resnet_v2, fmt, tmp_path, assert_same_as_tf):
    names = tf_names(resnet_v2)
    present = set(names)
    shadowed = sorted(n for n in names if n + EMA in present)
    assert len(shadowed) > 100
    out = tmp_path / f"ema{fmt}"
    report = ckptbridge.export(resnet_v2, str(out), ckptbridge.Naming(select=ckptbridge.Select(weights_only=True, use_ema=True)))
    assert report.ema_swaps == {n: n + EMA for n in shadowed}
    kept = sorted(n for n in names if not n.endswith(EMA) and not n.endswith("/Momentum") and n != "global_step")
    assert sorted(report.written) == kept
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, resnet_v2, names=kept, rename=report.ema_swaps)
        w = "resnet_v1_50/conv1/weights"
        assert r[w].tobytes() == tf_tensor(resnet_v2, w + EMA).tobytes()
        assert r[w].tobytes() != tf_tensor(resnet_v2, w).tobytes()
        assert r.metadata()["ema_swaps"] == report.ema_swaps


def test_use_ema_on_prefix_names(dtypes_ckpt, tmp_path):
    out = tmp_path / "ema.h5"
    report = ckptbridge.export(dtypes_ckpt, str(out), ckptbridge.Naming(select=ckptbridge.Select(use_ema=True)))
    assert report.ema_swaps == {"w": "w" + EMA}
    assert "w" + EMA in report.dropped
    with ckptbridge.read(str(out)) as r:
        assert "w" + EMA not in r
        assert r["w"].tobytes() == tf_tensor(dtypes_ckpt, "w" + EMA).tobytes()


# --------------------------------------------------------------------------- --compress


def test_compress_npz(resnet_v2, tmp_path, assert_same_as_tf):
    inc = [r"^resnet_v1_50/block2/"]
    plain, packed = tmp_path / "p.npz", tmp_path / "c.npz"
    ckptbridge.export(resnet_v2, str(plain), ckptbridge.Naming(select=ckptbridge.Select(include=inc)))
    ckptbridge.export(resnet_v2, str(packed), ckptbridge.Naming(select=ckptbridge.Select(include=inc)), compress=True)
    with zipfile.ZipFile(packed) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with zipfile.ZipFile(plain) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert packed.stat().st_size < plain.stat().st_size
    names = [n for n in tf_names(resnet_v2) if n.startswith("resnet_v1_50/block2/")]
    with ckptbridge.read(str(packed)) as r:
        assert_same_as_tf(r, resnet_v2, names=names)
    with np.load(packed, allow_pickle=False) as z:
        n = "resnet_v1_50/block2/unit_1/bottleneck_v1/conv2/weights"
        assert z[n].tobytes() == tf_tensor(resnet_v2, n).tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_every_dtype(dtypes_ckpt, fmt, tmp_path, assert_same_as_tf):
    out = tmp_path / f"c{fmt}"
    ckptbridge.export(dtypes_ckpt, str(out), compress=True)
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, dtypes_ckpt)
    if fmt == ".h5":
        with h5py.File(out, "r") as f:
            assert f["dtypes/float64"].compression == "gzip"
            assert f["dtypes/complex64"].compression == "gzip"


# --------------------------------------------------------------------------- atomic output


@pytest.mark.parametrize("fmt", FORMATS)
def test_existing_output_refused_and_untouched(sharded_ckpt, fmt, tmp_path):
    out = tmp_path / f"o{fmt}"
    out.write_bytes(b"precious")
    before = out.stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="pass force=True to overwrite"):
        ckptbridge.export(sharded_ckpt, str(out))
    assert out.read_bytes() == b"precious" and out.stat().st_mtime_ns == before
    assert leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_force_replaces(sharded_ckpt, fmt, tmp_path, assert_same_as_tf):
    out = tmp_path / f"o{fmt}"
    out.write_bytes(b"old")
    ckptbridge.export(sharded_ckpt, str(out), force=True)
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, sharded_ckpt)
    assert sorted(os.listdir(tmp_path)) == [f"o{fmt}"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_failure_mid_export_leaves_nothing(sharded_ckpt, fmt, tmp_path, monkeypatch):
    """A failure after some tensors were written removes the temporary file; an old output survives."""
    from ckptbridge.formats import hdf5, npz

    sink = npz.NpzSink if fmt == ".npz" else hdf5.Hdf5Sink
    calls = []

    def failing(real):
        def write(self, name, *args, **kw):
            calls.append(name)
            if len(calls) == 3:
                raise OSError(28, "No space left on device (simulated)")
            return real(self, name, *args, **kw)

        return write

    for method in ("write", "write_blocks"):  # whole tensors, and streamed ones where the sink streams
        if hasattr(sink, method):
            monkeypatch.setattr(sink, method, failing(getattr(sink, method)))
    out = tmp_path / f"o{fmt}"
    with pytest.raises(OSError, match="simulated"):
        ckptbridge.export(sharded_ckpt, str(out))
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"old")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        ckptbridge.export(sharded_ckpt, str(out), force=True)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == [f"o{fmt}"]


@pytest.mark.parametrize("bad", ["out.txt", "out.ckpt", "out", "out.npy", "out.NPZ.bak"])
def test_unknown_suffix_names_the_accepted_ones(sharded_ckpt, bad, tmp_path):
    with pytest.raises(FormatError) as e:
        ckptbridge.export(sharded_ckpt, str(tmp_path / bad))
    for suffix in (".npz", ".h5", ".hdf5"):
        assert suffix in str(e.value)
    assert bad in str(e.value)
    assert os.listdir(tmp_path) == []


def test_hdf5_suffix_and_uppercase(sharded_ckpt, tmp_path, assert_same_as_tf):
    for name in ("o.hdf5", "o.H5", "o.NPZ"):
        ckptbridge.export(sharded_ckpt, str(tmp_path / name))
        with ckptbridge.read(str(tmp_path / name)) as r:
            assert_same_as_tf(r, sharded_ckpt)


# --------------------------------------------------------------------------- provenance and checksums


def _independent_crc(value: np.ndarray, dtype: str) -> int:
    """crc32c of the stored form, computed from TensorFlow's value, not ckptbridge's code."""
    if dtype == "string":
        items = [bytes(b) for b in np.asarray(value, dtype=object).reshape(-1)]
        blob = np.array([len(b) for b in items], dtype="<u8").tobytes() + b"".join(items)
        return crc32c.crc32c(blob)
    return crc32c.crc32c(np.ascontiguousarray(value).tobytes())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["dtypes_ckpt", "tf2_ckpt"])
def test_provenance_and_checksums(which, fmt, request, tmp_path):
    import tensorflow as tf

    ckpt = request.getfixturevalue(which)
    out = tmp_path / f"p{fmt}"
    ckptbridge.export(ckpt, str(out))
    with ckptbridge.read(str(out)) as r:
        doc = r.metadata()
    assert doc["ckptbridge_version"] == ckptbridge.__version__
    assert doc["tensorflow_version"] == tf.__version__
    assert os.path.abspath(doc["source"]) == os.path.abspath(ckpt)
    records = doc["tensors"]
    reader = tf.train.load_checkpoint(ckpt)
    dtypes = reader.get_variable_to_dtype_map()
    assert set(records) == set(tf_names(ckpt))
    for name, rec in records.items():
        dtype = "string" if dtypes[name] == tf.string else dtypes[name].name
        assert rec["dtype"] == dtype, name
        value = reader.get_tensor(name)
        if dtype == "string" and isinstance(value, bytes):
            value = np.array([value], dtype=object)
        assert rec["crc32c"] == _independent_crc(np.asarray(value), dtype), name
    # and the records match the bytes actually stored in the archive
    if fmt == ".npz":
        with np.load(out, allow_pickle=False) as z:
            for name, rec in records.items():
                assert crc32c.crc32c(np.ascontiguousarray(z[name]).tobytes()) == rec["crc32c"], name
    else:
        with h5py.File(out, "r") as f:
            for name, rec in records.items():
                assert crc32c.crc32c(np.ascontiguousarray(f[rec["path"]][()]).tobytes()) == rec["crc32c"], name


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_archive_is_caught_by_its_checksums(resnet_v2, fmt, tmp_path):
    name = "resnet_v1_50/conv1/weights"  # 37 KB: larger than zipfile's read-ahead, so only our crc32c sees it
    out = tmp_path / f"d{fmt}"
    ckptbridge.export(resnet_v2, str(out), ckptbridge.Naming(select=ckptbridge.Select(include=["^resnet_v1_50/conv1/"])))
    assert ckptbridge.verify(str(out)).ok
    value = tf_tensor(resnet_v2, name).tobytes()
    flip(out, offset_of(out, value) + len(value) // 2, 0x40)
    v = ckptbridge.verify(str(out))
    assert not v.ok and v.bad == name
    with ckptbridge.read(str(out)) as r, pytest.raises(ckptbridge.CorruptError, match=re.escape(name)):
        r[name]


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_small_tensor_is_caught(sharded_ckpt, fmt, tmp_path):
    """A small damaged tensor may already be noticed when the archive opens; either way it is named."""
    out = tmp_path / f"d{fmt}"
    ckptbridge.export(sharded_ckpt, str(out))
    value = tf_tensor(sharded_ckpt, "dev1/kernel").tobytes()
    flip(out, offset_of(out, value) + len(value) // 2, 0x40)
    try:
        v = ckptbridge.verify(str(out))
    except ckptbridge.CorruptError as e:
        assert "dev1/kernel" in str(e)
    else:
        assert not v.ok and v.bad == "dev1/kernel"


# --------------------------------------------------------------------------- TF2 object graph


@pytest.mark.parametrize("engine", ["auto", "tf"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tf2_object_graph_carried_not_a_tensor(tf2_ckpt, fmt, engine, tmp_path):
    graph = tf_tensor(tf2_ckpt, OBJECT_GRAPH_KEY)
    assert isinstance(graph, bytes) and len(graph) > 50
    out = tmp_path / f"g{fmt}"
    report = ckptbridge.export(tf2_ckpt, str(out), read=ckptbridge.ReadOptions(engine=engine))
    assert OBJECT_GRAPH_KEY not in report.written
    with ckptbridge.read(str(out)) as r:
        assert OBJECT_GRAPH_KEY not in r and OBJECT_GRAPH_KEY not in r.specs
        assert OBJECT_GRAPH_KEY not in r.metadata()["tensors"]
    # stored byte-exact, as raw bytes (no pickle), where plain tools can find it
    if fmt == ".npz":
        with np.load(out, allow_pickle=False) as z:
            assert z["__ckptbridge_object_graph__"].tobytes() == graph
    else:
        with h5py.File(out, "r") as f:
            assert f[".ckptbridge/object_graph"][()].tobytes() == graph


def test_tf2_object_graph_public_accessor(tf2_ckpt, tmp_path):
    out = tmp_path / "g.npz"
    ckptbridge.export(tf2_ckpt, str(out))
    with ckptbridge.read(str(out)) as r:
        assert r.extras()["object_graph"] == tf_tensor(tf2_ckpt, OBJECT_GRAPH_KEY)
