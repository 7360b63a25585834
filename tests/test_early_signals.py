"""SIGINT and SIGTERM at any moment of a command, its start-up above all (issue 21).

On f835772 a signal in the first tens of milliseconds (the command line's own
imports, before its handlers were in) printed Python's KeyboardInterrupt
traceback, and one raised inside an extension module's initialisation came out
as "internal error: ImportError".  Every case is a real ``python -m ckptbridge``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np

from helpers import ENV, error_line, leftovers

# Delays after the process has started: every few milliseconds through start-up (on this
# kind of machine Python's own start-up takes 20-30 ms, the command line's imports 50-100
# more), then a few through the reading of the input.
DELAYS = [i * 0.004 for i in range(26)] + [0.15, 0.3, 0.5]
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+, in (?P<func>\S+)\n(?:    (?P<code>.*)\n)?', re.M)
_PACKAGE = os.path.dirname(os.path.abspath(__import__("ckptbridge").__file__))


def _before_ckptbridge(err: str) -> bool:
    """Whether a traceback is Python's own start-up (site, its .pth files, runpy finding the package), before
    any code of ckptbridge's could run: the only place a Ctrl-C still prints one.

    The last ckptbridge frame, if any, may only be the package importing the module that installs the handlers.
    """
    ours = [m for m in _FRAME.finditer(err) if os.path.abspath(m.group("file")).startswith(_PACKAGE + os.sep)]
    if not ours:
        return True
    last = ours[-1]
    installer = os.path.join("ckptbridge", "io", "signals.py")
    return last.group("func") == "<module>" and (
        last.group("file").endswith(installer) or (last.group("code") or "").strip() == "from .io import signals as _signals")


def _run_signalled(args: list[str], delay: float, sig: int, cwd: Any) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-m", "ckptbridge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(cwd), env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    return p.returncode, err


def test_a_signal_at_any_moment_of_start_up_is_one_line_or_silence(tmp_path: Any) -> None:
    np.savez(str(tmp_path / "a.npz"), w=np.arange(3, dtype=np.float32))
    seen: set[str] = set()
    for i, delay in enumerate(DELAYS):
        sig = signal.SIGINT if i % 3 else signal.SIGTERM
        out = tmp_path / f"o{i}.h5"
        rc, err = _run_signalled(["export", "a.npz", out.name], delay, sig, tmp_path)
        conventional = 130 if sig == signal.SIGINT else 143
        where = f"{signal.Signals(sig).name} after {delay * 1000:.1f} ms"
        if "Traceback" in err and _before_ckptbridge(err):
            seen.add("python's start-up")
            continue  # the interpreter's own, before ckptbridge's first line: not ours to handle
        assert "Traceback" not in err, f"{where}: a traceback\n{err}"
        assert "internal error" not in err, f"{where}: {err}"
        if rc == -sig and out.exists():
            # the command had ended (its line printed, its output published) and the signal ended the
            # process on its way out, as it would end cp's
            assert err.startswith("wrote ") and err.count("\n") == 1, f"{where}: killed after the command, yet it printed\n{err}"
            seen.add("finished")
        elif rc == -sig:
            assert err == "", f"{where}: killed by the signal, yet it printed\n{err}"
            seen.add("silent")
        elif rc == 0:
            seen.add("finished")  # the command was done before the signal came
        else:
            line = error_line((rc, err), status=conventional)
            assert ("interrupted" if sig == signal.SIGINT else "terminated by SIGTERM") in line, f"{where}: {line}"
            seen.add("one line")
        assert not leftovers(str(tmp_path)), f"{where}: temporaries left: {leftovers(str(tmp_path))}"
        published_line = err.startswith("wrote ") or "was written" in err
        assert rc == 0 or not out.exists() or published_line, f"{where}: {out.name} was published but the line says otherwise"
    assert "one line" in seen, f"no signal landed while the command ran: {seen}"


# An extension module whose initialisation calls back into Python, as pybind11's do (TensorFlow's,
# among others): an exception raised meanwhile is printed and becomes ImportError("initialization
# failed").  It stands for such a module so that the signal lands inside it every time.
_EXTENSION_LIKE = """
import os, signal, time, traceback
try:
    os.kill(os.getpid(), int(os.environ["SIGNAL_TO_SEND"]))
    for _ in range(20):
        time.sleep(0.005)
except BaseException as e:
    traceback.print_exc()
    raise ImportError("initialization failed") from e
"""

_IMPORTS_IT_WHILE_READING = textwrap.dedent("""
    import sys
    from ckptbridge import _api, cli
    real = _api.read
    def read(*args, **kwargs):
        import extension_like  # noqa: F401
        return real(*args, **kwargs)
    _api.read = read
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_signal_inside_an_extensions_initialisation_waits_for_it_to_end(tmp_path: Any) -> None:
    np.savez(str(tmp_path / "a.npz"), w=np.arange(3, dtype=np.float32))
    (tmp_path / "extension_like.py").write_text(_EXTENSION_LIKE)
    for sig, status, what in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated by SIGTERM")):
        env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")]), SIGNAL_TO_SEND=str(int(sig)))
        r = subprocess.run([sys.executable, "-c", _IMPORTS_IT_WHILE_READING, "ls", "a.npz"], cwd=str(tmp_path), env=env,
                           capture_output=True, text=True, timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert what in error_line(r, status=status)
