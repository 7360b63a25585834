"""``ckptbridge archive`` of many checkpoints, against a shell loop of ``ckptbridge export``.

Twenty checkpoints in four training directories (``runs/r<i>/model.ckpt-<step>``,
written once by the native writer into ``benchmarks/work/archive/``), each
``--mb`` MB in eight float32 tensors.  Timed, each from a fresh destination after
``sync``, the wall time of the whole command:

- ``loop``: ``for p in ...; do ckptbridge export $p DEST/...h5; done`` in bash, what is done today;
- ``archive --jobs 1`` and ``--jobs 2``;
- ``archive --scheduler`` on a local Dask cluster (two worker processes of one thread, started
  before the timing: a cluster is already running when one archives onto it; each worker still
  imports ckptbridge on its first task, inside the timing);
- ``re-run``: ``archive --jobs 2`` again over a destination where everything is done (the manifest's skip).

    python benchmarks/archive.py [--runs 3] [--mb 8]

Prints a Markdown table (medians) and writes ``benchmarks/work/archive.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "archive")
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
CKPTBRIDGE = [sys.executable, "-m", "ckptbridge"]
N_RUNS, PER_RUN = 4, 5


def build(mb: float) -> list[str]:
    """The twenty checkpoint prefixes (built once per size)."""
    sys.path.insert(0, ROOT)
    from ckptbridge.bundle import BundleWriter

    src = os.path.join(WORK, f"runs-{mb:g}mb")
    prefixes = [os.path.join(src, "runs", f"r{r}", f"model.ckpt-{1000 * (s + 1)}") for r in range(N_RUNS) for s in range(PER_RUN)]
    if all(os.path.exists(p + ".index") for p in prefixes):
        return prefixes
    shutil.rmtree(src, ignore_errors=True)
    rng = np.random.default_rng(0)
    n = int(mb * (1 << 20) / 4 / 8)
    for p in prefixes:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        w = BundleWriter(p)
        for i in range(8):
            w.write(f"net/layer{i}/weights", rng.standard_normal(n).astype(np.float32))
        w.write("global_step", np.int64(int(p.rsplit("-", 1)[1])))
        w.commit()
    return prefixes


def _timed(argv: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({r.returncode}): {r.stderr[-2000:]}")
    return elapsed


def _loop(prefixes: list[str], dest: str) -> list[str]:
    runs = os.path.dirname(os.path.dirname(prefixes[0]))
    lines = [f"cd {runs}"]
    for p in prefixes:
        rel = os.path.relpath(p, runs)
        lines.append(f"mkdir -p {dest}/runs/{os.path.dirname(rel)} && {' '.join(CKPTBRIDGE)} export -q {rel} {dest}/runs/{rel}.h5 || exit 1")
    return ["bash", "-c", "\n".join(lines)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=float, default=8.0, help="size of each checkpoint in MB (default 8)")
    args = ap.parse_args()
    prefixes = build(args.mb)
    src = os.path.dirname(os.path.dirname(os.path.dirname(prefixes[0])))
    dest = os.path.join(WORK, "dest")
    runs = os.path.join(src, "runs")
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=ENV,
                           local_directory=os.path.join(WORK, "dask"))  # the workers' scratch beside the rest, not in /tmp
    client = Client(cluster)
    try:
        cases = {
            "loop": lambda: _loop(prefixes, dest),
            "archive --jobs 1": lambda: [*CKPTBRIDGE, "archive", "-q", runs, dest, "--jobs", "1"],
            "archive --jobs 2": lambda: [*CKPTBRIDGE, "archive", "-q", runs, dest, "--jobs", "2"],
            "archive --scheduler (2 workers)": lambda: [*CKPTBRIDGE, "archive", "-q", runs, dest, "--scheduler", cluster.scheduler_address],
        }
        times: dict[str, list[float]] = {k: [] for k in [*cases, "re-run, all done (--jobs 2)"]}
        for _ in range(args.runs):
            for name, argv in cases.items():
                shutil.rmtree(dest, ignore_errors=True)
                os.makedirs(dest)
                if name.startswith("archive --scheduler"):
                    client.restart()  # fresh workers: their imports inside the timing
                times[name].append(_timed(argv()))
            times["re-run, all done (--jobs 2)"].append(_timed([*CKPTBRIDGE, "archive", "-q", runs, dest, "--jobs", "2"]))
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(dest, ignore_errors=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(runs) for f in fs)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"20 checkpoints, {total / 2**20:.0f} MiB in all; medians of {args.runs} runs; {os.cpu_count()} CPUs\n")
    print("| command | wall s | checkpoints/s | MiB/s | vs loop |")
    print("|---|---:|---:|---:|---:|")
    for k, t in med.items():
        print(f"| {k} | {t:.2f} | {20 / t:.2f} | {total / 2**20 / t:.0f} | {med['loop'] / t:.2f}x |")
    with open(os.path.join(WORK, "archive.json"), "w") as f:
        json.dump({"mb": args.mb, "bytes": total, "runs": args.runs, "times": times}, f, indent=2)


if __name__ == "__main__":
    main()
