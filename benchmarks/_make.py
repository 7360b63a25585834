"""Build one benchmark checkpoint (run by run.py in its own process, once; reused after).

    python benchmarks/_make.py MODEL OUT_DIR

MODEL is a tf-slim net name (random-initialised weights, saved by
``tf.compat.v1.train.Saver``), ``vgg_16_train`` (vgg_16 plus one Momentum slot
and one ExponentialMovingAverage shadow per weight, as a training job saves it)
``vgg_16_v1`` (vgg_16 saved as one V1 table file, as the 2016 model zoo
ships it), ``synthetic`` (one 2.4 GB tensor and about 6 GB in all, written by
ckptbridge's native bundle writer in 16 MB pieces, never whole in memory) or
``index_40k`` (40,000 small tensors of varied shapes under names of a deep net's
length, written by the native writer: an index of 40,000 entries, 4 MB of data).
Prints the checkpoint prefix.
"""

from __future__ import annotations

import os
import sys

import numpy as np

SYNTHETIC = [
    # name, dtype, shape: the 2.4 GB tensor first, then 6 x 600 MB, then a few small ones
    ("embedding/huge", "float32", (600_000, 1000)),
    *[(f"tower_{i}/dense/kernel", "float32", (150_000, 1000)) for i in range(6)],
    *[(f"tower_{i}/dense/bias", "float32", (1000,)) for i in range(6)],
    ("head/kernel_bf16", "bfloat16", (4096, 1000)),
    ("head/counts", "int64", (1000,)),
    ("global_step", "int64", ()),
]


def make_slim(model: str, out_dir: str) -> str:
    from ckptbridge.tf.compat import import_tensorflow
    from ckptbridge.tf.slim import build_net

    tf = import_tensorflow()
    v1 = model.endswith("_v1")
    base = model.removesuffix("_train").removesuffix("_v1")
    graph, _, logits = build_net(base, None)
    with graph.as_default():
        if model.endswith("_train"):
            step = tf.compat.v1.train.get_or_create_global_step()
            weights = tf.compat.v1.trainable_variables()
            loss = tf.reduce_mean(logits)
            tf.compat.v1.train.MomentumOptimizer(0.01, 0.9).minimize(loss, global_step=step, var_list=weights)
            tf.compat.v1.train.ExponentialMovingAverage(0.999).apply(weights)
        saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1 if v1 else tf.compat.v1.train.SaverDef.V2)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, os.path.join(out_dir, "model.ckpt"), write_meta_graph=False)


def make_synthetic(out_dir: str) -> str:
    from ckptbridge.bundle.writer import BundleWriter
    from ckptbridge.spec import numpy_dtype

    prefix = os.path.join(out_dir, "model.ckpt")
    w = BundleWriter(prefix)
    rng = np.random.default_rng(0)
    piece = 4 << 20  # elements per piece (16 MB of float32)
    for name, dtype, shape in SYNTHETIC:
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        dt = numpy_dtype(dtype)

        def pieces(n: int = n, dt: np.dtype = dt, dtype: str = dtype) -> object:
            for i in range(0, n, piece):
                k = min(piece, n - i)
                if dt.kind == "f" or dtype == "bfloat16":
                    yield rng.standard_normal(k, dtype=np.float32).astype(dt)
                else:
                    yield rng.integers(0, 1 << 40, k, dtype=np.int64).astype(dt)

        w.write_chunks(name, dtype, shape, pieces())
    w.commit()
    return prefix


def make_index(out_dir: str, n: int = 40_000) -> str:
    from ckptbridge.bundle.writer import BundleWriter

    prefix = os.path.join(out_dir, "model.ckpt")
    w = BundleWriter(prefix)
    rng = np.random.default_rng(0)
    slots = ["weights", "biases", "BatchNorm/gamma", "BatchNorm/beta", "BatchNorm/moving_mean", "BatchNorm/moving_variance",
             "weights/Momentum", "weights/ExponentialMovingAverage"]
    for i in range(n):   # block/unit/conv/slot: unique, about 60 characters, in no particular order
        name = f"model/block_{i // 400:03d}/unit_{(i // 8) % 50:02d}/conv_{(i * 7) % 3}/{slots[i % 8]}"
        shape = (3, 3, 1 + i % 7, 1 + (i // 7) % 5) if i % 8 in (0, 6, 7) else (1 + (i // 8) % 5,)
        w.write(name, rng.standard_normal(shape).astype(np.float32))
    w.commit()
    return prefix


def main() -> None:
    model, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    makers = {"synthetic": make_synthetic, "index_40k": make_index}
    print(makers[model](out_dir) if model in makers else make_slim(model, out_dir))


if __name__ == "__main__":
    main()
