"""The native tensor-bundle engine against TensorFlow as the oracle.

TF-free tests (round trips through our own writer, broken inputs) run
everywhere; tests marked ``tf`` need TensorFlow and skip without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptbridge._source import OBJECT_GRAPH, OBJECT_GRAPH_KEY
from ckptbridge.bundle import BundleReader, BundleWriter, is_bundle
from ckptbridge.errors import CkptBridgeError, CorruptError, FormatError, MismatchError, NotFoundError

from helpers import flip

try:  # the TF-free tests must run where TensorFlow is absent
    import tensorflow as tf
except ImportError:  # pragma: no cover
    tf = None


DTYPES = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
          "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128", "string"]
STRINGS = [b"", b"\x00", b"\xff\xfe", b"abc", b"\x00\x00tail\x00", "é".encode()]


def np_dtype(name: str) -> np.dtype:
    if name == "string":
        return np.dtype(object)
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "string":
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = STRINGS[i % len(STRINGS)] + bytes(rng.integers(0, 256, size=i % 4, dtype=np.uint8))
        return out.reshape(shape)
    if dtype == "bool":
        return (rng.integers(0, 2, size=shape) == 1)
    dt = np_dtype(dtype)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    arr = raw.view(dt).reshape(shape) if dtype.startswith(("int", "uint")) else None
    if arr is None:
        vals = rng.standard_normal(n * (2 if dt.kind == "c" else 1)) * 100
        arr = vals.astype(np.float64).view(np.complex128) if dt.kind == "c" else vals
        arr = np.asarray(arr).astype(dt).reshape(shape)
    return arr


def bytes_list(x: object) -> list[bytes]:
    return [bytes(v) for v in np.asarray(x, dtype=object).reshape(-1)]


def assert_same(ours: np.ndarray, expected: object, dtype: str) -> None:
    assert isinstance(ours, np.ndarray)
    if dtype == "string":
        assert ours.dtype == np.dtype(object)
        assert ours.shape == np.shape(expected) or np.ndim(expected) == 0
        assert bytes_list(ours) == bytes_list(expected)
        return
    exp = np.asarray(expected)
    assert ours.dtype == exp.dtype == np_dtype(dtype)
    assert ours.shape == exp.shape
    assert ours.tobytes() == exp.tobytes()


def write_native(prefix: str, tensors: dict[str, np.ndarray], **kw) -> None:
    w = BundleWriter(prefix, **kw)
    for name, arr in tensors.items():
        w.write(name, arr)
    w.commit()


# --- TensorFlow helpers ---------------------------------------------------------------

def tf_constant(arr: np.ndarray):
    if arr.dtype == object:
        value = arr[()] if arr.ndim == 0 else arr.tolist()
        return tf.constant(value, dtype=tf.string, shape=arr.shape)
    return tf.constant(arr)


def tf_save(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf_constant(tensors[n]) for n in names])


def assert_matches_tf(prefix: str) -> None:
    oracle = tf.train.load_checkpoint(prefix)
    tf_shapes = oracle.get_variable_to_shape_map()
    tf_dtypes = oracle.get_variable_to_dtype_map()
    with BundleReader(prefix) as r:
        specs = r.specs()
        assert set(specs) == set(tf_shapes) - {OBJECT_GRAPH_KEY}
        for name, spec in specs.items():
            assert list(spec.shape) == list(tf_shapes[name]), name
            dtype = "string" if tf_dtypes[name] == tf.string else tf_dtypes[name].name
            dtype = {"half": "float16", "float": "float32", "double": "float64"}.get(dtype, dtype)
            assert spec.dtype == dtype, name
            assert_same(r.read(name), oracle.get_tensor(name), spec.dtype)


# --- TF writes, we read --------------------------------------------------------------

ALL_DTYPE_CASES = [(d, s) for d in DTYPES for s in [(), (0,), (3,), (2, 0, 3), (2, 3)]]


@pytest.fixture(scope="module")
def all_dtypes_ckpt(module_tmp):
    pytest.importorskip("tensorflow")
    prefix = str(module_tmp("dtypes") / "model.ckpt")
    tensors = {f"{d}/{'x'.join(map(str, s)) or 'scalar'}": sample(d, s, i) for i, (d, s) in enumerate(ALL_DTYPE_CASES)}
    tensors["string/edge"] = np.array([b"", b"\x00", b"\xff\xfe"], dtype=object)
    tf_save(prefix, tensors)
    return prefix, tensors


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_every_dtype_bit_exact_against_tf(all_dtypes_ckpt):
    prefix, tensors = all_dtypes_ckpt
    assert is_bundle(prefix)
    assert_matches_tf(prefix)
    with BundleReader(prefix) as r:
        assert list(r.specs()) == sorted(r.specs(), key=lambda n: n.encode())
        for name, arr in tensors.items():
            got = r.read(name)
            assert got.shape == arr.shape
            assert_same(got, arr, r.spec(name).dtype)
        assert r.read("bool/3").dtype == np.bool_
        assert r.read("bfloat16/3").dtype == np.dtype(ml_dtypes.bfloat16)
        assert r.read("float32/scalar").ndim == 0
        assert bytes_list(r.read("string/edge")) == [b"", b"\x00", b"\xff\xfe"]
        assert isinstance(r.checksum("float32/3"), int)


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_numeric_reads_are_readonly_views_that_outlive_close(all_dtypes_ckpt):
    prefix, tensors = all_dtypes_ckpt
    r = BundleReader(prefix)
    view = r.read("float64/2x3")
    copy = r.read("float64/2x3", copy=True)
    assert not view.flags.writeable and copy.flags.writeable
    r.close()
    r.close()
    assert view.tobytes() == tensors["float64/2x3"].tobytes()


@pytest.fixture(scope="module")
def saver_partitioned_ckpt(module_tmp):
    pytest.importorskip("tensorflow")
    prefix = str(module_tmp("saver") / "model.ckpt")
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        part = v1.get_variable("layer/w", shape=[10, 6], dtype=tf.float32,
                               initializer=v1.random_normal_initializer(seed=1),
                               partitioner=v1.fixed_size_partitioner(3))
        v1.get_variable("layer/emb", shape=[7, 2, 3], dtype=tf.float64,
                        initializer=v1.random_uniform_initializer(seed=2),
                        partitioner=v1.fixed_size_partitioner(2, axis=1))
        v1.get_variable("layer/b", shape=[6], initializer=v1.ones_initializer())
        v1.get_variable("step", shape=[], dtype=tf.int64, initializer=v1.zeros_initializer())
        v1.Variable([b"", b"\x00", b"\xff\xfe"], name="vocab")
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V2)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False)
            full = sess.run(tf.concat(list(part), axis=0))
    return prefix, full


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_saver_partitioned_variables_reassembled(saver_partitioned_ckpt):
    prefix, full = saver_partitioned_ckpt
    assert_matches_tf(prefix)
    with BundleReader(prefix) as r:
        assert set(r.specs()) == {"layer/w", "layer/emb", "layer/b", "step", "vocab"}
        assert r.spec("layer/w").shape == (10, 6)
        assert r.read("layer/w").tobytes() == full.tobytes()
        assert r.checksum("layer/w") is None
        assert not any(n.startswith("\x00") for n in r.specs())


@pytest.fixture(scope="module")
def merged_sharded_ckpt(module_tmp):
    pytest.importorskip("tensorflow")
    d = module_tmp("sharded")
    parts = [str(d / f"tmp{i}") for i in range(3)]
    tf.raw_ops.SaveV2(prefix=parts[0], tensor_names=["p", "a"], shape_and_slices=["10 4 0,4:-", ""],
                      tensors=[tf.reshape(tf.range(16.0), (4, 4)), tf.constant([1, 2], tf.int64)])
    tf.raw_ops.SaveV2(prefix=parts[1], tensor_names=["p", "s"], shape_and_slices=["10 4 4,6:0,2", ""],
                      tensors=[tf.fill((6, 2), 7.0), tf.constant([b"x", b""])])
    tf.raw_ops.SaveV2(prefix=parts[2], tensor_names=["p", "z"], shape_and_slices=["10 4 4,6:2,2", ""],
                      tensors=[tf.fill((6, 2), -1.0), tf.zeros((0,), tf.bfloat16)])
    prefix = str(d / "model.ckpt")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix)
    return prefix


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_sharded_and_sliced_across_shards(merged_sharded_ckpt):
    prefix = merged_sharded_ckpt
    assert os.path.exists(prefix + ".data-00002-of-00003")
    assert_matches_tf(prefix)
    with BundleReader(prefix) as r:
        assert r.metadata()["num_shards"] == 3
        p = r.read("p")
        assert p.shape == (10, 4) and p[:4].ravel().tolist() == list(range(16))
        assert (p[4:, :2] == 7).all() and (p[4:, 2:] == -1).all()


@pytest.fixture(scope="module")
def tf2_keras_ckpt(module_tmp):
    tf_keras = pytest.importorskip("tf_keras")
    d = module_tmp("tf2")

    def build():
        model = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,)), tf_keras.layers.Dense(2)])
        opt = tf_keras.optimizers.Adam(0.01)
        return model, opt

    model, opt = build()
    x = tf.random.stateless_normal((8, 3), seed=(1, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(d / "ckpt"))
    return path, build, [v.numpy() for v in model.variables] + [v.numpy() for v in opt.variables()]


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_tf2_object_checkpoint_and_object_graph_round_trip(tf2_keras_ckpt, tmp_path):
    path, build, values = tf2_keras_ckpt
    assert_matches_tf(path)
    with BundleReader(path) as r:
        assert OBJECT_GRAPH_KEY not in r.specs()
        graph = r.extras()[OBJECT_GRAPH]
        assert graph == tf.train.load_checkpoint(path).get_tensor(OBJECT_GRAPH_KEY)
        assert any("optimizer/" in n for n in r.specs())
        copy = str(tmp_path / "copy")
        w = BundleWriter(copy)
        for name in reversed(list(r.specs())):          # any order
            w.write(name, r.read(name))
        w.write_extra(OBJECT_GRAPH, graph)
        w.commit()
    model, opt = build()
    model.build((None, 3))
    opt.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=opt).restore(copy)
    status.assert_existing_objects_matched()
    restored = [v.numpy() for v in model.variables] + [v.numpy() for v in opt.variables()]
    assert len(restored) == len(values)
    for a, b in zip(restored, values):
        assert a.tobytes() == b.tobytes()


# --- we write, TF reads ------------------------------------------------------------

@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
def test_native_write_read_by_saver_restore(tmp_path):
    prefix = str(tmp_path / "native.ckpt")
    values = {"net/conv1/weights": sample("float32", (3, 3, 2, 4), 1), "net/conv1/biases": sample("float32", (4,), 2),
              "net/conv1/biases/ExponentialMovingAverage": sample("float32", (4,), 3),
              "global_step": np.array(42, np.int64), "names": np.array([b"", b"\x00", b"\xff\xfe"], dtype=object),
              "half": sample("bfloat16", (2, 2), 4)}
    write_native(prefix, values, max_shard_bytes=200, _block_size=64)
    assert len([f for f in os.listdir(tmp_path) if ".data-" in f]) > 1
    assert_matches_tf(prefix)
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        # Variables start as zeros (or other strings), so a passing compare proves the restore.
        var_list = {}
        for i, (name, arr) in enumerate(values.items()):
            init = np.full(arr.shape, b"?", dtype=object) if arr.dtype == object else np.zeros(arr.shape, arr.dtype)
            var_list[name] = v1.Variable(tf_constant(init), name=f"v{i}")
        saver = v1.train.Saver(var_list=var_list, write_version=v1.train.SaverDef.V2)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            saver.restore(sess, prefix)
            for name, var in var_list.items():
                got = sess.run(var)
                dtype = "string" if values[name].dtype == object else np_dtype_name(values[name])
                assert_same(np.asarray(got, dtype=object) if dtype == "string" else np.asarray(got), values[name], dtype)


def np_dtype_name(arr: np.ndarray) -> str:
    from ckptbridge.spec import dtype_name
    return dtype_name(arr.dtype)


names_st = st.lists(st.text(alphabet="abz09_./-é", min_size=1, max_size=12).filter(lambda s: not s.startswith("_CHECK")),
                    min_size=1, max_size=6, unique=True)
shapes_st = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def tensor_dicts(draw):
    names = draw(names_st)
    # names that are prefixes of one another: "w" and "w/ExponentialMovingAverage"
    names = names + [n + "/ExponentialMovingAverage" for n in names[: draw(st.integers(0, 2))]]
    names = list(dict.fromkeys(names))
    return {n: sample(draw(st.sampled_from(DTYPES)), draw(shapes_st), i) for i, n in enumerate(names)}


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts(), shard=st.one_of(st.none(), st.integers(1, 300)))
def test_property_native_write_tf_read(tensors, shard):
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "m")
        write_native(prefix, tensors, max_shard_bytes=shard, _block_size=128)
        oracle = tf.train.load_checkpoint(prefix)
        assert set(oracle.get_variable_to_shape_map()) == set(tensors)
        for name, arr in tensors.items():
            assert_same(np.asarray(oracle.get_tensor(name), dtype=object) if arr.dtype == object else np.asarray(oracle.get_tensor(name)),
                        arr, "string" if arr.dtype == object else np_dtype_name(arr))


@pytest.mark.tf
@pytest.mark.skipif(tf is None, reason="needs TensorFlow")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts())
def test_property_tf_write_native_read(tensors):
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "m")
        tf_save(prefix, tensors)
        with BundleReader(prefix) as r:
            assert list(r.specs()) == sorted(tensors, key=lambda n: n.encode())
            for name, arr in tensors.items():
                got = r.read(name)
                assert got.shape == arr.shape
                assert_same(got, arr, r.spec(name).dtype)


# --- TF-free: our own round trips -----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(tensors=tensor_dicts(), shard=st.one_of(st.none(), st.integers(1, 300)), block=st.sampled_from([32, 4096]))
def test_property_native_round_trip(tensors, shard, block):
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "m")
        write_native(prefix, tensors, max_shard_bytes=shard, _block_size=block)
        with BundleReader(prefix) as r:
            assert set(r.specs()) == set(tensors)
            for name, arr in tensors.items():
                assert_same(r.read(name), arr, r.spec(name).dtype)


def test_write_chunks_and_non_contiguous(tmp_path):
    prefix = str(tmp_path / "c")
    big = np.arange(5 * 7 * 3, dtype=np.float64).reshape(5, 7, 3)
    w = BundleWriter(prefix)
    w.write_chunks("chunked", "float64", big.shape, (big[i] for i in range(5)))
    w.write_chunks("raw", "int32", (4,), [np.arange(2, dtype=np.int32).tobytes(), memoryview(np.arange(2, 4, dtype=np.int32))])
    w.write("strided", big[:, ::2, 1])
    w.write("fortran", np.asfortranarray(big))
    w.write("bigendian", big.astype(">f8"))
    with pytest.raises(MismatchError):
        w.write_chunks("short", "float32", (3,), [np.zeros(2, np.float32)])
    with pytest.raises(MismatchError):
        w.write("raw", np.zeros(1))
    with pytest.raises(FormatError):
        w.write("text", np.array(["not bytes"], dtype=object))
    w.write_extra(OBJECT_GRAPH, b"\x0a\x00graph")
    w.commit()
    w.abort()  # after commit: no-op
    with BundleReader(prefix) as r:
        assert set(r.specs()) == {"chunked", "raw", "strided", "fortran", "bigendian"}
        assert r.read("chunked").tobytes() == big.tobytes()
        assert r.read("raw").tolist() == [0, 1, 2, 3]
        assert r.read("strided").tobytes() == np.ascontiguousarray(big[:, ::2, 1]).tobytes()
        assert r.read("fortran").tobytes() == big.tobytes()
        assert r.read("bigendian").dtype == np.dtype("<f8") and r.read("bigendian").tobytes() == big.tobytes()
        assert r.extras() == {OBJECT_GRAPH: b"\x0a\x00graph"}


def test_sharding_and_abort(tmp_path):
    prefix = str(tmp_path / "s")
    write_native(prefix, {f"t{i}": np.full(10, i, np.int64) for i in range(5)}, max_shard_bytes=100)
    shards = sorted(f for f in os.listdir(tmp_path) if ".data-" in f)
    assert shards == [f"s.data-{i:05d}-of-00005" for i in range(5)]
    assert BundleReader(prefix).metadata()["num_shards"] == 5
    w = BundleWriter(str(tmp_path / "gone"), max_shard_bytes=10)
    w.write("a", np.zeros(4))
    w.write("b", np.zeros(4))
    w.abort()
    w.abort()
    assert not any(f.startswith("gone") for f in os.listdir(tmp_path))
    with BundleWriter(str(tmp_path / "gone2")) as w2:
        w2.write("a", np.zeros(4))
        with pytest.raises(ZeroDivisionError):
            with w2:
                raise ZeroDivisionError
    assert not any(f.startswith("gone2") for f in os.listdir(tmp_path))


def test_empty_checkpoint_and_big_endian_bundle(tmp_path):
    write_native(str(tmp_path / "e"), {})
    with BundleReader(str(tmp_path / "e")) as r:
        assert dict(r.specs()) == {} and r.extras() == {}
    # A big-endian bundle (written on such a machine): hand-made from a little-endian one.
    from ckptbridge.bundle import _entries, _table
    values = {"c": np.array([1 + 2j, -3j], np.complex64), "f": np.array([1.5, -2.0], np.float32),
              "h": np.array([1.5], ml_dtypes.bfloat16), "s": np.array([b"ab", b""], dtype=object)}
    prefix = str(tmp_path / "be")
    data = bytearray()
    table = _table.TableBuilder()
    table.add(b"", _entries.encode_header(1, _entries.BIG))
    from ckptbridge.io.wire import crc, mask, put_varint
    for name in sorted(values):
        arr = values[name]
        if arr.dtype == object:
            lengths = b"".join(put_varint(len(v)) for v in arr)
            c = crc(np.array([len(v) for v in arr], ">u4").tobytes())
            lc = mask(c).to_bytes(4, "big")
            blob = lengths + lc + b"".join(arr)
            c = crc(lc + b"".join(arr), c)
        else:
            unit = arr.dtype.itemsize // (2 if arr.dtype.kind == "c" else 1)
            blob = arr.view(f"u{unit}").byteswap().tobytes()
            c = crc(blob)
        table.add(name.encode(), _entries.encode_entry(_entries.ENUM_BY_DTYPE["string" if arr.dtype == object else np_dtype_name(arr)],
                                                       arr.shape, 0, len(data), len(blob), mask(c)))
        data += blob
    (tmp_path / "be.data-00000-of-00001").write_bytes(bytes(data))
    (tmp_path / "be.index").write_bytes(table.finish())
    with BundleReader(prefix) as r:
        assert r.metadata()["endianness"] == "big"
        for name, arr in values.items():
            assert_same(r.read(name), arr, r.spec(name).dtype)


def test_importing_never_imports_tensorflow():
    code = "import sys, ckptbridge.bundle, ckptbridge.bundle.reader, ckptbridge.bundle.writer; sys.exit('tensorflow' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# --- broken inputs -------------------------------------------------------------------

@pytest.fixture
def small_ckpt(tmp_path):
    prefix = str(tmp_path / "m.ckpt")
    write_native(prefix, {"w": np.arange(64, dtype=np.float32), "s": np.array([b"abc", b"\x00"], dtype=object),
                          "b": np.arange(3, dtype=np.int64)})
    return prefix


def test_flipped_data_byte_is_caught_and_named(small_ckpt):
    data = small_ckpt + ".data-00000-of-00001"
    with BundleReader(small_ckpt) as r:
        e = r._entries[b"w"]
    flip(data, e.offset + 100, 0x40)
    with BundleReader(small_ckpt) as r:
        r.read("b")
        with pytest.raises(CorruptError, match=r"'w'.*damaged") as info:
            r.read("w")
        assert "data-00000-of-00001" in str(info.value)
    with BundleReader(small_ckpt, verify=False) as r:
        r.read("w")


def test_flipped_string_byte_is_caught(small_ckpt):
    with BundleReader(small_ckpt) as r:
        e = r._entries[b"s"]
    flip(small_ckpt + ".data-00000-of-00001", e.offset + e.size - 1, 0x40)
    with BundleReader(small_ckpt) as r, pytest.raises(CorruptError, match="'s'"):
        r.read("s")


@pytest.mark.parametrize("keep", [0, 10, 47, -1, -30])
def test_truncated_index(small_ckpt, keep):
    path = small_ckpt + ".index"
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:keep] if keep >= 0 else blob[:keep])
    with pytest.raises(CorruptError, match="damaged"):
        BundleReader(small_ckpt)


def test_truncated_data_and_missing_shard(small_ckpt):
    data = small_ckpt + ".data-00000-of-00001"
    blob = open(data, "rb").read()
    open(data, "wb").write(blob[:-1])
    with pytest.raises(CorruptError, match="outside"):
        BundleReader(small_ckpt)
    os.unlink(data)
    with pytest.raises(CorruptError, match="missing"):
        BundleReader(small_ckpt)


def test_junk_files_and_missing_checkpoint(tmp_path):
    with pytest.raises(NotFoundError):
        BundleReader(str(tmp_path / "nothing"))
    assert not is_bundle(str(tmp_path / "nothing"))
    rng = np.random.default_rng(0)
    for n in (0, 5, 48, 4096):
        (tmp_path / "junk.index").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        assert not is_bundle(str(tmp_path / "junk"))
        with pytest.raises(FormatError):
            BundleReader(str(tmp_path / "junk"))


def test_block_marked_snappy_that_is_not_snappy_is_damage(small_ckpt):
    """Snappy blocks are decoded natively (tests/test_v1_native.py reads a real one); a block whose
    trailer says snappy but whose bytes are not is a clear error, not a crash."""
    from ckptbridge.bundle import _table
    from ckptbridge.io.wire import crc, get_varint, mask
    path = small_ckpt + ".index"
    blob = bytearray(open(path, "rb").read())
    # Mark the index block as snappy-compressed, with a trailer crc that matches.
    footer = len(blob) - _table.FOOTER_SIZE
    _, pos = get_varint(blob, footer, footer + 40)
    _, pos = get_varint(blob, pos, footer + 40)
    idx_off, pos = get_varint(blob, pos, footer + 40)
    idx_size, _ = get_varint(blob, pos, footer + 40)
    blob[idx_off + idx_size] = _table.SNAPPY_COMPRESSION
    blob[idx_off + idx_size + 1:idx_off + idx_size + 5] = mask(crc(bytes([1]), crc(bytes(blob[idx_off:idx_off + idx_size])))).to_bytes(4, "little")
    open(path, "wb").write(bytes(blob))
    with pytest.raises(CorruptError, match="snappy"):
        BundleReader(small_ckpt)


def _read_everything(prefix: str) -> None:
    with BundleReader(prefix) as r:
        for name in r.specs():
            r.read(name)
        r.extras()
        r.metadata()


@pytest.fixture(scope="module", params=["native", pytest.param("tf", marks=pytest.mark.tf)])
def mutation_source(request, module_tmp):
    """The files of a real checkpoint to mutate: partitioned, strings, object graph, several shards."""
    if request.param == "tf":
        prefix, _ = request.getfixturevalue("saver_partitioned_ckpt")
    else:
        prefix = str(module_tmp("mut") / "m")
        w = BundleWriter(prefix, max_shard_bytes=64, _block_size=96)
        w.write("a", np.arange(8, dtype=np.float32))
        w.write("a/ExponentialMovingAverage", np.arange(8, dtype=np.float32))
        w.write("s", np.array([b"", b"\x00", b"\xff\xfe"], dtype=object))
        w.write("z", np.zeros((0, 2), np.int8))
        w.write("c", np.array(1 + 1j, np.complex128))
        w.write_extra(OBJECT_GRAPH, b"graph")
        w.commit()
    d, base = os.path.split(prefix)
    files = {p[len(base):]: open(os.path.join(d, p), "rb").read() for p in os.listdir(d) if p.startswith(base + ".")}
    _read_everything(prefix)
    return files


def _blocks(blob: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the index block and every data block of a table."""
    from ckptbridge.bundle import _table
    footer = len(blob) - _table.FOOTER_SIZE
    _, _, pos = _table._handle(blob, footer, footer + 40)
    off, size, _ = _table._handle(blob, pos, footer + 40)
    out = [(off, size)]
    for _, h in _table._block_entries(blob[off:off + size], "index"):
        o, n, _ = _table._handle(h, 0, len(h))
        out.append((o, n))
    return out


@settings(max_examples=80, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_index_mutations_raise_only_ckptbridge_errors(mutation_source, data):
    """Bit rot anywhere, and also mutations inside blocks with their crcs recomputed (to reach the parsers)."""
    from ckptbridge.io.wire import crc, mask
    with tempfile.TemporaryDirectory() as d:
        for suffix, blob in mutation_source.items():
            if suffix == ".index":
                blob = bytearray(blob)
                fix = data.draw(st.booleans())
                off, size = data.draw(st.sampled_from(_blocks(bytes(blob)))) if fix else (0, len(blob))
                for _ in range(data.draw(st.integers(1, 4))):
                    kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert"] if not fix else ["flip", "set"]))
                    # Without a block to fix, a cut may have shortened the blob: stay inside it.
                    limit = size if fix else len(blob)
                    pos = off + data.draw(st.integers(0, max(0, limit - 1)))
                    if kind == "flip" and blob:
                        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
                    elif kind == "set" and blob:
                        blob[pos] = data.draw(st.integers(0, 255))
                    elif kind == "cut":
                        del blob[pos:pos + data.draw(st.integers(1, 8))]
                    else:
                        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
                if fix:
                    blob[off + size + 1:off + size + 5] = mask(crc(bytes([blob[off + size]]), crc(bytes(blob[off:off + size])))).to_bytes(4, "little")
            with open(os.path.join(d, "m" + suffix), "wb") as f:
                f.write(bytes(blob))
        try:
            _read_everything(os.path.join(d, "m"))
        except CkptBridgeError:
            pass


def test_crafted_index_with_recomputed_crcs_still_safe(tmp_path):
    """Entries whose lengths lie but whose block crcs are valid (a buggy writer, not bit rot)."""
    from ckptbridge.bundle import _entries, _table
    cases = {
        "huge shape": _entries.encode_entry(1, (1 << 40, 1 << 40), 0, 0, 16, 0),
        "past end": _entries.encode_entry(1, (4,), 0, 1 << 60, 16, 0),
        "bad shard": _entries.encode_entry(1, (4,), 7, 0, 16, 0),
        "strings": _entries.encode_entry(7, (1 << 30,), 0, 0, 16, 0),
        "zero-size huge": _entries.encode_entry(1, (0, 1 << 62, 1 << 62), 0, 0, 0, 0),
        "bad dtype": _entries.encode_entry(999, (4,), 0, 0, 16, 0),
    }
    (tmp_path / "x.data-00000-of-00001").write_bytes(b"\x05" * 16)
    for entry in cases.values():
        t = _table.TableBuilder()
        t.add(b"", _entries.encode_header(1))
        t.add(b"t", entry)
        (tmp_path / "x.index").write_bytes(t.finish())
        with pytest.raises(CorruptError):
            _read_everything(str(tmp_path / "x"))


def test_the_wire_helpers_old_place_still_gives_them() -> None:
    """Tools that craft bundles byte by byte import the wire helpers from bundle._wire, their place
    before the tree was split into layers; it names the same functions as io.wire."""
    from ckptbridge.bundle import _wire as old
    from ckptbridge.io import wire

    for name in old.__all__:
        assert getattr(old, name) is getattr(wire, name)
