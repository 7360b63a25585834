"""Export from remote URLs against ``curl`` of the same bytes, in the same run.

    python benchmarks/remote.py [--runs N] [--model vgg_16_train]

The checkpoint (vgg_16 + Momentum + EMA, 1.66 GB, built once into benchmarks/work/ by
_make.py, as run.py does) is served on 127.0.0.1 by the test suite's own servers
(tests/servers.py): the threaded HTTP server that honours Range requests, and moto's
standalone S3 server with the files uploaded to a bucket.  Each run alternates, each in a
fresh process with its wall time and peak RSS taken as run.py takes them:

- ``curl`` of every file of the checkpoint from the server to local files (the floor: the
  bytes moved once, no parsing, no checksum, no fsync);
- ``ckptbridge export URL out.npz`` (the native engine, by range; crc32c of every tensor,
  read-back of the output, fsync before the rename);
- the same export from the local files, for reference.

It prints a table and writes benchmarks/work/remote-results.json; the README's table is
copied from a run by hand.  The servers are Python and run in this process, so both sides
share their cost: the headline is the ratio in one run, not the absolute speed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # this checkout's ckptbridge, as the measured commands (run from ROOT) get
sys.path.insert(0, os.path.join(ROOT, "tests"))

from run import PY, WORK, measure, model_bytes  # noqa: E402

from servers import MotoS3, RangeHTTPServer  # noqa: E402

BUCKET = "bench"
KEY, REGION = "bench", "us-east-1"  # moto accepts any key; curl signs with it (--aws-sigv4), as s3fs does


def checkpoint(model: str, env: dict[str, str]) -> str:
    """The model's checkpoint prefix under benchmarks/work/ckpt/, built once (as run.py's prepare)."""
    d = os.path.join(WORK, "ckpt", model)
    prefix = os.path.join(d, "model.ckpt")
    if not os.path.exists(prefix + ".index"):
        print(f"[prepare] building {model} checkpoint ...", flush=True)
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run([PY, os.path.join(HERE, "_make.py"), model, d], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return prefix


def files_of(prefix: str) -> list[str]:
    return sorted([prefix + ".index", *glob.glob(prefix + ".data-*")])


def serve(directory: str) -> None:
    """The servers' own process (so the measured commands' peak RSS is theirs alone: a child forked
    from a process holding moto's objects would count them).  Prints the endpoints as one JSON
    line, then answers each line on stdin with the byte counts; stops at end of input."""
    http = RangeHTTPServer(directory).start()
    s3 = MotoS3().start()
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY, AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=s3.endpoint)
    import fsspec

    fs = fsspec.filesystem("s3", config_kwargs={"read_timeout": 900})
    fs.mkdir(BUCKET)
    for f in os.listdir(directory):
        # One PutObject each (S3 takes up to 5 GB so): moto's multipart completion of 1.6 GB outlasts botocore's time-out.
        with open(os.path.join(directory, f), "rb") as src:
            fs.pipe_file(f"{BUCKET}/{f}", src.read())
    print(json.dumps({"http": http.url, "s3": s3.endpoint}), flush=True)
    try:
        for _ in sys.stdin:
            print(json.dumps({"http": http.sent, "s3": s3.sent}), flush=True)
    finally:
        http.stop()
        s3.stop()


class Servers:
    """The serve() process, seen from the runner."""

    def __init__(self, directory: str) -> None:
        self.proc = subprocess.Popen([PY, __file__, "--serve", directory], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.urls = json.loads(self.proc.stdout.readline())

    def sent(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ranges(size: int, chunk: int) -> list[str]:
    return [f"{a}-{min(size, a + chunk) - 1}" for a in range(0, size, chunk)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default="vgg_16_train")
    p.add_argument("--where", nargs="+", choices=["http", "s3"], default=["http", "s3"], help="which servers (default: both)")
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve)

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    prefix = checkpoint(args.model, env)
    directory, base = os.path.split(prefix)
    files = files_of(prefix)
    total = sum(os.path.getsize(f) for f in files)
    servers = Servers(directory)
    env.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY, AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=servers.urls["s3"])
    from ckptbridge.io.remote import BLOCK

    out_dir = tempfile.mkdtemp(prefix="remote-bench.", dir=WORK)
    out = os.path.join(out_dir, "out.npz")
    sign = ["--aws-sigv4", f"aws:amz:{REGION}:s3", "--user", f"{KEY}:{KEY}"]
    ops: dict[str, tuple[list[str], str | None]] = {}
    for where in args.where:
        base_url = servers.urls["http"] if where == "http" else servers.urls["s3"] + "/" + BUCKET
        auth = sign if where == "s3" else []
        ops[f"curl {where}"] = (["curl", "-sSf", *auth, *[a for f in files for a in (f"{base_url}/{os.path.basename(f)}", "-o",
                                                                                       os.path.join(out_dir, os.path.basename(f)))]], where)
        # the same bytes in the ranges ckptbridge streams a tensor in (BLOCK), one request each, on one connection
        ranged = ["curl", "-sSf"]
        for f in files:
            for i, r in enumerate(ranges(os.path.getsize(f), BLOCK)):
                ranged += [*(["--next"] if len(ranged) > 2 else []), *auth, "-r", r, f"{base_url}/{os.path.basename(f)}", "-o",
                           os.path.join(out_dir, f"{os.path.basename(f)}.{i}")]
        ops[f"curl {where} {BLOCK >> 20} MiB ranges"] = (ranged, where)
        src = f"{servers.urls['http']}/{base}" if where == "http" else f"s3://{BUCKET}/{base}"
        ops[f"export {where}"] = ([PY, "-m", "ckptbridge", "export", "-q", src, out], where)
    ops["export local"] = ([PY, "-m", "ckptbridge", "export", "-q", prefix, out], None)

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in ops}
    try:
        for run in range(args.runs):
            for key, (cmd, where) in ops.items():
                before = servers.sent()
                rec = measure(cmd, env)
                rec["bytes"] = servers.sent()[where] - before[where] if where is not None else None
                results[key].append(rec)
                print(f"run {run + 1} {key:26s} {rec['wall_s']:7.2f} s  {rec['rss_mb']:7.1f} MB  "
                      f"{'' if rec['bytes'] is None else rec['bytes']}{'  ' + str(rec['error']) if rec['rc'] else ''}", flush=True)
                for f in os.listdir(out_dir):
                    os.remove(os.path.join(out_dir, f))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        servers.stop()

    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    doc = {"model": args.model, "files_bytes": total, "data_bytes": model_bytes(args.model, prefix), "runs": args.runs, "results": results,
           "median_wall_s": med}
    with open(os.path.join(WORK, "remote-results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\n{args.model}: {total / 1e9:.2f} GB in {len(files)} files; medians of {args.runs} run(s)\n")
    print("| operation | wall s | peak RSS MB | bytes from the server | vs curl (whole files) |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        where = k.split()[1]
        ratio = f"{med[k] / med['curl ' + where]:.2f}x" if where in args.where else ""
        rss = statistics.median(r["rss_mb"] for r in v)
        sent = v[-1]["bytes"]
        print(f"| {k} | {med[k]:.2f} | {rss:.0f} | {'' if sent is None else f'{sent:,}'} | {ratio} |")


if __name__ == "__main__":
    main()
