"""``archive``: many checkpoints, one export each, with a manifest that makes re-runs cheap.

Each checkpoint found (:mod:`ckptbridge.sources.discover`) is one task: an
:func:`~ckptbridge._api.export` to its mirrored path below the destination, run
in this process (one job), in a pool of local processes, or on a Dask cluster.
A task never raises: a checkpoint that cannot be converted is an outcome with
its error, and the others go on.  After each checkpoint the manifest
(:mod:`ckptbridge.io.manifest`) is rewritten whole, so it is true at every
moment: what it calls done is at the destination, whole, as it records.

A re-run compares each checkpoint with its entry: the same source files (sizes
and mtimes or ETags), the same options, the output still there with the identity
recorded: skipped.  Anything else is redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._options import Naming, Port, ReadOptions, Workers
from .errors import CkptBridgeError, FormatError, MissingDependencyError
from .io.manifest import Destination, identity_of
from .reports import ArchiveEntry, ArchiveReport
from .sources.discover import Found, discover

DONE, SKIPPED, FAILED, INCOMPLETE = "done", "skipped", "failed", "incomplete"
#: a manifest up to this size is rewritten after every checkpoint (about 1,500 entries)
SMALL_MANIFEST = 1 << 20
#: a larger one at most this often, in seconds: 10,000 rewrites of a 6 MB manifest would be 30 GB of writes
MANIFEST_EVERY = 10.0


@dataclasses.dataclass(frozen=True)
class Task:
    """One checkpoint's export: everything a worker needs, by value (it is pickled to other processes and machines)."""

    rel: str
    source: str
    output: str
    naming: Naming | Port
    read: ReadOptions | None
    compress: bool
    fsync: bool


def run_task(task: Task) -> dict[str, Any]:
    """Export one checkpoint; its outcome, never an exception (a signal excepted)."""
    from . import _api
    from .io.remote import redact

    try:
        report = _api.export(task.source, task.output, task.naming, read=task.read, compress=task.compress, force=True,
                             fsync=task.fsync)
    except CkptBridgeError as e:
        return {"status": FAILED, "error": " ".join(str(e).split())}
    except OSError as e:
        where = redact(str(e.filename)) if e.filename else redact(task.source)
        return {"status": FAILED, "error": f"{e.strerror or e}: {where}"}
    except MemoryError:
        return {"status": FAILED, "error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - one checkpoint's bug must not stop the others; its line says what it was
        return {"status": FAILED, "error": f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"}
    return {"status": DONE, "error": None, "tensors": len(report.written), "bytes": report.nbytes,
            "checksum": content_checksum(report.checksums), "file_checksum": getattr(report, "checksum", None),
            "output_identity": identity_of(task.output)}


def content_checksum(crcs: dict[str, int]) -> str:
    """One checksum of an output's tensors: SHA-256 over each name and the crc32c of its bytes.

    The crc32c values are the ones the export's read-back found in the output, so the
    output is not read a second time for this."""
    h = hashlib.sha256()
    for name in sorted(crcs):
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + crcs[name].to_bytes(4, "little"))
    return "sha256-crc32c:" + h.hexdigest()


def options_key(naming: Naming | Port, read: ReadOptions | None, fmt: str, compress: bool) -> str:
    """A short digest of everything that decides an output's bytes: changing any of it redoes the checkpoint."""
    doc = {"naming": repr(naming), "read": repr(read or ReadOptions()), "format": fmt, "compress": compress}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- what to do


@dataclasses.dataclass
class _Plan:
    todo: list[tuple[Found, Task]]
    entries: list[ArchiveEntry]  # skipped and incomplete, decided without running anything


def _find_all(sources: Sequence[str], dest: Destination) -> list[Found]:
    found: dict[str, Found] = {}
    for s in sources:
        for f in discover(s, skip=dest.contains):
            if f.rel in found and found[f.rel].source != f.source:
                raise FormatError(f"{found[f.rel].source} and {f.source} would both be archived as {f.rel}; "
                                  "give their common parent directory as the source instead")
            found[f.rel] = f
    return [found[k] for k in sorted(found)]


def _plan(found: list[Found], dest: Destination, manifest: dict[str, dict[str, Any]], suffix: str, key: str, force: bool,
          make: Callable[[Found, str], Task]) -> _Plan:
    from .io.remote import redact

    plan = _Plan([], [])
    for f in found:
        rel = f.rel + suffix
        shown = redact(f.source)
        if f.incomplete is not None:
            plan.entries.append(ArchiveEntry(shown, dest.shown_output(rel), INCOMPLETE, error=f.incomplete, rel=rel))
            continue
        old = manifest.get(rel)
        if not force and old is not None and _up_to_date(old, f, key, dest, rel):
            plan.entries.append(ArchiveEntry(shown, dest.shown_output(rel), SKIPPED, tensors=int(old.get("tensors", 0)),
                                             nbytes=int(old.get("bytes", 0)), rel=rel))
            continue
        plan.todo.append((f, make(f, rel)))
    return plan


def _up_to_date(entry: dict[str, Any], f: Found, key: str, dest: Destination, rel: str) -> bool:
    """Whether ``entry`` says ``f`` was archived as it is now, with these options, and the output is still what it recorded."""
    if entry.get("status") != DONE or entry.get("options") != key:
        return False
    if entry.get("source_files") != {n: list(i) for n, i in f.files.items()}:
        return False
    recorded = entry.get("output_identity")
    return recorded is not None and dest.identity(rel) == recorded


def _entry_doc(f: Found, rel: str, dest: Destination, key: str, outcome: dict[str, Any]) -> dict[str, Any]:
    from .io.remote import redact

    return {"rel": rel, "source": redact(f.source), "source_files": {n: list(i) for n, i in f.files.items()},
            "source_bytes": f.nbytes, "output": dest.shown_output(rel), "options": key, "status": outcome["status"],
            "error": outcome.get("error"), "tensors": outcome.get("tensors", 0), "bytes": outcome.get("bytes", 0),
            "checksum": outcome.get("checksum"), "file_checksum": outcome.get("file_checksum"),
            "output_identity": outcome.get("output_identity")}


# --------------------------------------------------------------------------- the verb


def archive(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    naming: Naming | Port | None = None,
    *,
    format: str = "h5",  # noqa: A002 - the word users know (--format)
    read: ReadOptions | None = None,
    compress: bool = False,
    force: bool = False,
    workers: Workers | None = None,
    progress: bool | None = False,
    fsync: bool = True,
    dry_run: bool = False,
    on_entry: Callable[[ArchiveEntry], None] | None = None,
) -> ArchiveReport:
    """Export every checkpoint under ``sources`` to ``dest``, mirroring their paths; resumable.

    A source is a checkpoint, a directory (every checkpoint under it, recursively: each
    ``model.ckpt-N``, V1 files, SavedModels), a glob, or a URL (a checkpoint or a prefix,
    ``s3://bucket/runs/``).  ``dest`` is a local directory or a URL prefix:
    ``runs/a/model.ckpt-1000`` becomes ``dest/runs/a/model.ckpt-1000.h5``.  ``format`` is a
    suffix of :mod:`ckptbridge.formats` without its dot (``"h5"``, ``"npz"``, ``"safetensors"``);
    ``naming``, ``read``, ``compress`` and ``fsync`` are :func:`export`'s.

    ``dest/manifest.jsonl`` records each checkpoint (its files' sizes and mtimes or ETags,
    the output, its tensors, bytes and checksum, the status and error), rewritten whole
    after each one (past 1 MiB, at most every 10 s and at the end).  A checkpoint whose entry, files and output still agree is skipped;
    ``force`` redoes it.  One that fails is recorded and the others go on; one still being
    written is listed as incomplete and left for the next run.  ``workers`` says where
    the exports run (:class:`Workers`: local processes, or a Dask cluster).
    ``on_entry`` is called with each checkpoint's :class:`ArchiveEntry` as it is decided.

    Returns:
        An :class:`ArchiveReport` (``done``, ``skipped``, ``failed``, ``incomplete``).

    Example::

        r = ckptbridge.archive("runs/", "s3://bucket/archive/", workers=ckptbridge.Workers(jobs=4))
        r.failed    # [] when every checkpoint was archived
    """
    from . import formats
    from ._api import _naming, _path

    listed = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not listed:
        raise CkptBridgeError("no source given; name checkpoints, directories, globs or URLs to archive")
    paths = [_path(s) for s in listed]
    fmt = formats.for_path("x." + format)
    if fmt is None:
        raise FormatError(f"no archive format {format!r}; the formats: {', '.join(s[1:] for s in formats.suffixes())}")
    naming = _naming(naming)
    workers = workers or Workers()
    destination = Destination(_path(dest))
    found = _find_all(paths, destination)
    if not found:
        raise CkptBridgeError(f"no checkpoint found under {', '.join(paths)}; check the paths")
    key = options_key(naming, read, fmt.name, compress)
    manifest = destination.read_manifest()
    plan = _plan(found, destination, manifest, "." + format, key, force,
                 lambda f, rel: Task(rel, f.source, destination.output(rel), naming, read, compress, fsync))
    report = ArchiveReport(destination.shown + "/" + "manifest.jsonl" if destination.remote else destination.manifest)
    for e in plan.entries:
        report.entries.append(e)
        if on_entry is not None:
            on_entry(e)
    if dry_run:
        from .io.remote import redact

        report.entries.extend(ArchiveEntry(redact(t.source), destination.shown_output(t.rel), "todo", rel=t.rel) for _, t in plan.todo)
        return report
    for e in plan.entries:  # listed for whoever reads the manifest; a done entry is not forgotten while its source is rewritten
        if e.status == INCOMPLETE and manifest.get(e.rel, {}).get("status") != DONE:
            manifest[e.rel] = {"rel": e.rel, "source": e.source, "output": e.output, "status": INCOMPLETE, "error": e.error}
    _run(plan, destination, manifest, key, workers, progress, report, on_entry)
    return report


def _run(plan: _Plan, dest: Destination, manifest: dict[str, dict[str, Any]], key: str, workers: Workers, progress: bool | None,
         report: ArchiveReport, on_entry: Callable[[ArchiveEntry], None] | None) -> None:
    from .io.progress import bar

    by_rel = {t.rel: (f, t) for f, t in plan.todo}
    for _, t in plan.todo:
        dest.prepare(t.rel)
    total = len(plan.todo)
    pbar = bar(sum(f.nbytes for f, _ in plan.todo), "archive", progress)
    pbar.set_postfix_str(f"0/{total} checkpoints")
    writer = _ManifestWriter(dest, manifest)
    try:
        if plan.entries or plan.todo:
            writer.write()
        for n, (rel, outcome) in enumerate(_outcomes([t for _, t in plan.todo], workers), 1):
            f, _ = by_rel[rel]
            manifest[rel] = _entry_doc(f, rel, dest, key, outcome)
            writer.changed()
            entry = ArchiveEntry(manifest[rel]["source"], manifest[rel]["output"], outcome["status"], error=outcome.get("error"),
                                 tensors=outcome.get("tensors", 0), nbytes=outcome.get("bytes", 0), rel=rel)
            report.entries.append(entry)
            if on_entry is not None:
                on_entry(entry)
            pbar.update(f.nbytes)
            pbar.set_postfix_str(f"{n}/{total} checkpoints")
        writer.flush()
    finally:
        pbar.close()


class _ManifestWriter:
    """Rewrites the manifest after each checkpoint, until rewriting it whole each time would cost more than the
    checkpoints: past :data:`SMALL_MANIFEST` bytes, at most every :data:`MANIFEST_EVERY` seconds (and at the end).
    What a stop in between leaves out is only not recorded: the next run redoes it."""

    def __init__(self, dest: Destination, entries: dict[str, dict[str, Any]]) -> None:
        self._dest, self._entries = dest, entries
        self._last = 0.0
        self._size = 0
        self._dirty = False

    def write(self) -> None:
        import time

        self._size = self._dest.write_manifest(self._entries)
        self._last = time.monotonic()
        self._dirty = False

    def changed(self) -> None:
        import time

        self._dirty = True
        if self._size < SMALL_MANIFEST or time.monotonic() - self._last >= MANIFEST_EVERY:
            self.write()

    def flush(self) -> None:
        if self._dirty:
            self.write()


def _outcomes(tasks: list[Task], workers: Workers) -> Iterator[tuple[str, dict[str, Any]]]:
    """(rel, outcome) of each task, in the order they finish."""
    if not tasks:
        return
    if workers.scheduler is not None:
        yield from _on_dask(tasks, workers.scheduler)
        return
    jobs = workers.jobs if workers.jobs is not None else (os.cpu_count() or 1)
    if jobs <= 1 or len(tasks) == 1:
        for t in tasks:
            yield t.rel, run_task(t)
        return
    yield from _in_pool(tasks, min(jobs, len(tasks)))


# --------------------------------------------------------------------------- local processes

_in_task = False


def _worker_init() -> None:
    """A pool worker: SIGINT is the parent's to handle (a Ctrl-C reaches the whole process group); SIGTERM,
    which the parent sends to stop it, unwinds the export under way so its temporary is removed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum: int, frame: Any) -> None:
    from .io import signals

    if not _in_task:
        os._exit(143)  # between tasks: nothing to clean up
    signals.cli_handler(signum, frame)


def _pool_task(task: Task) -> tuple[str, dict[str, Any]]:
    """:func:`run_task` in a pool worker, stopped cleanly by SIGTERM."""
    global _in_task
    from .io import atomic, signals

    _in_task = True
    try:
        with signals.interruptible():
            outcome = run_task(task)
    except BaseException:  # noqa: BLE001 - the parent's SIGTERM: the export has unwound, its sink aborted
        atomic.discard_pending()
        signals.release()
        os._exit(143)
    finally:
        _in_task = False
    if signals.signalled() is not None:
        os._exit(143)
    return task.rel, outcome


def _start_method() -> str:
    """How pool workers start.  Forked from this process, a worker starts with ckptbridge imported (a second
    or more saved per worker).  With another thread alive (fsspec's event loop after a listing at a URL,
    TensorFlow's own pools in a program that imported it) a fork could copy a lock that thread holds, so the
    workers then start from the fork server's clean process instead."""
    import threading

    return "fork" if threading.active_count() == 1 and "tensorflow" not in sys.modules else "forkserver"


def _in_pool(tasks: list[Task], jobs: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """The tasks in ``jobs`` local processes, at most ``jobs`` in flight.

    A worker that dies (the kernel's OOM killer, a crash in a native library) breaks the pool, and
    every export then in flight with it: those are tried again in a new pool, one at a time, and the
    one whose worker dies while it runs alone is a failure of its own; the others go on.  On the way
    out (a signal, an error of the caller) every worker is sent SIGTERM and waited for: each export
    under way removes its temporary first."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context(_start_method())
    queue = list(reversed(tasks))
    suspects: list[Task] = []  # in flight when a pool broke: run alone, to tell which one broke it
    while queue or suspects:
        pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init)
        running: dict[Any, Task] = {}
        try:
            while queue or suspects or running:
                while len(running) < (1 if suspects else jobs) and (suspects or queue):
                    t = suspects.pop() if suspects else queue.pop()
                    running[pool.submit(_pool_task, t)] = t
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                if not any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    for f in done:
                        running.pop(f)
                        yield f.result()
                    continue
                alone = len(running) == 1
                for f, t in running.items():
                    if f.done() and f.exception() is None:
                        yield f.result()
                    elif alone:
                        yield t.rel, {"status": FAILED, "error": "the worker process exporting it died (killed: out of memory?)"}
                    else:
                        suspects.append(t)
                break
        finally:
            _stop(pool)


def _stop(pool: Any) -> None:
    """Stop a pool's workers: SIGTERM unwinds an export under way (its temporary removed), then wait for them."""
    procs = getattr(pool, "_processes", None) or {}  # the executor's worker processes: it has no public handle on them
    for p in list(procs.values()):
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- a Dask cluster


def _on_dask(tasks: list[Task], address: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The tasks on the Dask cluster at ``address``, one task each; what was not finished is cancelled on the way out."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise MissingDependencyError("archiving on a Dask cluster needs Dask's distributed scheduler; install it with: "
                                     "pip install 'ckptbridge[dask]'") from None
    try:
        client = Client(address, timeout="30s")
    except OSError as e:
        raise CkptBridgeError(f"cannot reach the Dask scheduler at {address} ({e}); check the address and that it runs") from None
    futures = {}
    try:
        for t in tasks:
            futures[client.submit(run_task, t, key=f"ckptbridge-archive-{_token(t)}", pure=False, retries=0)] = t
        for fut in as_completed(list(futures)):
            t = futures[fut]
            try:
                outcome = fut.result()
            except Exception as e:  # noqa: BLE001 - the worker died or the task was lost: this checkpoint failed
                outcome = {"status": FAILED, "error": f"the Dask task failed: {type(e).__name__}: {' '.join(str(e).split())}"}
            yield t.rel, outcome
    finally:
        client.cancel(list(futures), force=True)
        client.close()


def _token(t: Task) -> str:
    return hashlib.sha256(f"{t.source}\0{t.output}\0{os.getpid()}\0{id(t)}".encode()).hexdigest()[:16]

