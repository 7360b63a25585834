"""Each command's fixed cost, and the graph-free import of a 512 MiB checkpoint, before and after a change.

    python benchmarks/startup.py --against main            # this tree against main: small commands, 7 runs
    python benchmarks/startup.py --against a1d4b82 --big   # also the 512 MiB export and imports, and their floors

The small checkpoint is float32 (17 tensors, 75 KB, written by the native writer), so what each
command costs is starting Python and what it imports.  ``--against REV`` extracts that revision
with ``git archive`` into benchmarks/work/startup/REV and runs each command on both trees in turn,
alternating.  Both run from compiled bytecode, as an installed package does (``run.NO_BYTECODE_VARS``).
Each row is the median of the runs: wall seconds, and CPU seconds (user + system of that process,
from ``wait4``), which on a shared machine moves much less than the wall time.  "modules" is how
many modules the command imported (``sys.modules`` as it exits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from run import NO_BYTECODE_VARS, PY, ROOT, WORK, measure

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(WORK, "startup")

# sys.modules of `python -m ckptbridge ARGS`, written to $OUT as the process exits
_LIST_MODULES = r"""
import atexit, json, os, runpy, sys
atexit.register(lambda: open(os.environ["OUT"], "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "ckptbridge"
runpy.run_module("ckptbridge", run_name="__main__", alter_sys=True)
"""


def tree(rev: str | None) -> str:
    """The source tree of ``rev`` (None: this one), compiled."""
    if rev is None:
        root = ROOT
    else:
        root = os.path.join(BASE, "rev-" + rev.replace("/", "_"))
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        archive = subprocess.run(["git", "archive", rev, "ckptbridge"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    subprocess.run([PY, "-m", "compileall", "-q", os.path.join(root, "ckptbridge")], check=True, env=env_for(root),
                   stdout=subprocess.DEVNULL)
    return root


def env_for(root: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NO_BYTECODE_VARS}
    return dict(env, PYTHONPATH=root, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")


def inputs(big: bool) -> dict[str, str]:
    """The small float32 checkpoint and its .npz; with ``big`` a 512 MiB one and its .npz and .safetensors."""
    made = {"small": os.path.join(BASE, "small", "model.ckpt"), "small_npz": os.path.join(BASE, "small.npz")}
    if big:
        made.update(big=os.path.join(BASE, "big", "model.ckpt"), big_npz=os.path.join(BASE, "big.npz"),
                    big_st=os.path.join(BASE, "big.safetensors"))
    code = r"""
import os, sys
import numpy as np
from ckptbridge.bundle.writer import BundleWriter
prefix, rows = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.dirname(prefix), exist_ok=True)
rng = np.random.default_rng(0)
w = BundleWriter(prefix)
w.write("global_step", np.array(7, np.int64))
for i in range(8):
    w.write(f"net/layer{i}/biases", rng.standard_normal(rows).astype(np.float32))
    w.write(f"net/layer{i}/weights", rng.standard_normal((rows, rows)).astype(np.float32))
w.commit()
"""
    env = env_for(ROOT)
    for key, rows in (("small", 48), ("big", 4096)):
        if key in made and not os.path.exists(made[key] + ".index"):
            subprocess.run([PY, "-c", code, made[key], str(rows)], check=True, env=env)
    for key, src in (("small_npz", "small"), ("big_npz", "big"), ("big_st", "big")):
        if key in made and not os.path.exists(made[key]):
            subprocess.run([PY, "-m", "ckptbridge", "export", "-q", made[src], made[key]], check=True, env=env, cwd=ROOT)
    return made


def commands(made: dict[str, str], out: str, big: bool) -> dict[str, list[str]]:
    s, a = made["small"], made["small_npz"]
    cmds = {
        "ls": ["ls", s], "export .npz": ["export", "-q", s, f"{out}/m.npz"], "export .h5": ["export", "-q", s, f"{out}/m.h5"],
        "export .safetensors": ["export", "-q", s, f"{out}/m.safetensors"], "import (graph-free)": ["import", "-q", a, f"{out}/g/model.ckpt"],
        "verify": ["verify", s], "diff": ["diff", s, a], "maps": ["maps"], "--help": ["--help"],
    }
    if big:
        cmds.update({
            "512 MiB: export .npz --no-fsync": ["export", "-q", "--no-fsync", made["big"], f"{out}/b.npz"],
            "512 MiB: import from .npz --no-fsync": ["import", "-q", "--no-fsync", made["big_npz"], f"{out}/gb/model.ckpt"],
            "512 MiB: import from .npz": ["import", "-q", made["big_npz"], f"{out}/gd/model.ckpt"],
            "512 MiB: import from .safetensors --no-fsync": ["import", "-q", "--no-fsync", made["big_st"], f"{out}/gs/model.ckpt"],
        })
    return cmds


def floors(made: dict[str, str], out: str, big: bool) -> dict[str, list[str]]:
    got = {'python -c "import numpy"': [PY, "-c", "import numpy"]}
    if big:
        got["512 MiB: cp of the .npz"] = ["cp", made["big_npz"], f"{out}/c.npz"]
        got["512 MiB: cp + sync of the .npz"] = ["sh", "-c", 'cp "$0" "$1" && sync "$1"', made["big_npz"], f"{out}/c.npz"]
    return got


def modules(args: list[str], root: str, out: str) -> int:
    with tempfile.TemporaryDirectory() as d:
        listing = os.path.join(d, "modules.json")
        _fresh(out)
        subprocess.run([PY, "-c", _LIST_MODULES, *args], env=dict(env_for(root), OUT=listing), check=True, capture_output=True, cwd=BASE)
        with open(listing) as f:
            return len(json.load(f))


def _fresh(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="REV", help="also measure this git revision, alternating with this tree")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--big", action="store_true", help="also the 512 MiB export and graph-free imports, against cp and cp + sync")
    args = p.parse_args()
    sides = {"this tree": tree(None)}
    if args.against:
        sides = {args.against: tree(args.against), **sides}
    made = inputs(args.big)
    out = os.path.join(BASE, "out")
    cmds, base = commands(made, out, args.big), floors(made, out, args.big)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.runs):
        for label, cmd in base.items():
            _fresh(out)
            runs.setdefault((label, "floor"), []).append(measure(cmd, env_for(ROOT), cwd=BASE))
        for label, cli in cmds.items():
            for side, root in sides.items():
                _fresh(out)
                res = measure([PY, "-m", "ckptbridge", *cli], env_for(root), cwd=BASE)  # not ROOT: `-m` looks in the cwd first
                if res["rc"] not in (0, 1):  # diff and verify say 1 for "different"
                    sys.exit(f"{label} on {side} failed: {res['error']}")
                runs.setdefault((label, side), []).append(res)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{args.runs} runs each, medians; load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs\n")
    print("| command | tree | wall s | CPU s | peak RSS MB | modules |\n|---|---|---|---|---|---|")
    for (label, side), got in runs.items():
        wall, cpu, rss = (statistics.median(r[k] for r in got) for k in ("wall_s", "cpu_s", "rss_mb"))
        n = modules(cmds[label], sides[side], out) if label in cmds else None
        print(f"| {label} | {side} | {wall:.3f} | {cpu:.3f} | {rss:.0f} | {'' if n is None else n} |")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
