"""The native V1 checkpoint reader (ckptbridge/bundle/v1.py) against TensorFlow as the oracle.

TensorFlow wrote the small V1 checkpoints under tests/data/v1/ (``build_fixtures``
below: every dtype the V1 writer accepts, scalars, zero-size tensors, explicit
slices, partitioned variables saved sharded, a small tf-slim net after a
Momentum step with EMA shadows), and tests/data/v1/expected.json records what
TensorFlow reads from them: per tensor its dtype, shape and the SHA-256 of its
bytes.  The TensorFlow-free tests hold the native reader to those records; the
tests marked ``tf`` check the records against TensorFlow and the native reader
against fixtures written afresh.  Regenerate both (TensorFlow venv) with

    python tests/test_v1_native.py --regenerate

Which dtypes TensorFlow's V1 writer (SaveSlices, what ``Saver(write_version=V1)``
runs) accepts was found by trying each (``test_v1_writer_dtypes_are_what_we_say``):
float16/32/64, complex64/128, int8/16/32/64, uint8/16, bool, string, qint8,
quint8, qint32.  bfloat16, qint16, quint16, the float8/int4 families are refused ("not yet
supported"), uint32/uint64 too ("serialization not implemented").
``tf.train.load_checkpoint`` cannot read back float16, uint16, complex128 or the
quantized ones from a V1 file ("Data type not supported"); for those the oracle is
the V1 ``Restore`` op, which ``Saver.restore`` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge.bundle import BundleReader, BundleWriter, V1Reader, _table
from ckptbridge.errors import CorruptError, FormatError, NotFoundError
from ckptbridge.io.wire import crc, mask, put_varint

from helpers import cli, error_line, flip

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "v1")
EXPECTED = os.path.join(DATA, "expected.json")
#: fixture name -> the path a user passes (a file, or a sharded checkpoint's prefix)
FIXTURES = {"dtypes": "dtypes.ckpt", "partitioned": "partitioned.ckpt", "tiny_net": "tiny_net.ckpt"}

V1_DTYPES = ("float16", "float32", "float64", "complex64", "complex128", "int8", "int16", "int32", "int64",
             "uint8", "uint16", "bool", "string", "qint8", "quint8", "qint32")
NOT_V1 = ("bfloat16", "qint16", "quint16", "uint32", "uint64", "float8_e4m3fn")
QUANTIZED_BASE = {"qint8": "int8", "quint8": "uint8", "qint32": "int32", "qint16": "int16", "quint16": "uint16"}


# --------------------------------------------------------------------------- records


def digest(arr: np.ndarray) -> str:
    """SHA-256 of a tensor's bytes in the exchange form (strings: each as an 8-byte length then its bytes)."""
    h = hashlib.sha256()
    if arr.dtype == object:
        for x in arr.reshape(-1):
            h.update(len(x).to_bytes(8, "little") + bytes(x))
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def record(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(arr.shape), "sha256": digest(arr)}


def expected() -> dict[str, dict[str, dict[str, Any]]]:
    with open(EXPECTED) as f:
        return json.load(f)  # type: ignore[no-any-return]


def native_records(path: str) -> dict[str, dict[str, Any]]:
    with V1Reader(path) as r:
        return {n: record(r.read(n), s.dtype) for n, s in r.specs().items()}


# --------------------------------------------------------------------------- TensorFlow's side


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ckptbridge.tf.compat import import_tensorflow

    return import_tensorflow()


def dtype_values() -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, values as the integers/floats/bytes TensorFlow is given)."""
    rng = np.random.default_rng(1)
    floats = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-3])
    out: dict[str, tuple[str, np.ndarray]] = {}
    for d in V1_DTYPES:
        if d == "string":
            v = np.array([[b"", b"\x00a\x00", b"\xff\xfe non-utf8"], [b"x" * 300, b"\xc3\xa9", b"\x00"]], dtype=object)
        elif d == "bool":
            v = np.array([[True, False, True], [False, False, True]])
        elif d.startswith("complex"):
            v = (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(d).reshape(2, 3)
            v[0, 0] = complex(np.nan, -0.0)
        elif d.startswith("float"):
            v = floats[:6].astype(d).reshape(2, 3)
        else:
            base = QUANTIZED_BASE.get(d, d)
            info = np.iinfo(base)
            v = np.array([info.min, info.max, 0, 1, info.max // 3, -1 if info.min else 7], dtype=base).reshape(2, 3)
        out[f"{d}/2x3"] = (d, v)
        out[f"{d}/scalar"] = (d, v.reshape(-1)[1:2].reshape(()))
        out[f"{d}/empty"] = (d, v.reshape(-1)[:0].reshape(0, 3))
    return out


def _tf_tensor(tf: Any, dtype: str, v: np.ndarray) -> Any:
    if dtype == "string":
        return tf.constant(v.tolist() if v.ndim else v[()], dtype=tf.string, shape=v.shape) if v.size else tf.zeros(v.shape, tf.string)
    if dtype in QUANTIZED_BASE:
        return tf.bitcast(tf.constant(v), getattr(tf, dtype)) if v.size else tf.zeros(v.shape, getattr(tf, dtype))
    return tf.constant(v)


def build_dtypes(tf: Any, path: str) -> None:
    """Every V1 dtype (2x3, scalar, 0x3) and a tensor saved as three explicit slices, by the SaveSlices kernel."""
    names, specs, tensors = [], [], []
    for name, (dtype, v) in sorted(dtype_values().items()):
        names.append(name)
        specs.append("")
        tensors.append(_tf_tensor(tf, dtype, v))
    full = np.arange(24, dtype=np.float32).reshape(6, 4) - 7.5
    for spec, part in (("6 4 0,2:-", full[:2]), ("6 4 2,4:0,3", full[2:, :3]), ("6 4 2,4:3,1", full[2:, 3:])):
        names.append("sliced/w")
        specs.append(spec)
        tensors.append(tf.constant(part))
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveSlices(filename=path, tensor_names=names, shapes_and_slices=specs, data=tensors)


def _session_config(tf: Any, cpus: int = 1) -> Any:
    config = tf.compat.v1.ConfigProto(device_count={"CPU": cpus})
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def build_partitioned(tf: Any, prefix: str) -> str:
    """Partitioned variables on two devices (and one unplaced), saved by Saver(V1, sharded=True): PREFIX-0000{0,1,2}-of-00003."""
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        for i in range(2):
            with tf.device(f"/cpu:{i}"):
                v1.get_variable(f"dev{i}/embedding", shape=[11, 5], partitioner=v1.fixed_size_partitioner(3),
                                initializer=v1.random_normal_initializer(seed=7 + i))
                v1.get_variable(f"dev{i}/emb", shape=[7, 2, 3], dtype=tf.float64, partitioner=v1.fixed_size_partitioner(2, axis=1),
                                initializer=v1.random_uniform_initializer(seed=9 + i))
                v1.get_variable(f"dev{i}/bias", shape=[5], initializer=v1.random_normal_initializer(seed=11 + i))
        v1.Variable([b"", b"\x00", b"\xff\xfe"], name="vocab")
        saver = v1.train.Saver(sharded=True, write_version=v1.train.SaverDef.V1)
        with v1.Session(config=_session_config(tf, 2)) as sess:
            sess.run(v1.global_variables_initializer())
            return str(saver.save(sess, prefix, write_meta_graph=False, write_state=False))


def build_tiny_net(tf: Any, path: str) -> None:
    """A small tf-slim net (conv + batch norm, conv, fully connected logits) after one Momentum step with
    EMA shadows, saved by Saver(V1): the model zoo's layout at a few KB."""
    from ckptbridge.tf.compat import import_slim

    slim = import_slim()
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        v1.set_random_seed(5)
        images = v1.placeholder(tf.float32, [2, 4, 4, 3])
        with v1.variable_scope("tiny_net"), slim.arg_scope([slim.conv2d], normalizer_fn=slim.batch_norm):
            net = slim.conv2d(images, 4, [3, 3], scope="conv1")
            net = slim.conv2d(net, 4, [3, 3], normalizer_fn=None, scope="conv2")
            slim.fully_connected(slim.flatten(net), 5, activation_fn=None, scope="logits")
        step = v1.train.get_or_create_global_step()
        trainable = v1.trainable_variables()
        grads = [v1.random_normal(v.shape, seed=i) for i, v in enumerate(trainable)]
        train = v1.train.MomentumOptimizer(0.01, 0.9).apply_gradients(list(zip(grads, trainable)), global_step=step)
        with tf.control_dependencies([train]):
            train = v1.train.ExponentialMovingAverage(0.9).apply(trainable)
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V1)
        with v1.Session(config=_session_config(tf)) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(train)
            saver.save(sess, path, write_meta_graph=False, write_state=False)


def build_fixtures(directory: str) -> dict[str, str]:
    """Write the three V1 fixtures with TensorFlow into ``directory``; name -> the path to read."""
    tf = _tf()
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, rel) for name, rel in FIXTURES.items()}
    build_dtypes(tf, paths["dtypes"])
    build_partitioned(tf, paths["partitioned"])
    build_tiny_net(tf, paths["tiny_net"])
    return paths


def tf_records(path: str) -> dict[str, dict[str, Any]]:
    """What TensorFlow reads from a V1 checkpoint: ``load_checkpoint``, or the V1 Restore op where it cannot."""
    tf = _tf()
    from ckptbridge.tf.engine import tf_dtype_name

    pattern = path if os.path.isfile(path) else path + "-?????-of-?????"
    reader = tf.train.load_checkpoint(pattern)
    out = {}
    for name, dt in reader.get_variable_to_dtype_map().items():
        dtype = tf_dtype_name(dt)
        try:
            value = reader.get_tensor(name)
        except Exception:  # "Data type not supported" by the checkpoint reader: Saver.restore's op reads it
            value = tf.raw_ops.Restore(file_pattern=pattern, tensor_name=name, dt=dt).numpy()
        arr = np.asarray(value, dtype=object) if dtype == "string" else np.asarray(value)
        if dtype in QUANTIZED_BASE:
            arr = arr.view(QUANTIZED_BASE[dtype])
        out[name] = record(arr, dtype)
    return out


def regenerate() -> None:
    paths = build_fixtures(DATA)
    rec = {name: tf_records(path) for name, path in paths.items()}
    with open(EXPECTED, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")


def fixture_path(name: str, directory: str = DATA) -> str:
    return os.path.join(directory, FIXTURES[name])


def compare(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


# --------------------------------------------------------------------------- snappy, for the tests


def snappy_compress(data: bytes, *, wide: bool = False) -> bytes:
    """A small greedy snappy compressor (literals and copies; ``wide`` uses 4-byte copy offsets)."""
    out = bytearray(put_varint(len(data)))
    n = len(data)

    def literal(a: int, b: int) -> None:
        while a < b:
            m = min(b - a, 65536)
            size = m - 1
            if size < 60:
                out.append(size << 2)
            elif size < 256:
                out.extend(bytes([60 << 2, size]))
            else:
                out.extend(bytes([61 << 2]) + size.to_bytes(2, "little"))
            out.extend(data[a:a + m])
            a += m

    seen: dict[bytes, int] = {}
    i = lit = 0
    while i + 4 <= n:
        j = seen.get(data[i:i + 4])
        seen[data[i:i + 4]] = i
        if j is None or i - j > 0xFFFF:
            i += 1
            continue
        literal(lit, i)
        length = 4
        while i + length < n and data[j + length] == data[i + length] and length < 64:
            length += 1
        off = i - j
        if wide:
            out.extend(bytes([3 | ((length - 1) << 2)]) + off.to_bytes(4, "little"))
        elif length <= 11 and off < 2048:
            out.extend(bytes([1 | ((length - 4) << 2) | ((off >> 8) << 5), off & 0xFF]))
        else:
            out.extend(bytes([2 | ((length - 1) << 2)]) + off.to_bytes(2, "little"))
        i += length
        lit = i
    literal(lit, n)
    return bytes(out)


def snappy_table(data: bytes, *, block_size: int = 512, wide: bool = False) -> bytes:
    """The same entries as the table ``data``, rewritten with every block snappy-compressed."""
    entries = list(_table.read_table(data))
    out = bytearray()

    def write(contents: bytes) -> bytes:
        packed = snappy_compress(contents, wide=wide)
        handle = put_varint(len(out)) + put_varint(len(packed))
        out.extend(packed + bytes([_table.SNAPPY_COMPRESSION]))
        out.extend(mask(crc(bytes([_table.SNAPPY_COMPRESSION]), crc(packed))).to_bytes(4, "little"))
        return handle

    index, pending, size = [], [], 0
    for key, value in entries + [(None, None)]:
        if key is not None:
            pending.append((key, bytes(value)))
            size += len(key) + len(value)
        if pending and (key is None or size >= block_size):
            index.append((pending[-1][0], write(_table.TableBuilder._encode_block(pending, 16))))
            pending, size = [], 0
    meta = write(_table.TableBuilder._encode_block([], 1))
    footer = meta + write(_table.TableBuilder._encode_block(index, 1))
    return bytes(out + footer + b"\0" * (_table.HANDLES_SIZE - len(footer)) + _table.MAGIC.to_bytes(8, "little"))


def craft_v1(path: str, tensors: list[bytes], slices: dict[bytes, bytes], *, versions: bytes = b"") -> None:
    """A V1 file from raw SavedSliceMeta messages and key -> SavedTensorSlices values, crcs all valid."""
    from ckptbridge.io.wire import field_bytes

    meta = b"".join(field_bytes(1, t) for t in tensors) + (field_bytes(2, versions) if versions else b"")
    t = _table.TableBuilder()
    t.add(b"", field_bytes(1, meta))
    for key in sorted(slices):
        t.add(key, slices[key])
    with open(path, "wb") as f:
        f.write(t.finish())


# --------------------------------------------------------------------------- without TensorFlow


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_native_reads_what_tensorflow_read(name: str) -> None:
    """Bit-exact (dtype, shape, bytes) against TensorFlow's recorded reads, in a venv without TensorFlow."""
    compare(native_records(fixture_path(name)), expected()[name])


def test_every_v1_dtype_scalars_empties_and_explicit_slices() -> None:
    with V1Reader(fixture_path("dtypes")) as r:
        assert {s.dtype for s in r.specs().values()} == set(V1_DTYPES)
        assert r.read("float32/scalar").shape == () and r.read("int8/empty").shape == (0, 3)
        assert r.read("qint8/2x3").dtype == np.dtype([("qint8", "i1")])
        assert [bytes(x) for x in r.read("string/2x3")[0]] == [b"", b"\x00a\x00", b"\xff\xfe non-utf8"]
        w = r.read("sliced/w")
        assert w.tolist() == (np.arange(24, dtype=np.float32).reshape(6, 4) - 7.5).tolist()
        assert r.metadata()["format"] == "tensorflow-v1-checkpoint" and r.checksum("sliced/w") is None
        for name, (dtype, v) in dtype_values().items():
            got = r.read(name)
            if dtype in QUANTIZED_BASE:
                got = got.view(QUANTIZED_BASE[dtype])
            assert got.shape == v.shape and np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(v).tobytes() or \
                dtype == "string" and got.tolist() == v.tolist(), name


def test_sharded_partitioned_checkpoint_by_prefix_or_one_shard() -> None:
    prefix = fixture_path("partitioned")
    assert not os.path.exists(prefix) and os.path.exists(prefix + "-00002-of-00003")
    want = expected()["partitioned"]
    compare(native_records(prefix), want)
    compare(native_records(prefix + "-00001-of-00003"), want)   # one shard names the whole checkpoint
    with V1Reader(prefix) as r:
        assert r.spec("dev1/embedding").shape == (11, 5) and r.metadata()["files"] == 3


def test_auto_engine_reads_v1_natively_and_the_cli_exports_it(tmp_path: Any) -> None:
    path = fixture_path("tiny_net")
    with ckptbridge.read(path) as r:
        assert r.metadata()["format"] == "tensorflow-v1-checkpoint"
        names = list(r)
    assert "tiny_net/conv1/weights/ExponentialMovingAverage" in names and "global_step" in names
    out = tmp_path / "net.npz"
    proc = cli("export", path, str(out), "-q", "--use-ema", "--weights-only")
    assert proc.returncode == 0, proc.stderr
    with V1Reader(path) as src, ckptbridge.read(str(out)) as back:
        assert back.metadata()["engine"] == "native"
        assert digest(back["tiny_net/logits/weights"]) == digest(src.read("tiny_net/logits/weights/ExponentialMovingAverage"))
        assert not any("Momentum" in n or "ExponentialMovingAverage" in n for n in back)
    assert cli("ls", fixture_path("partitioned"), "--engine", "native").returncode == 0
    assert cli("verify", fixture_path("dtypes")).returncode == 0


@pytest.mark.parametrize("wide", [False, True])
def test_snappy_compressed_v1_file(tmp_path: Any, wide: bool) -> None:
    with open(fixture_path("dtypes"), "rb") as f:
        blob = snappy_table(f.read(), wide=wide)
    path = str(tmp_path / "snappy.ckpt")
    with open(path, "wb") as f:
        f.write(blob)
    compare(native_records(path), expected()["dtypes"])


def test_snappy_compressed_v2_index(tmp_path: Any) -> None:
    prefix = str(tmp_path / "m")
    w = BundleWriter(prefix, _block_size=96)
    values = {f"layer{i:03d}/weights": np.full((i % 5, 3), i, np.float32) for i in range(200)}
    values["s"] = np.array([b"", b"\x00\x00\x00\x00\x00\x00"], dtype=object)
    for name, v in values.items():
        w.write(name, v)
    w.commit()
    with open(prefix + ".index", "rb") as f:
        plain = f.read()
    blob = snappy_table(plain)
    assert len(blob) < len(plain)
    with open(prefix + ".index", "wb") as f:
        f.write(blob)
    with BundleReader(prefix) as r:
        assert all(digest(r.read(n)) == digest(v) for n, v in values.items())


def test_snappy_decoder_refusals() -> None:
    from ckptbridge.io.wire import _Bad

    good = snappy_compress(b"abcabcabcabc" * 20)
    assert _table.snappy_decompress(good) == b"abcabcabcabc" * 20
    for bad in (put_varint(1 << 30) + b"\x00a",           # a claim no stream of 3 bytes backs
                put_varint(5) + b"\x08ab",                  # a literal past the end
                put_varint(8) + b"\x00a\x0e\x05\x00",       # a copy reaching before the start
                put_varint(2) + b"\x08abc",                 # more than claimed
                put_varint(4) + b"\x08abc"):                # less than claimed
        with pytest.raises(_Bad):
            _table.snappy_decompress(bad)


def test_snappy_decoder_speed() -> None:
    """An index block is at most ~256 KiB: decoding one takes milliseconds, not seconds."""
    import time

    block = b"".join(f"resnet_v1_50/block{i % 4}/unit_{i % 23}/bottleneck_v1/conv{i % 3}/weights/Momentum".encode() + bytes(20)
                     for i in range(3000))[:256 << 10]
    packed = snappy_compress(block)
    t = time.perf_counter()
    assert _table.snappy_decompress(packed) == block
    assert time.perf_counter() - t < 1.0


# --- damage: one line, exit 2, nothing written ------------------------------------------------------------


def _copy(tmp_path: Any, name: str = "dtypes") -> str:
    path = str(tmp_path / "model.ckpt")
    shutil.copy(fixture_path(name), path)
    return path


def _refused(path: str, tmp_path: Any, *needles: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    error_line(cli("export", path, str(out / "x.npz")), *needles)
    assert os.listdir(out) == []
    proc = cli("verify", path)                   # verify's answer for a bad tensor: exit 1, naming it
    assert proc.returncode == 1 and all(n in proc.stdout + proc.stderr for n in needles), proc


def _small_blocks(tmp_path: Any) -> str:
    """The dtypes fixture with its entries in many small blocks (TensorFlow's 256 KiB blocks hold it whole)."""
    with open(fixture_path("dtypes"), "rb") as f:
        entries = list(_table.read_table(f.read()))
    t = _table.TableBuilder(block_size=256)
    for key, value in entries:
        t.add(key, value)
    path = str(tmp_path / "model.ckpt")
    with open(path, "wb") as f:
        f.write(t.finish())
    return path


def test_flipped_byte_in_a_tensor_is_caught(tmp_path: Any) -> None:
    path = _small_blocks(tmp_path)
    compare(native_records(path), expected()["dtypes"])
    with V1Reader(path) as r:
        want = r.read("float64/2x3")
    needle = np.ascontiguousarray(want).tobytes()
    with open(path, "rb") as f:
        at = f.read().index(needle)
    flip(path, at + 3)
    with V1Reader(path) as r:
        r.read("int8/2x3")                        # another block: fine
        with pytest.raises(CorruptError, match="crc32c"):
            r.read("float64/2x3")
    with V1Reader(path, verify=False) as r:
        assert r.read("float64/2x3").tobytes() != needle
    _refused(path, tmp_path, "crc32c", "model.ckpt", "data block at offset")   # the first tensor read from the block is named


def test_flipped_byte_in_the_metadata_block_is_caught(tmp_path: Any) -> None:
    path = _copy(tmp_path)
    flip(path, 40)
    with pytest.raises(CorruptError, match="crc32c"):
        V1Reader(path)
    error_line(cli("ls", path), "crc32c", "model.ckpt")


@pytest.mark.parametrize("keep", [0, 10, 47, 200, -1, -48])
def test_truncated_file(tmp_path: Any, keep: int) -> None:
    path = _copy(tmp_path)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:keep] if keep >= 0 else blob[:len(blob) + keep])
    with pytest.raises(CorruptError):
        with V1Reader(path) as r:
            for n in r.specs():
                r.read(n)
    error_line(cli("ls", path), "model.ckpt", "damaged")


def test_missing_shard_and_missing_file(tmp_path: Any) -> None:
    for shard in ("-00000-of-00003", "-00001-of-00003", "-00002-of-00003"):
        shutil.copy(fixture_path("partitioned") + shard, str(tmp_path / ("p.ckpt" + shard)))
    os.remove(str(tmp_path / "p.ckpt-00001-of-00003"))
    with pytest.raises(CorruptError, match="00001-of-00003 .* missing"):
        V1Reader(str(tmp_path / "p.ckpt"))
    error_line(cli("ls", str(tmp_path / "p.ckpt")), "missing")
    with pytest.raises(NotFoundError):
        V1Reader(str(tmp_path / "nothing.ckpt"))


def _opened_or_refused(open_it: Any) -> tuple[str, Any]:
    try:
        with open_it() as r:
            return "opened", {n: digest(r.read(n)) for n in r.specs()}
    except (CorruptError, NotFoundError) as e:
        return type(e).__name__, str(e)


@pytest.mark.parametrize("case", ["whole", "one-shard-named", "a-shard-missing", "two-shard-counts", "no-such-file", "not-digits"])
def test_shards_are_found_by_one_rule_at_a_path_and_in_a_place(tmp_path: Any, case: str) -> None:
    """A sharded V1 checkpoint's files are found, and refused, alike whether it is a local path or a name in a
    place (an archive, a URL's directory): the same files, the same error and the same message."""
    from ckptbridge.io.ranged import LocalPlace

    for shard in ("-00000-of-00003", "-00001-of-00003", "-00002-of-00003"):
        shutil.copy(fixture_path("partitioned") + shard, str(tmp_path / ("p.ckpt" + shard)))
    name = "p.ckpt"
    if case == "one-shard-named":
        name = "p.ckpt-00002-of-00003"
    elif case == "a-shard-missing":
        os.remove(str(tmp_path / "p.ckpt-00001-of-00003"))
    elif case == "two-shard-counts":
        shutil.copy(str(tmp_path / "p.ckpt-00000-of-00003"), str(tmp_path / "p.ckpt-00000-of-00002"))
    elif case == "no-such-file":
        name = "nothing.ckpt"
    elif case == "not-digits":  # what a glob of -?????-of-????? also matches
        os.rename(str(tmp_path / "p.ckpt-00000-of-00003"), str(tmp_path / "q.ckpt-0000x-of-00003"))
        name = "q.ckpt"
    local = _opened_or_refused(lambda: V1Reader(str(tmp_path / name)))
    placed = _opened_or_refused(lambda: V1Reader(name, place=LocalPlace(str(tmp_path))))
    assert local == placed
    want = {"whole": "opened", "one-shard-named": "opened", "a-shard-missing": "CorruptError", "two-shard-counts": "CorruptError",
            "no-such-file": "NotFoundError", "not-digits": "NotFoundError"}[case]
    assert local[0] == want, local
    if want == "opened":
        assert local[1] == {n: r["sha256"] for n, r in expected()["partitioned"].items()}
    elif case == "a-shard-missing":
        assert f"shard {tmp_path / 'p.ckpt-00001-of-00003'} of the V1 checkpoint {tmp_path / 'p.ckpt'} is missing" in local[1]
    elif case == "two-shard-counts":
        assert "different counts ([2, 3])" in local[1] and "remove the files of the other checkpoint" in local[1]
    else:
        assert f"no shards {tmp_path / name}-NNNNN-of-NNNNN" in local[1]


def _meta(name: bytes, dtype: int, shape: tuple[int, ...], slices: list[tuple[tuple[int, int], ...]]) -> bytes:
    from ckptbridge.io.wire import field_bytes, field_varint

    dims = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in shape)
    out = field_bytes(1, name) + field_bytes(2, dims) + field_varint(3, dtype)
    for s in slices:
        out += field_bytes(4, b"".join(field_bytes(1, field_varint(1, a) + field_varint(2, n)) for a, n in s))
    return out


def _slice_entry(name: bytes, s: tuple[tuple[int, int], ...], tensor_proto: bytes) -> tuple[bytes, bytes]:
    from ckptbridge.bundle._entries import slice_key
    from ckptbridge.io.wire import field_bytes, field_varint

    sl = b"".join(field_bytes(1, field_varint(1, a) + field_varint(2, n)) for a, n in s)
    key = slice_key(name, tuple(a for a, _ in s), tuple(n for _, n in s))
    return key, field_bytes(2, field_bytes(1, name) + field_bytes(2, sl) + field_bytes(3, tensor_proto))


def _floats(*v: float) -> bytes:
    from ckptbridge.io.wire import field_bytes

    return field_bytes(5, np.array(v, "<f4").tobytes())


CRAFTED: dict[str, Any] = {
    # what lies -> (meta entries, slice entries, what the error says)
    "fewer values than elements": ([_meta(b"w", 1, (4,), [((0, 4),)])], [_slice_entry(b"w", ((0, 4),), _floats(1, 2))], "holds 2 values"),
    "more values than elements": ([_meta(b"w", 1, (2,), [((0, 2),)])], [_slice_entry(b"w", ((0, 2),), _floats(1, 2, 3))], "holds 3 values"),
    "huge shape, tiny data": ([_meta(b"w", 1, (1 << 40, 1 << 17), [((0, 1 << 40), (0, 1 << 17))])],
                              [_slice_entry(b"w", ((0, 1 << 40), (0, 1 << 17)), _floats(1))], "holds 1 values"),
    "absurd shape": ([_meta(b"w", 1, (1 << 40, 1 << 40), [((0, 1 << 40), (0, 1 << 40))])], [], "invalid shape"),
    "slices missing": ([_meta(b"w", 1, (4,), [((0, 2),)])], [_slice_entry(b"w", ((0, 2),), _floats(1, 2))], "do not tile"),
    "slices overlapping": ([_meta(b"w", 1, (4,), [((0, 3),), ((2, 1),)])],
                           [_slice_entry(b"w", ((0, 3),), _floats(1, 2, 3)), _slice_entry(b"w", ((2, 1),), _floats(4))], "overlap"),
    "slice outside": ([_meta(b"w", 1, (4,), [((3, 4),)])], [], "outside"),
    "slice data missing": ([_meta(b"w", 1, (2,), [((0, 2),)])], [], "missing"),
    "int8 out of range": ([_meta(b"w", 6, (1,), [((0, 1),)])], [_slice_entry(b"w", ((0, 1),), put_varint(7 << 3) + put_varint(300))],
                          "outside"),
    "wrong field": ([_meta(b"w", 3, (2,), [((0, 2),)])], [_slice_entry(b"w", ((0, 2),), _floats(1, 2))], "fields"),
    "bad dtype": ([_meta(b"w", 999, (2,), [((0, 2),)])], [], "dtype"),
    "entry names another tensor": ([_meta(b"w", 1, (1,), [((0, 1),)])],
                                   [(_slice_entry(b"w", ((0, 1),), b"")[0], _slice_entry(b"v", ((0, 1),), _floats(1))[1])], "another tensor"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_lies_are_refused_before_allocating(tmp_path: Any, case: str) -> None:
    metas, entries, needle = CRAFTED[case]
    path = str(tmp_path / "x.ckpt")
    craft_v1(path, metas, dict(entries))
    with pytest.raises(CorruptError, match=needle):
        with V1Reader(path) as r:
            for n in r.specs():
                r.read(n)


def test_crafted_lie_is_one_line_under_a_memory_cap(tmp_path: Any) -> None:
    from helpers import run_cli

    metas, entries, _ = CRAFTED["huge shape, tiny data"]
    craft_v1(str(tmp_path / "x.ckpt"), metas, dict(entries))
    r = run_cli("export", "x.ckpt", "o.npz", cwd=str(tmp_path))
    error_line((r.returncode, r.stderr.decode()), "holds 1 values")
    assert not (tmp_path / "o.npz").exists()


def test_newer_checkpoint_version_is_a_format_error(tmp_path: Any) -> None:
    from ckptbridge.io.wire import field_varint

    path = str(tmp_path / "x.ckpt")
    craft_v1(path, [], {}, versions=field_varint(1, 5) + field_varint(2, 3))
    with pytest.raises(FormatError, match="newer"):
        V1Reader(path)


# --------------------------------------------------------------------------- with TensorFlow


@pytest.fixture(scope="module")
def fresh(module_tmp: Any) -> dict[str, str]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_slim")
    return build_fixtures(str(module_tmp("v1_fresh")))


@pytest.mark.tf
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fresh_fixtures_bit_exact_against_tensorflow(fresh: dict[str, str], name: str) -> None:
    compare(native_records(fresh[name]), tf_records(fresh[name]))


@pytest.mark.tf
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_recorded_expectations_are_what_tensorflow_reads(fresh: dict[str, str], name: str) -> None:
    assert tf_records(fixture_path(name)) == expected()[name]


@pytest.mark.tf
def test_tensorflow_reads_our_snappy_rewrite_the_same(fresh: dict[str, str], tmp_path: Any) -> None:
    """The snappy tables of the TF-free tests are ones TensorFlow reads too, to the same values."""
    with open(fresh["dtypes"], "rb") as f:
        blob = snappy_table(f.read())
    path = str(tmp_path / "snappy.ckpt")
    with open(path, "wb") as f:
        f.write(blob)
    compare(native_records(path), tf_records(path))


@pytest.mark.tf
def test_v1_writer_dtypes_are_what_we_say(fresh: dict[str, str], tmp_path: Any) -> None:
    tf = _tf()
    for d in V1_DTYPES + NOT_V1:
        dt = tf.dtypes.as_dtype(d)
        if d in QUANTIZED_BASE:
            t = tf.bitcast(tf.zeros((2,), getattr(tf, QUANTIZED_BASE[d])), dt)
        else:
            t = tf.zeros((2,), dt) if d in ("string", "bool") else tf.cast(tf.zeros((2,)), dt)
        try:
            tf.raw_ops.SaveSlices(filename=str(tmp_path / f"{d}.ckpt"), tensor_names=["x"], shapes_and_slices=[""], data=[t])
            ok = True
        except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
            ok = False
        assert ok == (d in V1_DTYPES), d


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        regenerate()
    else:
        sys.exit("usage: python tests/test_v1_native.py --regenerate   (in the TensorFlow venv)")
