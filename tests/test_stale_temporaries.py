"""Temporaries of killed runs: the next output to the same destination removes them, or names them (issue 21).

On f835772 a SIGKILL mid-export left ``.o.npz.XXXX.ckptbridge-tmp`` (100 MB in the
report) beside the destination for good: later runs neither removed nor
mentioned it.  A temporary's name now records its writer (pid, start time, boot
and PID namespace), and a later writer of the same destination removes it once
that process is provably gone, leaving a live writer's alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge.io import atomic as _atomic

from helpers import ENV, TMP_SUFFIX, leftovers, write_checkpoint
from helpers import cli as _cli

TIMEOUT = 120
TENSORS = {"a/kernel": np.arange(4 << 18, dtype=np.float32).reshape(1024, 1024), "a/bias": np.ones(7, np.float64)}


def cli(*args: str, cwd: Any) -> subprocess.CompletedProcess[str]:
    return _cli(*args, cwd=cwd, env=ENV, default_sigint=True, timeout=TIMEOUT)


# `python -m ckptbridge ARGS`, as a user runs it, except that the process sends itself SIG (KILL or STOP)
# at the moment it would publish its output: every tensor written to the temporary, nothing renamed.
_STOPS_BEFORE_PUBLISHING = textwrap.dedent("""
    import os, runpy, signal, sys
    from ckptbridge.io import atomic as _atomic
    sig = getattr(signal, sys.argv.pop(1))
    def stop(commit):
        def run(self):
            os.kill(os.getpid(), sig)
            return commit(self)
        return run
    _atomic.AtomicFile.commit = stop(_atomic.AtomicFile.commit)
    _atomic.AtomicCheckpoint.commit = stop(_atomic.AtomicCheckpoint.commit)
    sys.argv[0] = "ckptbridge"
    runpy.run_module("ckptbridge", run_name="__main__", alter_sys=True)
""")


def _start(sig: str, *args: str, cwd: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _STOPS_BEFORE_PUBLISHING, sig, *args], cwd=str(cwd), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temporaries(directory: Any) -> list[str]:
    return sorted(os.path.basename(p) for p in leftovers(str(directory)) if TMP_SUFFIX in os.path.basename(p))


def _wait_stopped(p: subprocess.Popen[str]) -> None:
    end = time.monotonic() + TIMEOUT
    while True:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert p.poll() is None and time.monotonic() < end, "the writer never reached its commit"
        time.sleep(0.01)


def _commands(tmp_path: Any, out: str) -> list[str]:
    src = write_checkpoint(str(tmp_path / "src" / "model.ckpt"), TENSORS)
    if out.endswith(".ckpt"):
        ckptbridge.export(src, str(tmp_path / "src.npz"))
        return ["import", str(tmp_path / "src.npz"), out]
    return ["export", src, out]


@pytest.mark.parametrize("out", ["out.npz", "out.h5", "ck/model.ckpt"])
def test_a_killed_runs_temporary_is_removed_by_the_next_run_which_says_so(tmp_path: Any, out: str) -> None:
    args = _commands(tmp_path, out)
    killed = _start("SIGKILL", *args, cwd=tmp_path)
    killed.communicate(timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".{os.path.basename(out)}.{killed.pid}-"), left
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(tmp_path / os.path.dirname(out) / left[0]) for n in ns) \
        if os.path.isdir(tmp_path / os.path.dirname(out) / left[0]) else os.path.getsize(tmp_path / left[0])
    assert size > 4 << 20, "the killed run's temporary should hold what it wrote"

    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("removed ")]
    assert len(said) == 1, r.stderr
    assert left[0] in said[0] and f"pid {killed.pid} is gone" in said[0] and "MiB" in said[0], said[0]
    assert _temporaries(tmp_path) == [], "the killed run's temporary is still there"
    with ckptbridge.read(str(tmp_path / out)) as got:
        assert {n: got[n].tobytes() for n in got} == {n: a.tobytes() for n, a in TENSORS.items()}

    r = cli(*args, "--force", cwd=tmp_path)  # nothing stale any more: nothing said
    assert r.returncode == 0 and "removed" not in r.stderr and "left" not in r.stderr, r.stderr


def test_a_live_writers_temporary_is_left_alone(tmp_path: Any) -> None:
    args = _commands(tmp_path, "out.npz")
    writer = _start("SIGSTOP", *args, cwd=tmp_path)  # alive, its temporary whole, about to publish
    try:
        _wait_stopped(writer)
        theirs = _temporaries(tmp_path)
        assert len(theirs) == 1, theirs
        before = os.stat(tmp_path / theirs[0])

        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "removed" not in r.stderr and "left" not in r.stderr, r.stderr
        assert _temporaries(tmp_path) == theirs, "a live writer's temporary was touched"
        after = os.stat(tmp_path / theirs[0])
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    finally:
        writer.send_signal(signal.SIGCONT)
    _, err = writer.communicate(timeout=TIMEOUT)
    assert writer.returncode == 2 and "written meanwhile by another process" in err, err  # the first to publish won
    assert _temporaries(tmp_path) == []


def _name(dest: str, owner: str, random: str = "abcdefgh") -> str:
    return f".{dest}.{owner}.{random}{TMP_SUFFIX}" if owner else f".{dest}.{random}{TMP_SUFFIX}"


def test_only_a_writer_provably_gone_is_removed(tmp_path: Any) -> None:
    """A pid that runs another process now (a later start time) is gone; this test's own process, an older
    name, another boot and another user's file are left, each named once with the reason."""
    me = _atomic.owner_tag()
    if me is None:
        pytest.skip("no /proc here: temporaries record no writer")
    pid, start, where = me.split("-")
    src = write_checkpoint(str(tmp_path / "src" / "model.ckpt"), {"w": np.zeros(3, np.float32)})
    files = {
        "reused pid": _name("out.npz", f"{pid}-{int(start) + 1}-{where}"),
        "live": _name("out.npz", me),
        "unowned": _name("out.npz", ""),
        "other boot": _name("out.npz", f"{pid}-{start}-{'0' * 8 if where != '0' * 8 else '1' * 8}"),
        "another destination": _name("out.npz.1-2-abcdefab.x", f"1-2-{where}"),
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"x" * 3000)
    others = os.geteuid() == 0
    if others:
        files["another user"] = _name("out.npz", f"4000000-1-{where}", "zzzzzzzz")
        (tmp_path / files["another user"]).write_bytes(b"y")
        os.chown(tmp_path / files["another user"], 65534, 65534)

    r = cli("export", src, "out.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert not (tmp_path / files["reused pid"]).exists()
    assert any(line.startswith("removed 1 temporary") and files["reused pid"] in line for line in lines), r.stderr
    for what, why in (("unowned", "does not record which process"), ("other boot", "another machine, boot or container"),
                      ("another user", "another user")):
        if what == "another user" and not others:
            continue
        assert (tmp_path / files[what]).exists(), what
        named = [line for line in lines if files[what] in line]
        assert len(named) == 1 and named[0].startswith("left ") and why in named[0] and "delete it" in named[0], (what, r.stderr)
    for what in ("live", "another destination"):
        assert (tmp_path / files[what]).exists() and files[what] not in r.stderr, what


def test_a_killed_forced_replaces_previous_checkpoint_is_never_removed(tmp_path: Any) -> None:
    where = _atomic.owner_tag()
    if where is None:
        pytest.skip("no /proc here: temporaries record no writer")
    ck = tmp_path / "ck"
    write_checkpoint(str(ck / "model.ckpt"), {"w": np.zeros(3, np.float32)})
    kept = ck / _name("model.ckpt", f"4000000-1-{where.split('-')[2]}") / _atomic.PREVIOUS_DIR
    write_checkpoint(str(kept / "model.ckpt"), {"w": np.ones(3, np.float32)})
    ckptbridge.export(str(ck / "model.ckpt"), str(tmp_path / "a.npz"))
    r = cli("import", str(tmp_path / "a.npz"), str(ck / "model.ckpt"), "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(str(kept / "model.ckpt.index")), "the only whole copy of the old checkpoint was removed"
    assert "holds the previous checkpoint of a forced replace" in r.stderr, r.stderr


def test_the_library_records_what_it_removed_and_prints_nothing(tmp_path: Any, capsys: Any) -> None:
    me = _atomic.owner_tag()
    if me is None:
        pytest.skip("no /proc here: temporaries record no writer")
    src = write_checkpoint(str(tmp_path / "src" / "model.ckpt"), {"w": np.zeros(3, np.float32)})
    stale = tmp_path / _name("out.h5", f"4000000-1-{me.split('-')[2]}")
    stale.write_bytes(b"z" * 10)
    before = len(_atomic.stale_notes())
    ckptbridge.export(src, str(tmp_path / "out.h5"))
    notes = _atomic.stale_notes()[before:]
    assert [(n.action, os.path.basename(n.path), n.nbytes, n.pid) for n in notes] == [("removed", stale.name, 10, 4000000)]
    assert not stale.exists()
    assert capsys.readouterr() == ("", "")
