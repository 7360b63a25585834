"""What the tests share, kept once: bit-exact comparison, damaging a file, running the CLI, temporaries.

One home, so a fix to a check reaches every test that relies on it, and a renamed
temporary-file suffix changes here (imported from ckptbridge) instead of leaving a
"nothing left behind" test that checks a name nothing uses any more.

The runners keep each caller's environment, limits and time-outs as keywords:
``cli`` for ``python -m ckptbridge`` in a subprocess, ``run_cli`` for crafted input
(address space capped, bytes out), ``in_process`` for ``cli.main`` in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from ckptbridge.bundle.writer import _PART_SUFFIX as PART_SUFFIX
from ckptbridge.io.atomic import TMP_SUFFIX

#: Every suffix ckptbridge gives a temporary output (files, directories, checkpoint shards).
TEMPORARY_SUFFIXES = (TMP_SUFFIX, PART_SUFFIX)

ERR = "ckptbridge: error: "

#: The environment of the reliability and publish tests' subprocesses: TensorFlow and warnings quiet.
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
#: The CLI tests' environment: stderr unbuffered, so its one line is there however the process ends.
CLI_ENV = dict(os.environ, PYTHONUNBUFFERED="1")
#: Crafted-input runs: one BLAS thread each, so the address-space cap measures ckptbridge, not thread stacks.
ONE_THREAD_ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

UNTRUSTED_AS_LIMIT = 2 << 30  # a refusal of crafted input must come before anything near this is allocated
UNTRUSTED_TIMEOUT = 120.0
SECRET = b"SECRET-7f3a9c1e-do-not-leak-"


# --------------------------------------------------------------------------- bit-exact arrays


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (strings: equal lists of ``bytes``); ``-0.0 != 0.0``, ``nan == nan`` of the same bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return [bytes(x) for x in a.reshape(-1)] == [bytes(x) for x in b.reshape(-1)]
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def assert_same_array(got: Any, want: np.ndarray, name: str) -> None:
    """Bit-exact equality of one tensor in the exchange form (ndarray, true dtype, bytes for strings)."""
    assert isinstance(got, np.ndarray), f"{name}: got {type(got).__name__}, not an ndarray"
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if want.dtype == object:
        g = list(got.reshape(-1))
        assert all(type(x) is bytes for x in g), f"{name}: strings must come back as bytes, got {[type(x).__name__ for x in g][:3]}"
        assert g == list(want.reshape(-1)), f"{name}: strings differ: {g[:4]} != {list(want.reshape(-1))[:4]}"
        return
    if want.dtype == np.dtype(ml_dtypes.bfloat16):
        got, want = got.view(np.uint16), want.view(np.uint16)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{name}: values differ"


# --------------------------------------------------------------------------- damaging files


def flip(path: str | os.PathLike[str], offset: int, mask: int = 0x10) -> None:
    """XOR one byte of a file in place with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def offset_of(path: str | os.PathLike[str], needle: bytes) -> int:
    """Where ``needle`` is in the file; it must be there exactly once."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.count(needle) == 1, f"{len(needle)} bytes found {data.count(needle)} times in {path}"
    return data.index(needle)


def sha(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_digest(directory: str) -> dict[str, str]:
    """name -> SHA-256 of every file directly in ``directory``: to show nothing there changed."""
    return {n: sha(os.path.join(directory, n)) for n in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, n))}


# --------------------------------------------------------------------------- temporaries


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of ckptbridge's temporaries."""
    return any(s in name for s in TEMPORARY_SUFFIXES)


def leftovers(root: str | os.PathLike[str]) -> list[str]:
    """Temporary files and directories anywhere under root."""
    found = []
    for d, dirs, files in os.walk(root):
        found += [os.path.join(d, n) for n in dirs + files if is_temporary(n)]
    return found


# --------------------------------------------------------------------------- running the CLI


def run(argv: Sequence[str], *, cwd: Any = None, env: Mapping[str, str] | None = None, timeout: float = 300, as_limit: int | None = None,
        umask: int | None = None, default_sigint: bool = False, preexec: Callable[[], None] | None = None,
        text: bool = True) -> subprocess.CompletedProcess[Any]:
    """A command in a subprocess, time bounded; optionally under RLIMIT_AS, a umask, SIGINT at its default."""

    def pre() -> None:
        if default_sigint:
            # A child of a non-interactive shell may inherit SIGINT ignored; a user at a terminal has it.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if as_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
        if umask is not None:
            os.umask(umask)
        if preexec is not None:
            preexec()

    needed = default_sigint or as_limit is not None or umask is not None or preexec is not None
    return subprocess.run(list(argv), capture_output=True, text=text, cwd=os.fspath(cwd) if cwd is not None else None,
                          env=dict(env) if env is not None else None, timeout=timeout, preexec_fn=pre if needed else None)


def cli(*args: str, env: Mapping[str, str] = CLI_ENV, **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``python -m ckptbridge ARGS`` as a user runs it (keywords: see :func:`run`)."""
    return run([sys.executable, "-m", "ckptbridge", *args], env=env, **kw)


def popen(*args: str, cwd: Any = None, env: Mapping[str, str] = ENV, as_limit: int | None = None) -> subprocess.Popen[str]:
    """``python -m ckptbridge ARGS`` started and left running, SIGINT at its default (to be signalled)."""

    def pre() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if as_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    return subprocess.Popen([sys.executable, "-m", "ckptbridge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.fspath(cwd) if cwd is not None else None, env=dict(env), preexec_fn=pre)


def run_cli(*args: str, cwd: str, umask: int | None = None, limit: bool = True, as_limit: int = UNTRUSTED_AS_LIMIT,
            timeout: float = UNTRUSTED_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """``python -m ckptbridge ARGS`` on crafted input: a fresh process, address space capped, time bounded, bytes out."""
    return cli(*args, cwd=cwd, env=ONE_THREAD_ENV, as_limit=as_limit if limit else None, umask=umask, timeout=timeout, text=False)


def in_process(*argv: str) -> tuple[int, str, str]:
    """``cli.main(argv)`` in this process (for faults injected with monkeypatch): (status, stdout, stderr)."""
    from ckptbridge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _one_line(rc: int, err: str, status: int, needles: Sequence[str]) -> str:
    assert rc == status, f"exit {rc}, expected {status}; stderr:\n{err[-2000:]}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{err[-2000:]}"
    line = lines[0]
    assert line.startswith(ERR), line
    assert "internal error" not in line, f"an unexpected exception reached the CLI: {line}"
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def error_line(r: subprocess.CompletedProcess[str] | tuple[int, str], *needles: str, status: int = 2) -> str:
    """The one stderr line of a failed command, which says what to do after a ';'.

    Checks the status, that there is one ``ckptbridge: error:`` line and no traceback or internal error.
    """
    rc, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    line = _one_line(rc, err, status, needles)
    assert ";" in line, f"the message should say what to do after a ';': {line}"
    return line


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """As :func:`error_line` (exit 2) without asking for a hint, and nothing on stdout."""
    line = _one_line(proc.returncode, proc.stderr, 2, needles)
    assert proc.stdout == "", proc.stdout
    return line


# --------------------------------------------------------------------------- crafted input


def tree(root: str) -> set[str]:
    """Every path under root, relative to it."""
    out = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def assert_fails(argv: list[str], needles: list[str], root: str, *, as_limit: int = UNTRUSTED_AS_LIMIT,
                 timeout: float = UNTRUSTED_TIMEOUT) -> str:
    """One command fails cleanly: exit 2, one ``ckptbridge: error:`` line containing every
    needle (not an internal error, not out of memory), no secret bytes, no new file under ``root``."""
    before = tree(root)
    r = run_cli(*argv, cwd=root, as_limit=as_limit, timeout=timeout)
    err = r.stderr.decode("utf-8", "replace")
    assert "out of memory" not in err, (argv[0], err[-2000:])
    _one_line(r.returncode, err, 2, needles)
    assert SECRET[:12] not in r.stdout and SECRET[:12] not in r.stderr, argv[0]
    assert tree(root) == before, (argv[0], tree(root) - before)
    return err


def assert_refused(archive: str, needles: list[str], good: str, *, commands: tuple[str, ...] = ("import", "ls", "diff", "verify"),
                   as_limit: int = UNTRUSTED_AS_LIMIT, timeout: float = UNTRUSTED_TIMEOUT) -> None:
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


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A ``.npy`` version 1.0 header, padded as NumPy pads it."""
    d = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    d += b" " * (-(10 + len(d) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d


def write_zip(path: str, members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        for n, b in members.items():
            z.writestr(n, b)


def raw_bundle(prefix: str, entries: dict[bytes, tuple[int, tuple[int, ...], bytes]]) -> None:
    """A one-shard V2 checkpoint with raw keys: key -> (DataType enum, shape, stored bytes)."""
    from ckptbridge.bundle import _entries, _table
    from ckptbridge.io.wire import crc, mask

    table = _table.TableBuilder()
    table.add(b"", _entries.encode_header(1))
    data = bytearray()
    for key in sorted(entries):
        enum, shape, blob = entries[key]
        table.add(key, _entries.encode_entry(enum, shape, 0, len(data), len(blob), mask(crc(blob))))
        data += blob
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(data))
    with open(prefix + ".index", "wb") as f:
        f.write(table.finish())


def write_checkpoint(prefix: str, tensors: Mapping[str, np.ndarray]) -> str:
    """A V2 checkpoint at ``prefix`` holding ``tensors``, written by the native writer alone (no state file)."""
    from ckptbridge.bundle import BundleWriter

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    w = BundleWriter(prefix)
    for name in sorted(tensors):
        w.write(name, tensors[name])
    w.commit()
    return prefix
