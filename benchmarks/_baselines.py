"""The ways people convert checkpoints today, each run by run.py in a fresh process.

    python benchmarks/_baselines.py a_npz CKPT OUT.npz
    python benchmarks/_baselines.py a_h5  CKPT OUT.h5
    python benchmarks/_baselines.py b     ARCHIVE.npz OUT_PREFIX MODEL
    python benchmarks/_baselines.py c     ARCHIVE.npz OUT_PREFIX MODEL|synthetic
    python benchmarks/_baselines.py graph ARCHIVE.npz MODEL

(a) ``tf.train.load_checkpoint``, every tensor into one dict, then ``np.savez`` / h5py;
(b) tf-slim's ``assign_from_values_fn`` into the slim graph, then ``Saver.save``;
(c) ``tf.assign(variable, ndarray)`` per variable (the arrays become graph
    constants), then ``Saver.save``.  Past 2 GB in one tensor TensorFlow
    refuses the constant; that failure is reported with exit status 3;
graph: only import TensorFlow and build the slim graph, the floor of (b) and
    of ``import --model`` alike.

These are written the way the recipes are usually written, with the one
concession noted at each: nothing here is made slower on purpose.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def baseline_a(ckpt: str, out: str) -> None:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(ckpt)
    values = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    if out.endswith(".npz"):
        np.savez(out, **values)
    else:
        import h5py

        # A dataset cannot sit at "w" and be the parent of "w/ExponentialMovingAverage":
        # the usual workaround flattens the names.
        with h5py.File(out, "w") as f:
            for name, value in values.items():
                f.create_dataset(name.replace("/", "|"), data=value)


def _graph(model: str, archive: np.lib.npyio.NpzFile):  # type: ignore[no-untyped-def]
    from ckptbridge.tf.compat import import_tensorflow

    tf = import_tensorflow()
    if model == "synthetic":
        graph = tf.Graph()
        with graph.as_default():
            # Creation order: the largest tensor first, as run.py's synthetic checkpoint lists it.
            names = sorted(archive.files, key=lambda n: -archive.zip.getinfo(n + ".npy").file_size)
            for name in names:
                if name.startswith("__ckptbridge"):
                    continue
                shape, dtype = _npy_spec(archive, name)
                tf.compat.v1.get_variable(name, shape=shape, dtype=tf.as_dtype(dtype), initializer=tf.compat.v1.zeros_initializer())
        return graph
    from ckptbridge.tf.slim import build_net

    return build_net(model, None)[0]


def _npy_spec(archive: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.zip.open(name + ".npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def baseline_bc(which: str, archive_path: str, out_prefix: str, model: str) -> int:
    from ckptbridge.tf.compat import import_slim, import_tensorflow

    tf = import_tensorflow()
    slim = import_slim()
    archive = np.load(archive_path)
    graph = _graph(model, archive)
    with graph.as_default():
        variables = tf.compat.v1.global_variables()
        if which == "b":
            values = {v.op.name: archive[v.op.name] for v in variables}
            init = slim.assign_from_values_fn(values)
        else:
            try:
                ops = [tf.compat.v1.assign(v, archive[v.op.name]) for v in variables]
            except ValueError as e:
                print(f"failed: {str(e).splitlines()[0][:160]}", file=sys.stderr)
                return 3

            def init(sess):  # type: ignore[no-untyped-def]
                sess.run(ops)
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            try:
                init(sess)
                saver.save(sess, out_prefix)
            except (ValueError, tf.errors.OpError) as e:
                print(f"failed: {str(e).splitlines()[0][:160]}", file=sys.stderr)
                return 3
    return 0


def graph_only(archive_path: str, model: str) -> int:
    """The floor of any import that checks the archive against the slim graph: start
    Python, import TensorFlow and tf-slim, build the net and list its variables; no data."""
    from ckptbridge.tf.compat import import_slim, import_tensorflow

    tf = import_tensorflow()
    import_slim()
    graph = _graph(model, np.load(archive_path))
    with graph.as_default():
        return 0 if tf.compat.v1.global_variables() else 3


def main() -> int:
    op = sys.argv[1]
    if op in ("a_npz", "a_h5"):
        baseline_a(sys.argv[2], sys.argv[3])
        return 0
    if op == "graph":
        return graph_only(sys.argv[2], sys.argv[3])
    os.makedirs(os.path.dirname(os.path.abspath(sys.argv[3])), exist_ok=True)
    return baseline_bc(op, sys.argv[2], sys.argv[3], sys.argv[4])


if __name__ == "__main__":
    sys.exit(main())
