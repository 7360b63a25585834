"""vgg_16 (tf-slim) into a live session: ckptbridge.assign against the two recipes people use.

    python benchmarks/assign.py [--runs 3] [--work DIR] [--big]

Each case runs in a process of its own, built the same way: import TensorFlow, build tf-slim's
vgg_16 in a graph, open a session and run its initializer (as ``slim.learning.train`` and a
``Scaffold`` do before ``init_fn``), then load the 553 MB of an ``.npz`` into the variables:

* ``ckptbridge``: ``ckptbridge.assign(sess, "vgg_16.npz")``;
* ``slim``: every array read (``np.load``), then ``tf_slim.assign_from_values_fn(values)(sess)``;
* ``constants``: ``sess.run([tf.compat.v1.assign(v, array) for v ...])`` (the arrays become graph constants);
* ``floor``: the same process with no load at all (TensorFlow, the graph, the initialized variables).

The wall time is the child's whole life (``time.monotonic`` around ``wait4``), the load its own
(measured inside the child); the peak RSS is the child's ``ru_maxrss`` (this process stays small:
the archives are written by a process of their own, since a child's ``ru_maxrss`` starts from its
parent's at the fork).  The cases alternate, run
after run, and the medians are reported, with the ratios against tf-slim's from the same runs.
``--big`` adds one float32 variable of 2.2 GB (``[540000, 1024]``) assigned by ckptbridge in
64 MiB row slices; its constant recipe is tried too (TensorFlow refuses a constant over 2 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = ["ckptbridge", "slim", "constants", "floor"]
BIG_ROWS, BIG_COLS = 540_000, 1024  # 2.21 GB of float32


def _graph(model: str) -> tuple[Any, Any]:
    from ckptbridge.tf.compat import import_slim, import_tensorflow

    tf = import_tensorflow()
    import_slim()
    if model == "big":
        g = tf.Graph()
        with g.as_default():
            tf.compat.v1.get_variable("big", [BIG_ROWS, BIG_COLS], tf.float32, initializer=tf.compat.v1.zeros_initializer())
        return tf, g
    from ckptbridge.tf.slim import build_net

    return tf, build_net(model, None)[0]


def child(case: str, archive: str, model: str) -> int:
    tf, g = _graph(model)
    with g.as_default():
        variables = tf.compat.v1.global_variables()
        sess = tf.compat.v1.Session(graph=g)
        sess.run(tf.compat.v1.global_variables_initializer())
        t0 = time.monotonic()
        if case == "ckptbridge":
            import ckptbridge

            ckptbridge.assign(sess, archive)
        elif case == "slim":
            import tf_slim as slim

            npz = np.load(archive)
            slim.assign_from_values_fn({v.op.name: npz[v.op.name] for v in variables})(sess)
        elif case == "constants":
            npz = np.load(archive)
            try:
                ops = [tf.compat.v1.assign(v, npz[v.op.name]) for v in variables]
                sess.run(ops)
            except (ValueError, tf.errors.OpError) as e:
                print(json.dumps({"failed": str(e).splitlines()[0][:160]}))
                return 3
        load = time.monotonic() - t0
        if case != "floor" and model != "big":  # a check that the load happened, outside the timed part (the
            # big variable's would hold two more copies of it; ckptbridge's own read-back compared every byte)
            v = variables[-1]
            got = sess.run(v)
            want = np.load(archive)[v.op.name]
            if got.tobytes() != want.tobytes():
                print(json.dumps({"failed": f"{v.op.name} differs"}))
                return 4
        sess.close()
    print(json.dumps({"load_s": round(load, 3)}))
    return 0


def run_child(case: str, archive: str, model: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, __file__, "--child", case, archive, model], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=env, cwd=ROOT, text=True)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    doc = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {"wall_s": round(wall, 2), "rss_mb": round(ru.ru_maxrss / 1024), "rc": os.waitstatus_to_exitcode(status), **doc}


def make_archive(path: str, model: str) -> None:
    """Random values for the net's variables, written by ckptbridge.save (a real .npz)."""
    if os.path.exists(path):
        return
    import ckptbridge

    tf, g = _graph(model)
    rng = np.random.default_rng(0)
    if model == "big":
        mm = np.lib.format.open_memmap(path + ".npy", mode="w+", dtype=np.float32, shape=(BIG_ROWS, BIG_COLS))
        for i in range(0, BIG_ROWS, 20_000):
            mm[i:i + 20_000] = rng.standard_normal((min(20_000, BIG_ROWS - i), BIG_COLS), dtype=np.float32)
        mm.flush()
        ckptbridge.save({"big": np.load(path + ".npy", mmap_mode="r")}, path)
        os.unlink(path + ".npy")
        return
    with g.as_default():
        arrays = {v.op.name: rng.standard_normal(v.shape.as_list()).astype(np.float32) * 0.01 for v in tf.compat.v1.global_variables()}
    ckptbridge.save(arrays, path)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3], sys.argv[4])
    if len(sys.argv) > 1 and sys.argv[1] == "--make":
        make_archive(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", default=os.path.join(HERE, "work", "assign"))
    p.add_argument("--big", action="store_true", help="also a 2.2 GB variable (4.4 GB of disk)")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    plans = [("vgg_16", CASES)] + ([("big", ["ckptbridge", "constants", "floor"])] if args.big else [])
    results: dict[str, Any] = {}
    for model, cases in plans:
        archive = os.path.join(args.work, f"{model}.npz")
        # In a process of its own: a child's ru_maxrss starts from what this process held when it forked.
        subprocess.run([sys.executable, __file__, "--make", archive, model], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
        for r in range(args.runs):
            for case in cases:  # alternating: each run takes every case once
                res = run_child(case, archive, model)
                runs[case].append(res)
                print(f"{model} run {r + 1} {case}: {res}", file=sys.stderr)
        med = {}
        for case, rs in runs.items():
            ok = [x for x in rs if x["rc"] == 0]
            med[case] = {"wall_s": statistics.median(x["wall_s"] for x in ok) if ok else None,
                         "load_s": statistics.median(x["load_s"] for x in ok) if ok else None,
                         "rss_mb": statistics.median(x["rss_mb"] for x in rs), "failed": sorted({x.get("failed", "") for x in rs} - {""})}
        results[model] = {"runs": runs, "median": med}
        if "slim" in med:
            ours, slim_ = med["ckptbridge"], med["slim"]
            floor = med["floor"]
            print(f"{model}: wall {ours['wall_s'] / slim_['wall_s']:.2f}x of tf-slim's, load {ours['load_s'] / slim_['load_s']:.2f}x, "
                  f"peak RSS {ours['rss_mb'] / slim_['rss_mb']:.2f}x (above the floor: "
                  f"{(ours['rss_mb'] - floor['rss_mb']) / (slim_['rss_mb'] - floor['rss_mb']):.2f}x)", file=sys.stderr)
    out = os.path.join(args.work, "results.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({m: r["median"] for m, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
