"""Fuzzing the end-to-end readers with mutated real files (issue #6).

Hypothesis flips, truncates, inserts and deletes bytes of a checkpoint's
``.index`` and ``.data`` and of ``.npz``, ``.h5`` and ``.safetensors`` archives exported from it.
Every reader — ``ckptbridge.read`` plus reading every tensor, ``verify``, and
the CLI's ``ls`` and ``verify`` — must either return exactly the original
data or raise a ckptbridge error: never another exception, a crash, a hang,
or an allocation sized by a corrupted length field.

The readers run in one worker subprocess under ``RLIMIT_AS`` (4 GB), with an
alarm per case and a timeout on its answer, so a MemoryError, a segfault or a
hang is caught and reported with the input that caused it.  The checkpoint is
written by TensorFlow when it is installed (ckptbridge's own writer otherwise).
The .index table parser itself is fuzzed in depth in tests/test_bundle.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ckptbridge  # noqa: E402

EXAMPLES = int(os.environ.get("CKPTBRIDGE_FUZZ_EXAMPLES", "150"))
AS_LIMIT = 4 << 30
CASE_SECONDS = 20

WORKER = textwrap.dedent(
    r'''
    import base64, contextlib, io, json, os, resource, shutil, signal, sys, traceback
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    import numpy as np
    import ckptbridge
    from ckptbridge import cli

    class Hang(Exception):
        pass

    def alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    work = sys.argv[2]
    expected = {}

    def exchange_bytes(a):
        if a.dtype == object:
            return [bytes(x) for x in a.reshape(-1)]
        return np.ascontiguousarray(a).tobytes()

    def read_all(path):
        with ckptbridge.read(path) as r:
            return {n: (str(r[n].dtype), r[n].shape, exchange_bytes(r[n])) for n in r}

    def run_cli(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
        return rc, out.getvalue(), err.getvalue()

    def case(kind, target, any_data=False):
        want = expected[kind]
        problems = []
        # 1. the library: read every tensor
        try:
            got = read_all(target)
        except ckptbridge.CkptBridgeError:
            pass
        except Hang:
            raise
        except BaseException as e:
            problems.append("read: " + type(e).__name__ + ": " + str(e)[:300] + "\n" + traceback.format_exc()[-1500:])
        else:
            if got != want and not any_data:
                diff = sorted(set(got) ^ set(want)) or [n for n in want if got.get(n) != want[n]]
                problems.append("read returned wrong data without an error: " + repr(diff[:5]))
        # 2. verify through the library
        try:
            v = ckptbridge.verify(target)
        except ckptbridge.CkptBridgeError:
            pass
        except Hang:
            raise
        except BaseException as e:
            problems.append("verify: " + type(e).__name__ + ": " + str(e)[:300] + "\n" + traceback.format_exc()[-1500:])
        # 3. the CLI: ls and verify answer with a status, never an internal error
        for args in (("ls", target), ("verify", target)):
            rc, out, err = run_cli(*args)
            if rc not in (0, 1, 2) or (rc == 1 and args[0] != "verify") or "internal error" in err or "Traceback" in err:
                problems.append(f"{args[0]}: exit {rc}: {err.strip()[:500]}")
        return problems

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "expect":
            expected[msg["kind"]] = read_all(msg["path"])
            print(json.dumps({"ok": True, "n": len(expected[msg["kind"]])}), flush=True)
            continue
        d = os.path.join(work, "case")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, b64 in msg["files"].items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(base64.b64decode(b64))
        signal.alarm(msg["seconds"])
        try:
            problems = case(msg["kind"], os.path.join(d, msg["target"]), msg.get("any_data", False))
        except Hang:
            problems = ["hang: no answer within %d s" % msg["seconds"]]
        finally:
            signal.alarm(0)
        print(json.dumps({"ok": not problems, "problems": problems}), flush=True)
    '''
)


class Worker:
    """One long-lived subprocess that runs the readers on each mutated input."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        script = os.path.join(workdir, "fuzz_worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.p = subprocess.Popen([sys.executable, script, str(AS_LIMIT), workdir], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def ask(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            self.p.kill()
            raise AssertionError(f"the readers hung (no answer in {timeout} s, not even to SIGALRM)")
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            err = self.p.stderr.read() if self.p.stderr else ""
            raise AssertionError(f"the reader process died (exit {self.p.returncode}, {_signame(self.p.returncode)}): {err[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def _signame(rc: int | None) -> str:
    import signal

    return signal.Signals(-rc).name if rc is not None and rc < 0 else "no signal"


# --------------------------------------------------------------------------- inputs


def _native_values() -> dict[str, np.ndarray]:
    import ml_dtypes

    strings = np.array([b"", b"\x00a\x00", b"\xff\xfe non-utf8"], dtype=object)
    return {
        "dtypes/float32": np.array([0.0, -0.0, 1.5, np.nan], np.float32).reshape(2, 2),
        "dtypes/bfloat16": np.array([1.5, -2.0, np.inf], ml_dtypes.bfloat16),
        "dtypes/int64": np.array([-(2**62), 0, 7], np.int64),
        "dtypes/bool": np.array([True, False]),
        "dtypes/complex64": np.array([1 + 2j, -3j], np.complex64),
        "dtypes/string": strings,
        "scalar/float64": np.array(3.25),
        "empty/int32": np.zeros((3, 0), np.int32),
        "w": np.arange(6, dtype=np.float32).reshape(3, 2),
        "w/ExponentialMovingAverage": np.arange(6, dtype=np.float32).reshape(3, 2) + 0.5,
    }


@pytest.fixture(scope="module")
def base(request: pytest.FixtureRequest, module_tmp: Any) -> dict[str, str]:
    """A checkpoint (TensorFlow-written if TF is installed) and .npz/.h5/.safetensors exports of it."""
    d = str(module_tmp("fuzz_base"))
    try:
        import tensorflow  # noqa: F401
        import tf_keras  # noqa: F401
        import tf_slim  # noqa: F401

        src = request.getfixturevalue("dtypes_ckpt")
    except ImportError:
        from ckptbridge.bundle import BundleWriter

        src = os.path.join(d, "native", "dtypes.ckpt")
        os.makedirs(os.path.dirname(src))
        w = BundleWriter(src)
        for name, value in _native_values().items():
            w.write(name, value)
        w.commit()
    ck = os.path.join(d, "ck")
    os.makedirs(ck)
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(src + suffix, os.path.join(ck, "model" + suffix))
    out = {"ckpt": os.path.join(ck, "model")}
    for fmt in ("npz", "h5"):
        out[fmt] = os.path.join(d, f"model.{fmt}")
        ckptbridge.export(out["ckpt"], out[fmt])
    out["npz_deflate"] = os.path.join(d, "model_deflate.npz")
    ckptbridge.export(out["ckpt"], out["npz_deflate"], compress=True)
    # .safetensors has no type for strings or complex numbers: every other tensor goes there.
    from ckptbridge.formats.safetensors import ST_DTYPES

    with ckptbridge.read(out["ckpt"]) as r:
        uncarried = [n for n, spec in r.specs.items() if spec.dtype not in ST_DTYPES]
    out["safetensors"] = os.path.join(d, "model.safetensors")
    report = ckptbridge.export(out["ckpt"], out["safetensors"],
                               ckptbridge.Naming(select=ckptbridge.Select(exclude=[f"^{re.escape(n)}$" for n in uncarried])))
    assert len(report.written) >= 5, report.written
    # A V1 checkpoint written by TensorFlow (tests/data/v1, see tests/test_v1_native.py), its entries in
    # small blocks so that mutations land in several of them.
    from ckptbridge.bundle import _table

    with open(os.path.join(os.path.dirname(__file__), "data", "v1", "dtypes.ckpt"), "rb") as f:
        entries = list(_table.read_table(f.read()))
    t = _table.TableBuilder(block_size=512)
    for key, value in entries:
        t.add(key, value)
    out["v1"] = os.path.join(d, "v1", "model.ckpt")
    os.makedirs(os.path.dirname(out["v1"]))
    with open(out["v1"], "wb") as f:
        f.write(t.finish())
    return out


@pytest.fixture(scope="module")
def worker(base: dict[str, str], module_tmp: Any) -> Iterator[Worker]:
    w = Worker(str(module_tmp("fuzz_worker")))
    try:
        for kind in ("ckpt", "npz", "h5", "npz_deflate", "safetensors", "v1"):
            assert w.ask({"op": "expect", "kind": kind, "path": base[kind]}, 120)["ok"]
        yield w
    finally:
        w.close()


@st.composite
def mutations(draw: Any, size: int) -> list[tuple[str, int, bytes]]:
    """1-3 edits: flip a byte, truncate, insert bytes, delete a run, overwrite a run."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "overwrite"]))
        pos = draw(st.integers(0, max(size - 1, 0)))
        if kind == "flip":
            edits.append((kind, pos, bytes([draw(st.integers(1, 255))])))
        elif kind == "truncate":
            edits.append((kind, pos, b""))
        elif kind == "insert":
            edits.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        elif kind == "delete":
            edits.append((kind, pos, bytes([draw(st.integers(1, 16))])))
        else:
            # Overwrite with bytes that make lengths and counts huge or negative.
            edits.append((kind, pos, draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x00",
                                                           b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"9999999999"]))))
    return edits


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= arg[0]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "delete":
            del b[pos:pos + arg[0]]
        elif kind == "overwrite":
            b[pos:pos + len(arg)] = arg
    return bytes(b)


def _check(worker: Worker, kind: str, files: dict[str, bytes], target: str, edits: Any) -> None:
    msg = {"op": "case", "kind": kind, "target": target, "seconds": CASE_SECONDS,
           "files": {n: base64.b64encode(b).decode() for n, b in files.items()}}
    answer = worker.ask(msg, CASE_SECONDS + 30)
    assert answer["ok"], f"{kind} mutated by {edits!r}:\n" + "\n".join(answer["problems"])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("part", [".index", ".data-00000-of-00001"])
def test_fuzz_checkpoint(worker: Worker, base: dict[str, str], part: str) -> None:
    files = {s: _read(base["ckpt"] + s) for s in (".index", ".data-00000-of-00001")}

    @FUZZ
    @given(edits=mutations(len(files[part])))
    def run(edits: Any) -> None:
        case = dict(files)
        case[part] = mutate(files[part], edits)
        _check(worker, "ckpt", {"model" + s: b for s, b in case.items()}, "model", edits)

    run()


@pytest.mark.parametrize("kind", ["npz", "npz_deflate", "h5", "safetensors"])
def test_fuzz_archive(worker: Worker, base: dict[str, str], kind: str) -> None:
    data = _read(base[kind])
    name = os.path.basename(base[kind]).replace("_deflate", "")

    @FUZZ
    @given(edits=mutations(len(data)))
    def run(edits: Any) -> None:
        _check(worker, kind, {name: mutate(data, edits)}, name, edits)

    run()


def _fix_crcs(blob: bytes) -> bytes:
    """Recompute every block trailer's crc32c that the (mutated) footer and index still point at,
    so the mutation reaches the parsers behind the checksums."""
    from ckptbridge.bundle import _table
    from ckptbridge.io.wire import _Bad, crc, mask

    b = bytearray(blob)
    end = len(b) - _table.FOOTER_SIZE

    def fix(off: int, size: int) -> None:
        if 0 <= off and 0 <= size and off + size + _table.TRAILER_SIZE <= end:
            b[off + size + 1:off + size + 5] = mask(crc(bytes([b[off + size]]), crc(bytes(b[off:off + size])))).to_bytes(4, "little")

    try:
        _, _, pos = _table._handle(b, end, end + _table.HANDLES_SIZE)
        off, size, _ = _table._handle(b, pos, end + _table.HANDLES_SIZE)
        fix(off, size)
        for _, h in _table._block_entries(bytes(b[off:off + size]), "index"):
            fix(*_table._handle(h, 0, len(h))[:2])
    except (_Bad, IndexError, ValueError):
        pass
    return bytes(b)


V1_FUZZ = settings(FUZZ, max_examples=min(EXAMPLES, 100))


def test_fuzz_v1_checkpoint(worker: Worker, base: dict[str, str]) -> None:
    """A V1 file: raw mutations must give the original data or an error; with the block crcs recomputed
    (a buggy writer rather than bit rot) any data may come back, but only ever through a ckptbridge error."""
    data = _read(base["v1"])

    @V1_FUZZ
    @given(edits=mutations(len(data)), fix=st.booleans())
    def run(edits: Any, fix: bool) -> None:
        blob = mutate(data, edits)
        if fix:
            blob = _fix_crcs(blob)
        msg = {"op": "case", "kind": "v1", "target": "model.ckpt", "seconds": CASE_SECONDS, "any_data": fix,
               "files": {"model.ckpt": base64.b64encode(blob).decode()}}
        answer = worker.ask(msg, CASE_SECONDS + 30)
        assert answer["ok"], f"v1 mutated by {edits!r} (crcs fixed: {fix}):\n" + "\n".join(answer["problems"])

    run()


def test_the_fuzz_harness_sees_wrong_data(worker: Worker, base: dict[str, str]) -> None:
    """The harness must notice a reader that returns wrong data: a plain .npz (no checksums) with one value changed."""
    with ckptbridge.read(base["ckpt"]) as r:
        w = np.asarray(r["w"]).copy()
    import io
    import zipfile

    # The worker's expectation for "npz" is the exported archive; hand it an archive without metadata
    # whose "w" differs: it reads fine, so the harness must flag the difference.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        member = io.BytesIO()
        np.save(member, w + 1)
        z.writestr("w.npy", member.getvalue())
    with pytest.raises(AssertionError, match="wrong data"):
        _check(worker, "npz", {"model.npz": buf.getvalue()}, "model.npz", "hand-made")
