"""Outputs at URLs (ckptbridge.io.upload, formats._url): written and read back locally, uploaded, checked, published.

The TensorFlow-free part writes to fsspec's ``memory://`` filesystem and to
filesystems of the test's own that fail on purpose (a write that breaks midway, a
move that fails, a store that returns other bytes than it was sent).  The ``tf``
part writes to moto's standalone S3 server on 127.0.0.1 through s3fs (only the
TensorFlow venv has them), TensorFlow-written checkpoints as the sources, with
faults injected into the server's requests.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import errors
from ckptbridge.formats import meta
from ckptbridge.io import remote as _remote
from ckptbridge.io import upload as _upload

from helpers import ENV, error_line, in_process, leftovers, write_checkpoint

fsspec = pytest.importorskip("fsspec", reason="the [remote] extra (fsspec) is not installed")
_memory = pytest.importorskip("fsspec.implementations.memory")

FORMATS = (".npz", ".h5", ".safetensors")


@pytest.fixture()
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Archives record when they were made (to the second): two exports of one source are then the same bytes."""
    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.datetime(2026, 12, 8, 3, 0, 0, tzinfo=tz)

    monkeypatch.setattr(meta, "datetime", types.SimpleNamespace(datetime=Clock, UTC=datetime.UTC))


@pytest.fixture()
def mem(tmp_path: Any) -> Iterator[tuple[Any, str]]:
    """(the memory filesystem, a directory of it that is this test's alone), emptied after."""
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"
    try:
        yield fs, root
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


@pytest.fixture()
def source(tmp_path: Any) -> str:
    """A V2 checkpoint (native writer), ~1.2 MB, with a string tensor and a bfloat16 one."""
    import ml_dtypes

    rng = np.random.default_rng(26)
    return write_checkpoint(str(tmp_path / "src" / "model.ckpt-5"), {
        "net/w": rng.standard_normal((300, 1000)).astype(np.float32),
        "net/b": rng.standard_normal(1000).astype(ml_dtypes.bfloat16),
        "global_step": np.array(5, dtype=np.int64),
    })


def _scratch(tmp_path: Any) -> str:
    d = tmp_path / "scratch"
    d.mkdir(exist_ok=True)
    return str(d)


def _names(fs: Any, root: str) -> list[str]:
    """Every object under ``root`` (temporaries included), by base name."""
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) if fs.exists(root) else []


# --------------------------------------------------------------------------- memory://: what appears, and what it holds


@pytest.mark.parametrize("suffix", FORMATS)
def test_export_to_a_url_is_the_local_export_byte_for_byte(suffix: str, source: str, mem: Any, tmp_path: Any, frozen_clock: None) -> None:
    fs, root = mem
    local = str(tmp_path / f"local{suffix}")
    ckptbridge.export(source, local)
    scratch = _scratch(tmp_path)
    report = ckptbridge.export(source, f"memory://{root}/run/model{suffix}", scratch_dir=scratch)
    uploaded = fs.cat_file(f"{root}/run/model{suffix}")
    with open(local, "rb") as f:
        assert uploaded == f.read()
    assert report.output == f"memory://{root}/run/model{suffix}"
    assert report.size == len(uploaded) and report.checksum == _upload.file_checksum(local)
    assert re.fullmatch(r"crc32c:[0-9a-f]{8}", report.checksum or "")
    assert _names(fs, root) == [f"model{suffix}"]  # no temporary beside it
    assert os.listdir(scratch) == []  # the local copy is gone
    assert report.written == ["global_step", "net/b", "net/w"]


def test_a_file_url_and_the_upload_bar(source: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    report = ckptbridge.export(source, f"file://{out}/model.safetensors", progress=True)
    assert "uploading file://" in capsys.readouterr().err
    assert os.listdir(out) == ["model.safetensors"]  # written beside under a temporary name, then renamed
    assert report.checksum == _upload.file_checksum(str(out / "model.safetensors"))
    with ckptbridge.read(str(out / "model.safetensors")) as r, ckptbridge.read(source) as want:
        assert all(r[n].tobytes() == want[n].tobytes() and r[n].dtype == want[n].dtype for n in want)
    rc, _, err = in_process("export", source, f"file://{out}/model.safetensors")
    error_line((rc, err), f"output file://{out}/model.safetensors already exists", "--force")


def test_save_to_a_url_and_local_outputs_have_no_checksum(mem: Any, tmp_path: Any) -> None:
    fs, root = mem
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array([b"a", b"bc"], dtype=object)}
    report = ckptbridge.save(tensors, f"memory://{root}/w.npz", metadata={"k": "v"})
    blob = fs.cat_file(f"{root}/w.npz")
    (tmp_path / "w.npz").write_bytes(blob)
    back = ckptbridge.load(str(tmp_path / "w.npz"))
    assert back["w"].tobytes() == tensors["w"].tobytes() and list(back["s"]) == [b"a", b"bc"]
    assert report.checksum == _upload.file_checksum(str(tmp_path / "w.npz")) and report.size == len(blob)
    # A local output is not read whole once more for a checksum: the report says none.
    local = ckptbridge.save(tensors, str(tmp_path / "local.npz"))
    assert (local.checksum, local.size, local.etag) == (None, None, None)
    with pytest.raises(errors.FormatError, match="save writes a checkpoint to a local prefix"):
        ckptbridge.save(tensors, f"memory://{root}/out/model.ckpt")


def test_force_replaces_an_object_and_without_it_the_object_stays(source: str, mem: Any, tmp_path: Any) -> None:
    fs, root = mem
    url = f"memory://{root}/model.h5"
    fs.pipe_file(f"{root}/model.h5", b"someone else's")
    rc, _, err = in_process("export", source, url, "--scratch-dir", _scratch(tmp_path))
    error_line((rc, err), f"output {url} already exists", "--force")
    with pytest.raises(errors.OutputExistsError, match="force=True"):
        ckptbridge.export(source, url)
    assert fs.cat_file(f"{root}/model.h5") == b"someone else's"
    rc, _, err = in_process("export", source, url, "--force")
    assert rc == 0, err
    assert "uploaded and checked, crc32c:" in err
    assert fs.cat_file(f"{root}/model.h5")[:8] == b"\x89HDF\r\n\x1a\n"
    assert _names(fs, root) == ["model.h5"]


# --------------------------------------------------------------------------- failures leave nothing


class _Flaky(_memory.MemoryFileSystem):  # type: ignore[misc]
    """The memory filesystem, failing where a test says: ``fail`` is "write" (the upload breaks after its first
    half megabyte), "move" (publishing fails), "corrupt" (reads return other bytes than were written) or "interrupt"
    (a Ctrl-C arrives in the middle of the upload)."""

    protocol = "flaky"
    fail = ""
    store: dict[str, Any] = {}  # its own, not the memory filesystem's
    pseudo_dirs = [""]

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        f = super()._open(path, mode, **kw)
        if "w" in mode and self.fail in ("write", "interrupt"):
            write, fail = f.write, self.fail

            def broken(data: bytes) -> int:
                room = (512 << 10) - f.tell()
                if len(data) > room:
                    write(data[:max(0, room)])  # half a megabyte arrives, then the connection breaks
                    if fail == "interrupt":
                        raise KeyboardInterrupt
                    raise ConnectionResetError(104, "Connection reset by peer")
                return int(write(data))

            f.write = broken
        return f

    def mv(self, path1: str, path2: str, **kw: Any) -> None:
        if self.fail == "move":
            raise PermissionError(13, "Permission denied")
        super().mv(path1, path2, **kw)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        data = bytes(super().cat_file(path, start, end, **kw))
        if self.fail == "corrupt" and start == 0:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


@pytest.fixture()
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Flaky]]:
    fsspec.register_implementation("flaky", _Flaky, clobber=True)
    monkeypatch.setattr(_remote, "BACKOFF", 0.0)
    try:
        yield _Flaky
    finally:
        _Flaky.store.clear()
        _Flaky.fail = ""


@pytest.mark.parametrize("fail, needles", [
    ("write", ["uploading flaky://out/run/model.npz failed", "ConnectionResetError", "nothing was written"]),
    ("move", ["permission denied writing flaky://out/run/model.npz"]),
    ("corrupt", ["upload of flaky://out/run/model.npz: read back, its crc32c differs from what was sent", "nothing was published"]),
])
def test_a_failed_upload_leaves_nothing_at_the_url(fail: str, needles: list[str], flaky: type[_Flaky], source: str, tmp_path: Any) -> None:
    flaky.fail = fail
    scratch = _scratch(tmp_path)
    rc, _, err = in_process("export", source, "flaky://out/run/model.npz", "--scratch-dir", scratch)
    error_line((rc, err), *needles)
    assert flaky.store == {}, list(flaky.store)  # neither the object nor a temporary beside it
    assert os.listdir(scratch) == []
    flaky.fail = ""  # the same command again, without the fault, publishes it: nothing was left in the way
    report = ckptbridge.export(source, "flaky://out/run/model.npz", scratch_dir=scratch)
    [(key, obj)] = flaky.store.items()
    assert key.endswith("/out/run/model.npz") and report.size == len(obj.getvalue())


def test_an_interrupted_upload_leaves_nothing(flaky: type[_Flaky], source: str, tmp_path: Any) -> None:
    flaky.fail = "interrupt"
    scratch = _scratch(tmp_path)
    rc, _, err = in_process("export", source, "flaky://out/model.h5", "--scratch-dir", scratch)
    assert rc == 130 and err.strip() == ("ckptbridge: error: interrupted while writing flaky://out/model.h5; nothing was written, "
                                         "run the command again to finish"), err
    assert flaky.store == {} and os.listdir(scratch) == []


def test_scratch_space_is_checked_before_anything_is_written(source: str, mem: Any, tmp_path: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ckptbridge.formats import _url

    fs, root = mem
    scratch = _scratch(tmp_path)
    usage = shutil.disk_usage(scratch)
    monkeypatch.setattr(_url.shutil, "disk_usage", lambda p: usage._replace(free=(64 << 20) + 500_000))
    rc, _, err = in_process("export", source, f"memory://{root}/model.npz", "--scratch-dir", scratch)
    error_line((rc, err), f"not enough free space for the local copy of memory://{root}/model.npz", "--scratch-dir", "TMPDIR")
    assert _names(fs, root) == [] and os.listdir(scratch) == []


@pytest.mark.parametrize("url, needles", [
    ("s3:///model.h5", ["cannot write s3:///model.h5: the URL names no bucket"]),
    ("https://user:hunter2@example.org/model.h5", ["cannot write https://example.org/model.h5", "not to http(s):// URLs"]),
    ("nosuchproto://host/model.h5", ["fsspec knows no nosuchproto:// protocol"]),
    ("s3://model.h5", ["cannot write s3://model.h5: it names no object", "e.g. s3://model.h5/model.h5"]),
])
def test_a_bad_output_url_is_one_line(url: str, needles: list[str], source: str, tmp_path: Any) -> None:
    rc, _, err = in_process("export", source, url)
    line = error_line((rc, err), *needles)
    assert "hunter2" not in line
    assert leftovers(tmp_path) == []


def test_a_missing_scratch_dir_is_one_line(source: str, mem: Any, tmp_path: Any) -> None:
    fs, root = mem
    rc, _, err = in_process("export", source, f"memory://{root}/m.npz", "--scratch-dir", str(tmp_path / "nope"))
    error_line((rc, err), f"scratch directory {tmp_path / 'nope'} does not exist", "--scratch-dir")
    assert _names(fs, root) == []


def test_a_store_checksum_is_compared_where_the_store_gives_one() -> None:
    import base64

    import crc32c

    data = b"0123456789" * 1000
    crc = crc32c.crc32c(data)
    assert _upload._stored_checksum({"crc32c": base64.b64encode(crc.to_bytes(4, "big")).decode()}) == ("crc32c", crc.to_bytes(4, "big"))
    assert _upload._stored_checksum({"md5Hash": base64.b64encode(b"\x01" * 16).decode()}) == ("md5", b"\x01" * 16)
    assert _upload._stored_checksum({"size": 3, "crc32c": "not base64!"}) is None


# --------------------------------------------------------------------------- S3: moto's server on 127.0.0.1, s3fs


class _Faults:
    """A WSGI wrapper around moto's app: answers the Nth UploadPart with an error, or holds it until released."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.fail_part: int | None = None
        self.status = "403 Forbidden"
        self.hold = threading.Event()
        self.holding = False
        self.held = threading.Event()
        self.no_conditions = False  # answer a conditional request 501, as S3-compatible stores without them do
        self.refused = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        query = environ.get("QUERY_STRING", "")
        if self.no_conditions and environ["REQUEST_METHOD"] == "POST" and environ.get("HTTP_IF_NONE_MATCH"):
            self.refused += 1
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>no</Message></Error>'
            start_response("501 Not Implemented", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        part = re.search(r"(?:^|&)partNumber=(\d+)", query)
        if environ["REQUEST_METHOD"] == "PUT" and part and int(part.group(1)) == self.fail_part:
            if self.holding:
                self.held.set()
                self.hold.wait(30)
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b"<Message>Access Denied</Message></Error>")
            start_response(self.status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[Any]:
    """(server, s3fs filesystem, faults): moto's S3 server on 127.0.0.1 with a bucket "out", found through the AWS variables."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from servers import MotoS3

    server = MotoS3().start()
    wsgi = server._moto._server
    faults = _Faults(wsgi.app)
    wsgi.app = faults
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": server.endpoint}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        fsspec.filesystem("s3").clear_instance_cache()  # an instance cached for another module's server is not ours
        fs = fsspec.filesystem("s3")
        try:
            fs.mkdir("out")
            yield server, fs, faults
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            server.stop()


def _uploads(fs: Any) -> list[Any]:
    """The multipart uploads the bucket still has in progress."""
    return list(fs.call_s3("list_multipart_uploads", Bucket="out").get("Uploads", []))


def _tf_checkpoint(prefix: str) -> str:
    """A ~12 MB checkpoint written by TensorFlow's Saver: with 5 MiB parts, an upload of three parts."""
    import tensorflow as tf

    v1 = tf.compat.v1
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(26)
    with tf.Graph().as_default():
        v1.Variable(rng.standard_normal((3000, 1000)).astype(np.float32), name="net/fc/weights")
        v1.Variable(rng.standard_normal(1000).astype(np.float32), name="net/fc/biases")
        v1.Variable(np.int64(7), name="global_step")
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return str(saver.save(sess, prefix, write_meta_graph=False))


@pytest.fixture(scope="module")
def tf_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("tensorflow")
    return _tf_checkpoint(str(tmp_path_factory.mktemp("tfsrc") / "run" / "model.ckpt-7"))


@pytest.fixture()
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_upload, "PART_BYTES", _upload.MIN_PART_BYTES)


@pytest.mark.tf
@pytest.mark.parametrize("suffix", FORMATS)
def test_export_to_s3_is_the_local_export_byte_for_byte(suffix: str, moto_s3: Any, tf_source: str, tmp_path: Any,
                                                       frozen_clock: None, small_parts: None) -> None:
    import hashlib

    import tensorflow as tf

    _, fs, _ = moto_s3
    local = str(tmp_path / f"local{suffix}")
    ckptbridge.export(tf_source, local)
    report = ckptbridge.export(tf_source, f"s3://out/runs/a/model.ckpt-7{suffix}", scratch_dir=_scratch(tmp_path))
    with open(local, "rb") as f:
        want = f.read()
    got = fs.cat_file(f"out/runs/a/model.ckpt-7{suffix}")
    assert got == want
    parts = -(-len(want) // _upload.MIN_PART_BYTES)
    assert parts == 3
    md5s = b"".join(hashlib.md5(want[i:i + _upload.MIN_PART_BYTES]).digest() for i in range(0, len(want), _upload.MIN_PART_BYTES))
    assert report.etag == f"{hashlib.md5(md5s).hexdigest()}-{parts}"
    assert report.checksum == _upload.file_checksum(local) and report.size == len(want)
    assert _uploads(fs) == [] and os.listdir(tmp_path / "scratch") == []
    # and the local export, so the object, holds what TensorFlow reads from the checkpoint, bit for bit
    r = tf.train.load_checkpoint(tf_source)
    with ckptbridge.read(local) as back:
        for name in ("net/fc/weights", "net/fc/biases", "global_step"):
            expect = r.get_tensor(name)
            assert back[name].dtype == expect.dtype and back[name].tobytes() == expect.tobytes()


@pytest.mark.tf
def test_s3_to_s3_reads_by_range_and_writes_the_same_object(moto_s3: Any, tf_source: str, tmp_path: Any, frozen_clock: None) -> None:
    _, fs, _ = moto_s3
    run = os.path.dirname(tf_source)
    for name in os.listdir(run):
        fs.put_file(os.path.join(run, name), f"out/src/run/{name}")
    fs.invalidate_cache()
    local = str(tmp_path / "local.npz")
    ckptbridge.export(tf_source, local)
    rc, _, err = in_process("export", "s3://out/src/run/model.ckpt-7", "s3://out/archive/run/model.ckpt-7.npz")
    assert rc == 0, err
    with open(local, "rb") as f:
        local_bytes = f.read()
    # the same bytes but for the source the archive records: a URL here, a path there
    with ckptbridge.read(local) as a:
        assert a.metadata()["source"] == tf_source
    blob = fs.cat_file("out/archive/run/model.ckpt-7.npz")
    (tmp_path / "fetched.npz").write_bytes(blob)
    with ckptbridge.read(str(tmp_path / "fetched.npz")) as b, ckptbridge.read(local) as a:
        assert b.metadata()["source"] == "s3://out/src/run/model.ckpt-7"
        assert all(b[n].tobytes() == a[n].tobytes() and b[n].dtype == a[n].dtype for n in a)
    assert len(blob) - len(local_bytes) == len("s3://out/src/run/model.ckpt-7") - len(tf_source)


@pytest.mark.tf
def test_s3_a_part_refused_midway_leaves_no_object_and_no_upload(moto_s3: Any, tf_source: str, tmp_path: Any, small_parts: None) -> None:
    _, fs, faults = moto_s3
    faults.fail_part = 2
    try:
        rc, _, err = in_process("export", tf_source, "s3://out/fail/model.h5", "--scratch-dir", _scratch(tmp_path))
    finally:
        faults.fail_part = None
    error_line((rc, err), "permission denied writing s3://out/fail/model.h5 (HTTP 403)", "Credentials")
    fs.invalidate_cache()
    assert not fs.exists("out/fail/model.h5") and _uploads(fs) == []
    assert os.listdir(tmp_path / "scratch") == []


@pytest.mark.tf
def test_s3_sigterm_during_the_upload_leaves_no_object_and_no_upload(moto_s3: Any, tf_source: str, tmp_path: Any) -> None:
    server, fs, faults = moto_s3
    env = dict(ENV, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=server.endpoint)
    faults.fail_part, faults.holding = 1, True
    faults.hold.clear()
    faults.held.clear()
    try:
        p = subprocess.Popen([sys.executable, "-m", "ckptbridge", "export", tf_source, "s3://out/term/model.npz", "--scratch-dir",
                              _scratch(tmp_path)], env=env, stderr=subprocess.PIPE, text=True)
        assert faults.held.wait(60), "the upload never started"
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        faults.hold.set()  # the part's request ends (refused), while the process is already stopping
        _, err = p.communicate(timeout=60)
    finally:
        faults.fail_part, faults.holding = None, False
        faults.hold.set()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("ckptbridge: error: terminated by SIGTERM while writing s3://out/term/model.npz; "
                                            "nothing was written, run the command again to finish"), err
    fs.invalidate_cache()
    assert not fs.exists("out/term/model.npz") and _uploads(fs) == []
    assert os.listdir(tmp_path / "scratch") == []


@pytest.mark.tf
def test_s3_force_and_an_object_written_meanwhile(moto_s3: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, fs, faults = moto_s3
    tensors = {"w": np.arange(1000, dtype=np.float32)}
    fs.pipe_file("out/force/w.safetensors", b"old")
    with pytest.raises(errors.OutputExistsError, match="already exists; pass force=True"):
        ckptbridge.save(tensors, "s3://out/force/w.safetensors")
    assert fs.cat_file("out/force/w.safetensors") == b"old" and _uploads(fs) == []
    report = ckptbridge.save(tensors, "s3://out/force/w.safetensors", force=True)
    fs.invalidate_cache()
    assert fs.info("out/force/w.safetensors")["size"] == report.size and report.etag is not None
    # Another writer publishes the object between our check and our completion: the completion is conditional,
    # so theirs stays, and our upload is aborted.
    real = _upload._S3Multipart._complete

    def race(self: Any, parts: Any) -> None:
        fs.pipe_file(f"out/{self._key}", b"theirs")
        real(self, parts)

    monkeypatch.setattr(_upload._S3Multipart, "_complete", race)
    with pytest.raises(errors.OutputExistsError, match="written meanwhile by another process"):
        ckptbridge.save(tensors, "s3://out/race/w.npz")
    assert fs.cat_file("out/race/w.npz") == b"theirs" and _uploads(fs) == []
    # A store that does not do conditional writes: the object is looked for once more instead.
    monkeypatch.setattr(_upload._S3Multipart, "_complete", real)
    faults.no_conditions = True
    try:
        report = ckptbridge.save(tensors, "s3://out/plain/w.npz")
        assert faults.refused == 1
        assert fs.cat_file("out/plain/w.npz") != b"" and report.size == fs.info("out/plain/w.npz")["size"]
        monkeypatch.setattr(_upload._S3Multipart, "_complete", race)
        with pytest.raises(errors.OutputExistsError, match="written meanwhile by another process"):
            ckptbridge.save(tensors, "s3://out/race2/w.npz")
    finally:
        faults.no_conditions = False
    assert fs.cat_file("out/race2/w.npz") == b"theirs" and _uploads(fs) == []


@pytest.mark.tf
def test_s3_an_object_unlike_what_was_sent_is_removed(moto_s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check after the completion: a store whose object's ETag is not the parts' (here: a wrong expectation)."""
    _, fs, _ = moto_s3
    real = _upload._S3Multipart._check
    monkeypatch.setattr(_upload._S3Multipart, "_check", lambda self, size, checksum, etag, n: real(self, size, checksum, "0" * 32 + "-1", n))
    with pytest.raises(errors.CorruptError, match=r"upload of s3://out/odd/w.h5: the store holds \d+ bytes \(ETag [0-9a-f]{32}-1\) "
                                                  r"where \d+ bytes \(ETag 0{32}-1\) were sent; the object was removed"):
        ckptbridge.save({"w": np.arange(10, dtype=np.float32)}, "s3://out/odd/w.h5")
    fs.invalidate_cache()
    assert not fs.exists("out/odd/w.h5") and _uploads(fs) == []


@pytest.mark.tf
def test_s3_errors_are_one_line(moto_s3: Any, tmp_path: Any) -> None:
    server, fs, _ = moto_s3
    src = str(tmp_path / "w.npz")
    ckptbridge.save({"w": np.arange(10, dtype=np.float32)}, src)
    env = dict(ENV, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=server.endpoint, AWS_MAX_ATTEMPTS="1", AWS_EC2_METADATA_DISABLED="true")
    none = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    none.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))

    def export(url: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ckptbridge", "export", src, url], env=environ, capture_output=True,
                              text=True, timeout=120)

    error_line(export("s3://no-such-bucket/w.h5", env), "cannot write s3://no-such-bucket/w.h5: the bucket s3://no-such-bucket does not exist")
    error_line(export("s3://out/e/w.h5", none), "no credentials found to write s3://out/e/w.h5", "Credentials")
    refused = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    error_line(export("s3://out/e/w.h5", refused), "cannot connect to", "connection refused", "s3://out/e/w.h5")
    fs.invalidate_cache()
    assert not fs.exists("out/e") and _uploads(fs) == []
