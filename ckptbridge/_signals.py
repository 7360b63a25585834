"""Signals deferred around work that must not be cut in half.

The CLI's SIGINT/SIGTERM handler records the signal here (:func:`note_signal`)
and raises it at once, unless the process is inside a block that defers it:
:func:`signals_deferred` (a rename sequence, a cleanup) or
:func:`raise_signals_after` (a call into C++ that calls back into Python).
Such a block raises the recorded signal when it ends.  The outputs
(:mod:`._atomic`) consult :func:`raise_if_signalled` before they commit.

The standard library only: the CLI imports this before NumPy and the rest.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# The signal the CLI received, if any.  Its handler raises KeyboardInterrupt (or its
# SIGTERM exception) at once, but an exception raised while Python runs inside a
# C++ callback can be swallowed there (TensorFlow's pybind11 reader prints
# "KeyboardInterrupt: <EMPTY MESSAGE>" and carries on).  So nothing is ever
# committed once a signal has arrived: commit() raises again instead.
_signal_exc: BaseException | None = None


def note_signal(exc: BaseException) -> None:
    """Record that the process was told to stop; every later commit raises ``exc`` instead."""
    global _signal_exc, _signal_pending
    _signal_exc = exc
    _signal_pending = True


def raising_signal() -> None:
    """The handler is about to raise the recorded signal itself: it is no longer pending."""
    global _signal_pending
    _signal_pending = False


def signalled() -> BaseException | None:
    """The exception of the signal the process was told to stop by, if any."""
    return _signal_exc


def reset() -> None:
    """Forget a signal that stopped an earlier command of this process (``cli.main`` run again)."""
    global _signal_exc, _signal_pending
    _signal_exc = None
    _signal_pending = False


def release() -> None:
    """The command the signal stopped has returned: free what its unwinding still holds.

    The recorded exception was raised through the whole command, so its traceback
    holds every frame of it and, through their locals, the sources, the sinks and
    their open files.  A sink that the signal caught before the converter's
    ``try`` (just after its temporary appeared) was never aborted: its HDF5 file is
    still open, on a file that :func:`._atomic.discard_pending` closes and deletes.
    Kept alive by this module, that HDF5 file was closed only in the interpreter's
    last teardown, through the closed file: h5py's deallocator reported the
    ValueError with PyErr_PrintEx and, sys.excepthook and sys.stderr being None by
    then, CPython printed "Error in sys.excepthook:" and "Original exception was:"
    with nothing under either, after the CLI's one line.

    Called before the temporaries are discarded, so each object closes itself while
    its file is still open and the process is whole.  The signal stays recorded
    (whatever closes now still refuses to write or commit) but is no longer
    pending, so no cleanup run by a deallocator raises it.
    """
    global _signal_pending
    _signal_pending = False
    exc = _signal_exc
    if exc is None:
        return
    tb, exc.__traceback__ = exc.__traceback__, None
    while tb is not None:
        try:
            tb.tb_frame.clear()  # its locals, even if something else still holds the frame
        except RuntimeError:
            pass  # a frame still running: not once the command has returned
        tb = tb.tb_next


def raise_if_signalled() -> None:
    """Raise the recorded signal, if one arrived: nothing is committed after it."""
    if _signal_exc is not None:
        raise _signal_exc


def _raise_pending() -> None:
    # Raise a signal recorded during a deferred block once, at its end; one that was
    # already raised (and is unwinding the command) is not raised again by cleanups.
    global _signal_pending
    if _signal_pending and _signal_exc is not None:
        _signal_pending = False
        raise _signal_exc


_signal_pending = False
_defer_depth = 0


def signals_deferred_to_python() -> bool:
    """True inside :func:`raise_signals_after` or :func:`signals_deferred`: a signal handler should only record, not raise."""
    return _defer_depth > 0


@contextlib.contextmanager
def raise_signals_after() -> Iterator[None]:
    """Wrap a call into C++ that calls back into Python (TensorFlow's reader and ops).

    pybind11 swallows an exception raised in such a callback (and prints it), so
    inside this block the CLI's handler only records a signal; it is raised here,
    once the call has returned.
    """
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if _defer_depth == 0:
        _raise_pending()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, so a rename sequence or a cleanup is never cut in half.

    A signal that arrives meanwhile raises right after the block.  Blocking the
    signal in this thread's mask is not enough on its own: with other threads
    alive (OpenBLAS's, tqdm's) the kernel hands the signal to one of them and
    Python still runs its handler in the main thread at once.  So the block also
    counts as deferred for the CLI's handler, which then only records the signal.
    """
    global _defer_depth
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if main and hasattr(signal, "pthread_sigmask") else None
    _defer_depth += 1
    try:
        yield
    finally:
        # Unblock while still deferred: a signal held by the mask is delivered here
        # and only recorded, then raised below, after the block is whole.
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _defer_depth -= 1
    if _defer_depth == 0:
        _raise_pending()
