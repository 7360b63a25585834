"""Checkpoints written by TensorFlow itself, for tests that use TensorFlow as the oracle.

Every builder takes a directory, writes a checkpoint into it with TensorFlow's
own savers (``tf.compat.v1.train.Saver``, ``SaveV2``, ``tf.train.Checkpoint``)
and returns the path a user would pass on the command line.  Graph-mode
builders run in their own ``tf.Graph`` so that no state leaks between them or
into eager code.  Nothing here is imported unless TensorFlow is installed.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from ckptbridge.tf.compat import import_slim, import_tensorflow

from helpers import assert_same_array  # noqa: F401 - tests use it as tf_checkpoints.assert_same_array too

tf = import_tensorflow()
slim = import_slim()

from tf_slim.nets import inception, resnet_v1, vgg  # noqa: E402

V1 = tf.compat.v1
EMA = "/ExponentialMovingAverage"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _saver_v1() -> Any:
    return V1.train.Saver(write_version=V1.train.SaverDef.V1)


# --------------------------------------------------------------------------- tf-slim nets


def build_vgg16_plain(directory: str) -> str:
    """tf-slim vgg_16 (num_classes=10), weights only, V2.  Returns the prefix."""
    prefix = os.path.join(directory, "vgg_16.ckpt")
    with tf.Graph().as_default():
        V1.set_random_seed(16)
        images = V1.placeholder(tf.float32, [1, 224, 224, 3])
        with slim.arg_scope(vgg.vgg_arg_scope()):
            vgg.vgg_16(images, num_classes=10, is_training=False)
        saver = V1.train.Saver()
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False)
    return prefix


def _net(name: str, images: Any) -> None:
    """Build a tf-slim net for training (its variables are what matter)."""
    if name == "resnet_v1_50":
        with slim.arg_scope(resnet_v1.resnet_arg_scope()):
            resnet_v1.resnet_v1_50(images, num_classes=10, is_training=True)
    elif name == "inception_v3":
        with slim.arg_scope(inception.inception_v3_arg_scope()):
            inception.inception_v3(images, num_classes=10, is_training=True)
    else:
        raise ValueError(name)


def _session_config(**kw: Any) -> Any:
    """A session without grappler: these graphs run once, optimising them costs more than it saves."""
    config = V1.ConfigProto(**kw)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def build_trained(directory: str, name: str, size: int) -> dict[str, str]:
    """One Momentum step with EMA shadows, saved by the same session as V2 and V1.

    The step applies seeded random gradients rather than backpropagating a loss:
    the checkpoint holds what a real step leaves (non-zero Momentum slots,
    ``X/ExponentialMovingAverage`` shadows, ``global_step``) at a fraction of the
    graph-building time.

    Returns {"v2": prefix, "v1": single file, "v2_dir": ..., "v1_dir": ...}.
    """
    v2_dir = os.path.join(directory, "v2")
    v1_dir = os.path.join(directory, "v1")
    os.makedirs(v2_dir)
    os.makedirs(v1_dir)
    with tf.Graph().as_default():
        V1.set_random_seed(50)
        images = V1.placeholder(tf.float32, [1, size, size, 3])
        _net(name, images)
        step = V1.train.get_or_create_global_step()
        opt = V1.train.MomentumOptimizer(0.01, 0.9)
        trainable = V1.trainable_variables()
        grads = [V1.random_normal(v.shape, seed=i, dtype=v.dtype.base_dtype) for i, v in enumerate(trainable)]
        train = opt.apply_gradients(list(zip(grads, trainable)), global_step=step)
        ema = V1.train.ExponentialMovingAverage(0.9)
        with tf.control_dependencies([train]):
            train = ema.apply(trainable)
        saver = V1.train.Saver(max_to_keep=None)
        with V1.Session(config=_session_config()) as sess:
            sess.run(V1.global_variables_initializer())
            sess.run(train)
            v2 = saver.save(sess, os.path.join(v2_dir, "model.ckpt"), global_step=1, write_meta_graph=False)
            v1 = _saver_v1().save(sess, os.path.join(v1_dir, f"{name}.ckpt"), write_meta_graph=False)
    return {"v2": v2, "v1": v1, "v2_dir": v2_dir, "v1_dir": v1_dir}


# --------------------------------------------------------------------------- layouts


def build_sharded(directory: str) -> str:
    """Variables on /cpu:0, /cpu:1, /cpu:2 saved with Saver(sharded=True): three data shards."""
    prefix = os.path.join(directory, "sharded.ckpt")
    with tf.Graph().as_default():
        rng = np.random.default_rng(3)
        for i in range(3):
            with tf.device(f"/cpu:{i}"):
                V1.Variable(rng.standard_normal((20 + i, 7)).astype(np.float32), name=f"dev{i}/kernel")
                V1.Variable(np.arange(i + 2, dtype=np.int64), name=f"dev{i}/ids")
        saver = V1.train.Saver(sharded=True)
        with V1.Session(config=_session_config(device_count={"CPU": 3})) as sess:
            sess.run(V1.global_variables_initializer())
            out = saver.save(sess, prefix, write_meta_graph=False)
    return out


def build_partitioned(directory: str) -> str:
    """A variable split by fixed_size_partitioner(3), plus a plain one beside it."""
    prefix = os.path.join(directory, "partitioned.ckpt")
    with tf.Graph().as_default():
        V1.set_random_seed(7)
        V1.get_variable("embedding", shape=[11, 5], dtype=tf.float32, partitioner=V1.fixed_size_partitioner(3),
                        initializer=V1.random_normal_initializer(seed=7))
        V1.get_variable("dense/bias", shape=[5], initializer=V1.random_normal_initializer(seed=8))
        saver = V1.train.Saver()
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False)
    return prefix


# --------------------------------------------------------------------------- dtypes


STRINGS = np.array([b"", b"\x00a\x00", b"\xff\xfe non-utf8"], dtype=object)


def dtype_tensors() -> dict[str, np.ndarray]:
    """Name -> value for every dtype, 0-d scalars, zero-size tensors and prefix names."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    floats = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-3], dtype=np.float64)
    out["dtypes/float16"] = floats.astype(np.float16).reshape(2, 4)
    out["dtypes/float32"] = floats.astype(np.float32).reshape(2, 2, 2)
    out["dtypes/float64"] = floats
    out["dtypes/bfloat16"] = floats.astype(ml_dtypes.bfloat16).reshape(4, 2)
    for dt in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(dt)
        out[f"dtypes/{dt}"] = np.array([info.min, info.max, 0, 1, info.max // 3], dtype=dt)
    out["dtypes/bool"] = np.array([[True, False, True], [False, False, True]])
    out["dtypes/complex64"] = (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64).reshape(3, 2)
    out["dtypes/complex128"] = np.array([1 + 2j, -0.0 - 3.5j, complex(np.nan, np.inf)], dtype=np.complex128)
    out["dtypes/string"] = STRINGS
    out["dtypes/string_2d"] = np.array([[b"a", b"bc"], [b"\x00", b"\xc3\xa9t\xc3\xa9"]], dtype=object)
    out["scalar/float32"] = np.array(3.25, dtype=np.float32)
    out["scalar/int64"] = np.array(-(2**62), dtype=np.int64)
    out["scalar/bool"] = np.array(True)
    out["scalar/bfloat16"] = np.array(1.5, dtype=ml_dtypes.bfloat16)
    out["scalar/uint8"] = np.array(255, dtype=np.uint8)
    out["scalar/string"] = np.array(b"\xff\x00scalar", dtype=object)
    out["empty/float32"] = np.zeros((0,), np.float32)
    out["empty/int32_3x0x2"] = np.zeros((3, 0, 2), np.int32)
    out["empty/string"] = np.zeros((0,), dtype=object)
    out["w"] = rng.standard_normal((3, 2)).astype(np.float32)
    out["w/ExponentialMovingAverage"] = rng.standard_normal((3, 2)).astype(np.float32)
    out["w/Momentum"] = rng.standard_normal((3, 2)).astype(np.float32)
    out["global_step"] = np.array(42, dtype=np.int64)
    return out


def build_dtypes(directory: str) -> str:
    """Every dtype, written by TensorFlow's SaveV2 kernel (what every Saver runs)."""
    prefix = os.path.join(directory, "dtypes.ckpt")
    values = dtype_tensors()
    names = sorted(values)
    tensors = []
    for n in names:
        v = values[n]
        if v.dtype == object:
            tensors.append(tf.constant(v, dtype=tf.string) if v.size else tf.zeros(v.shape, tf.string))
        else:
            tensors.append(tf.constant(v))
    with tf.device("/cpu:0"):
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return prefix


def many_tensors(n: int = 3000) -> dict[str, np.ndarray]:
    """``n`` small tensors of varied dtypes and shapes (ranks 0-5, dims of one- and two-byte varints, zero-size ones),
    some of them not ASCII: a large index in miniature."""
    rng = np.random.default_rng(23)
    dims = [0, 1, 2, 3, 7, 127, 128, 129, 300]
    kinds = ["float32", "float16", "int64", "bool", "bfloat16", "int8", "complex64", "string"]
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        shape: tuple[int, ...] = ()
        for _ in range(8):   # redraw until the tensor is small
            shape = tuple(int(d) for d in rng.choice(dims, size=int(rng.integers(0, 6))))
            if math.prod(shape) <= 2048:
                break
        else:
            shape = (int(rng.integers(1, 50)),)
        kind = kinds[i % len(kinds)]
        unit = "\u00e9t\u00e9" if i % 7 == 0 else "unit"   # some names not ASCII
        name = f"block_{i // 100:02d}/{unit}_{i % 100:02d}/{kind}"
        if kind == "string":
            out[name] = np.array([f"s{i}-{j}".encode() for j in range(math.prod(shape))], dtype=object).reshape(shape)
        elif kind == "bfloat16":
            out[name] = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
        elif kind == "bool":
            out[name] = rng.integers(0, 2, shape).astype(bool)
        elif kind == "complex64":
            out[name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        elif kind in ("int64", "int8"):
            out[name] = rng.integers(-100, 100, shape).astype(kind)
        else:
            out[name] = (rng.standard_normal(shape) * 100).astype(kind)
    return out


def build_many(directory: str) -> str:
    """The tensors of :func:`many_tensors`, written by TensorFlow's SaveV2 kernel."""
    prefix = os.path.join(directory, "many.ckpt")
    values = many_tensors()
    names = sorted(values)
    with tf.device("/cpu:0"):
        tensors = [tf.constant(v) if v.dtype != object else tf.constant(v, dtype=tf.string) if v.size else tf.zeros(v.shape, tf.string)
                   for v in (values[n] for n in names)]
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return prefix


LOWBIT = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2fnuz",
          "float4_e2m1fn", "int4", "uint4", "int2", "uint2")
QUANTIZED = {"qint8": "int8", "quint8": "uint8", "qint16": "int16", "quint16": "uint16", "qint32": "int32"}


def lowbit_tensors() -> dict[str, np.ndarray]:
    """Name -> value (ml_dtypes arrays; quantized in TensorFlow's NumPy form) of every dtype NumPy lacks but
    TensorFlow checkpoints hold one value per element: float8, float4, int4/int2 and the quantized types."""
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(LOWBIT):
        dt = np.dtype(getattr(ml_dtypes, name))
        info = ml_dtypes.iinfo(dt) if "int" in name else ml_dtypes.finfo(dt)
        vals = [info.min, info.max, 0, 1] + ([info.smallest_subnormal, -0.5, np.nan] if "float" in name else [])
        arr = np.array(vals, dtype=np.float64).astype(dt) if "float" in name else np.array(vals, dtype=np.int64).astype(dt)
        out[f"lowbit/{name}"] = arr.reshape(1, -1) if i % 2 else arr
        out[f"scalar/{name}"] = np.array(arr.reshape(-1)[1])
    for name, base in QUANTIZED.items():
        info = np.iinfo(base)
        out[f"quantized/{name}"] = np.array([[info.min, info.max, 0], [1, -1 if info.min else 7, 42]], dtype=base).view([(name, base)])
        out[f"scalar/{name}"] = np.array(info.max, dtype=base).view([(name, base)])
    out["w"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    return out


def build_lowbit(directory: str) -> str:
    """The tensors of :func:`lowbit_tensors`, written by TensorFlow's SaveV2 kernel."""
    prefix = os.path.join(directory, "lowbit.ckpt")
    values = lowbit_tensors()
    names = sorted(values)
    with tf.device("/cpu:0"):
        tensors = [tf.constant(values[n]) for n in names]
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return prefix


def build_iterators(directory: str) -> dict[str, str]:
    """tf.train.Checkpoint of a tf.data iterator (a DT_VARIANT tensor) and a variable, after one element: {"a": prefix}.
    (The state's shape varies from run to run: byte comparisons use :func:`build_tensor_lists`.)"""
    out = {}
    for key, steps in (("a", 1),):
        it = iter(tf.data.Dataset.range(10))
        for _ in range(steps):
            next(it)
        ckpt = tf.train.Checkpoint(it=it, v=tf.Variable([1.0, 2.0]))
        out[key] = ckpt.write(os.path.join(directory, key, "ckpt"))
    return out


def build_tensor_lists(directory: str) -> dict[str, str]:
    """SaveV2 of a TensorList (a scalar DT_VARIANT, serialized deterministically) beside a float:
    {"a", "a2" (the same values), "b" (one element changed)}.  A tf.data iterator's state is
    a variant too, but its shape varies from run to run, so byte comparisons use these."""
    out = {}
    for key, values in (("a", [1.0, 2.0]), ("a2", [1.0, 2.0]), ("b", [1.0, 3.0])):
        prefix = os.path.join(directory, key, "ckpt")
        tl = tf.raw_ops.TensorListFromTensor(tensor=tf.constant(values), element_shape=tf.constant([], tf.int32))
        tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["list", "w"], shape_and_slices=["", ""], tensors=[tl, tf.constant([1.0])])
        out[key] = prefix
    return out


# --------------------------------------------------------------------------- TF2


def build_tf2(directory: str) -> str:
    """A tf.train.Checkpoint of a tf.Module and a tf-keras Adam after one apply_gradients."""
    import tf_keras

    class Dense(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]), name="w")
            self.b = tf.Variable(tf.zeros([3]), name="b")
            self.scale = tf.Variable(tf.constant(2.0, tf.float64), name="scale", trainable=False)

    model = Dense()
    opt = tf_keras.optimizers.Adam(0.01)
    x = tf.random.stateless_normal([2, 4], seed=[3, 4])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(x @ model.w + model.b))
    grads = tape.gradient(loss, [model.w, model.b])
    opt.apply_gradients(zip(grads, [model.w, model.b]))
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    return ckpt.save(os.path.join(directory, "tf2", "ckpt"))


# --------------------------------------------------------------------------- the oracle


def tf_expected(prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype name, shape) of every tensor TensorFlow lists, minus the object graph."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    return {n: (dtypes[n].name, tuple(shapes[n])) for n in shapes if n != OBJECT_GRAPH_KEY}


def _tf_value(reader: Any, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    value = reader.get_tensor(name)
    if dtype == tf.string:
        arr = np.empty(shape, dtype=object)
        if shape == ():
            arr[()] = value
        else:
            arr[...] = np.asarray(value, dtype=object).reshape(shape)
        return arr
    if dtype.is_quantized:
        # TensorFlow hands quantized values back as plain integers; its own NumPy type for them is this.
        return np.asarray(value).view(dtype.as_numpy_dtype)
    return np.asarray(value)


def assert_same_as_tf(reader_or_mapping: Any, prefix: str, *, names: Any = None, rename: dict[str, str] | None = None) -> int:
    """Every tensor of ``reader_or_mapping`` equals ``tf.train.load_checkpoint(prefix)`` bit for bit.

    Name sets are equal (TensorFlow's minus ``_CHECKPOINTABLE_OBJECT_GRAPH``, or
    ``names`` when given), dtypes are equal, 0-d stays 0-d, strings are lists of
    ``bytes``, bfloat16 is compared through its uint16 bits.  ``rename`` maps an
    output name to the TensorFlow name its value must equal (``--use-ema``).
    Returns the number of tensors compared.
    """
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    want_names = set(names) if names is not None else {n for n in shapes if n != OBJECT_GRAPH_KEY}
    got_names = set(reader_or_mapping.keys())
    assert got_names == want_names, (
        f"names differ: missing {sorted(want_names - got_names)[:8]}, unexpected {sorted(got_names - want_names)[:8]}"
    )
    rename = rename or {}
    for name in sorted(want_names):
        src = rename.get(name, name)
        want = _tf_value(reader, src, dtypes[src], tuple(shapes[src]))
        assert_same_array(reader_or_mapping[name], want, name)
    return len(want_names)
