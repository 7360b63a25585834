"""Signals deferred around work that must not be cut in half.

The CLI's SIGINT/SIGTERM handler (:func:`cli_handler`, installed by
:func:`install_cli_handlers`) records the signal here (:func:`note_signal`)
and raises it at once, unless the process is inside a block that defers it:
:func:`signals_deferred` (a rename sequence, a cleanup) or
:func:`raise_signals_after` (a call into C++ that calls back into Python).
Such a block raises the recorded signal when it ends.  The outputs
(:mod:`._atomic`) consult :func:`raise_if_signalled` before they commit.

A signal raises only while a command runs (:func:`interruptible`); before it
(the command line's own imports, from the moment ``python -m ckptbridge``
imports the package) and after it, it is recorded, then raised when the command
starts or reported when it has ended.  A signal that arrives during an
``import`` waits for the import to end: an exception raised inside an extension
module's initialisation is printed there, or turned into an ImportError
(pybind11's "initialization failed", NumPy's "failed to import"), instead of
reaching the command line as what it is.

The standard library only: the CLI imports this before NumPy and the rest.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time

# Only what Python's start-up has already imported is imported here at once (threading is
# imported when needed): until this module is in, a Ctrl-C still prints Python's traceback.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType
    from typing import Any

# The signal the CLI received, if any.  Its handler raises KeyboardInterrupt (or its
# SIGTERM exception) at once, but an exception raised while Python runs inside a
# C++ callback can be swallowed there (TensorFlow's pybind11 reader prints
# "KeyboardInterrupt: <EMPTY MESSAGE>" and carries on).  So nothing is ever
# committed once a signal has arrived: commit() raises again instead.
_signal_exc: BaseException | None = None


class Terminated(BaseException):
    """SIGTERM, raised as an exception so every open output is discarded on the way out."""


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
    """Forget the signal of a command that has ended, so the next ``cli.main`` of this process starts clean."""
    global _signal_exc, _signal_pending, _handled, _awaiting, _interruptible
    _signal_exc = None
    _signal_pending = False
    _handled = _awaiting = _interruptible = False


def unreported() -> BaseException | None:
    """A signal recorded but never raised through a command (it came before or after one): the CLI reports it."""
    return _signal_exc if _signal_pending else None


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
    # already raised (and is unwinding the command) is not raised again by cleanups,
    # and none is raised outside a command (the CLI reports it, see unreported()).
    global _signal_pending
    if _signal_pending and _signal_exc is not None and _interruptible:
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
    import threading

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


# --------------------------------------------------------------------------- the command line's handler

_handled = False  # the first signal was seen: later ones are ignored, so a second Ctrl-C cannot cut the cleanup short
_awaiting = False  # the first signal waits for an import to end; the watcher re-delivers it then
_interruptible = False  # a command is running: the handler raises (see interruptible())
_WATCH_INTERVAL = 0.005


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """The body of a command: a signal raises in here (one recorded before it, at once); outside, it is only recorded.

    An exception the body raises after a signal arrived is the signal's doing (an
    import it cut short, a file closed under a reader): the signal is raised in its place.
    """
    global _interruptible, _signal_pending
    _interruptible = True
    try:
        _raise_pending()
        yield
    except Exception:
        if _signal_exc is None:
            raise
        _signal_pending = False
        raise _signal_exc from None
    finally:
        _interruptible = False


def _in_import(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an ``import`` (a module's body, an extension's initialisation)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _watch(signum: int, main: int) -> None:
    """Re-deliver ``signum`` to the main thread once it has left the import it is in."""
    while True:
        time.sleep(_WATCH_INTERVAL)
        if not (_signal_pending and _interruptible and _awaiting):
            return  # raised meanwhile (a deferred block ended), or the command has ended: it is reported
        frame = sys._current_frames().get(main)
        if frame is None:
            return
        if _defer_depth == 0 and not _in_import(frame):
            break
    import _thread

    _thread.interrupt_main(signal.Signals(signum))  # runs cli_handler in the main thread, as the signal itself would


def cli_handler(signum: int, frame: FrameType | None) -> None:
    """The command line's SIGINT/SIGTERM handler: record the first signal, and raise it where that is safe.

    The first signal unwinds the command (every sink aborts on the way out); later
    ones are ignored so that a second Ctrl-C cannot cut that cleanup short.  If the
    exception is swallowed (raised inside a C++ callback), nothing is committed
    afterwards (:func:`raise_if_signalled`).
    """
    global _handled, _awaiting
    if _handled:
        if not _awaiting:
            return
        _awaiting = False  # the watcher's re-delivery (or a second signal meanwhile): look again
    else:
        _handled = True
        note_signal(KeyboardInterrupt() if signum == signal.SIGINT else Terminated())
    if not (_signal_pending and _interruptible) or _defer_depth > 0:
        return  # raised when the deferred block ends, or when the command starts, or reported after it
    if _in_import(frame):
        import threading

        _awaiting = True
        threading.Thread(target=_watch, args=(signum, threading.main_thread().ident), name="ckptbridge-signal",
                         daemon=True).start()
        return
    raising_signal()
    assert _signal_exc is not None
    raise _signal_exc


def install_cli_handlers() -> dict[int, Any]:
    """Install :func:`cli_handler` for SIGTERM, and for SIGINT unless it is ignored; return the handlers replaced.

    A shell that starts the command with SIGINT ignored (a background job of a
    script) is respected.  Where the handler is already in (installed when
    ``python -m ckptbridge`` imported the package), nothing is replaced.
    """
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current is cli_handler or (sig == signal.SIGINT and current is not signal.default_int_handler):
            continue
        old[sig] = current
        signal.signal(sig, cli_handler)
    return old


def default_handlers() -> None:
    """The command has ended and the process exits: a signal from now on ends it silently, with its usual status (130, 143)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is cli_handler:
            signal.signal(sig, signal.SIG_DFL)


def started_as_command() -> bool:
    """Whether this process is ``python -m ckptbridge`` importing the package on its way to the command line.

    While ``-m`` looks for its module, ``sys.argv[0]`` is ``"-m"`` and the rest of
    ``sys.argv`` ends ``sys.orig_argv``; the word before them names the module.
    """
    argv, orig = sys.argv, sys.orig_argv
    if argv[:1] != ["-m"] or len(orig) < len(argv) or orig[len(orig) - len(argv) + 1:] != argv[1:]:
        return False
    word = orig[len(orig) - len(argv)]
    return word == "ckptbridge" or (word.startswith("-") and word.endswith("mckptbridge"))
