"""Shared by the tests that feed ckptbridge crafted input (test_untrusted.py,
test_hostile_archives.py): run the real command line in a subprocess whose
address space is capped (RLIMIT_AS) and whose run time is bounded, and check
that it refuses with one line, exit status 2 and nothing written.

A refusal that came only after a large allocation shows up as "out of memory"
(or a kill) instead of the expected message; one that came only after a long
computation shows up as a timeout.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

AS_LIMIT = 2 << 30  # a refusal must come before anything near this is allocated
TIMEOUT = 120.0
SECRET = b"SECRET-7f3a9c1e-do-not-leak-"


def run_cli(*args: str, cwd: str, umask: int | None = None, limit: bool = True, as_limit: int = AS_LIMIT,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """``python -m ckptbridge ARGS`` in a fresh process, address space capped, time bounded."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def pre() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, "-m", "ckptbridge", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout, preexec_fn=pre)


def tree(root: str) -> set[str]:
    out = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def assert_fails(argv: list[str], needles: list[str], root: str, *, as_limit: int = AS_LIMIT, timeout: float = TIMEOUT) -> str:
    """One command fails cleanly: exit 2, one ``ckptbridge: error:`` line containing every
    needle (not an internal error, not out of memory), no secret bytes, no new file under ``root``."""
    before = tree(root)
    r = run_cli(*argv, cwd=root, as_limit=as_limit, timeout=timeout)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (argv[0], r.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptbridge: error: "), (argv[0], err[-2000:])
    assert "out of memory" not in err and "internal error" not in err, (argv[0], err)
    for n in needles:
        assert n in err, (argv[0], n, err)
    assert SECRET[:12] not in r.stdout and SECRET[:12] not in r.stderr, argv[0]
    assert tree(root) == before, (argv[0], tree(root) - before)
    return err


def assert_refused(archive: str, needles: list[str], good: str, *, commands: tuple[str, ...] = ("import", "ls", "diff", "verify"),
                   as_limit: int = AS_LIMIT, timeout: float = TIMEOUT) -> None:
    """Every reading command refuses ``archive`` (see :func:`assert_fails`)."""
    root = os.path.dirname(archive)
    argvs = {
        "import": ["import", archive, os.path.join(root, "out", "model.ckpt")],
        "export": ["export", archive, os.path.join(root, "out.npz")],
        "ls": ["ls", "--json", archive],
        "diff": ["diff", good, archive],
        "verify": ["verify", archive],
    }
    for cmd in commands:
        assert_fails(argvs[cmd], needles, root, as_limit=as_limit, timeout=timeout)


# --- crafting .npz members ---------------------------------------------------------


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    d = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    d += b" " * (-(10 + len(d) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d


def write_zip(path: str, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for n, b in members.items():
            z.writestr(n, b)


# --- fixtures (import them into a test module to use them) ---------------------------


@pytest.fixture()
def secret(tmp_path) -> str:
    """A file the archive must not be able to read: 4 KiB of a recognisable token."""
    p = tmp_path / "secret.bin"
    p.write_bytes((SECRET * 200)[:4096])
    return str(p)


@pytest.fixture()
def good_npz(tmp_path) -> str:
    p = str(tmp_path / "good.npz")
    np.savez(p, w=np.arange(6, dtype=np.float32))
    return p
