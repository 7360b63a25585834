"""Checkpoints at remote URLs, read by byte range (ckptbridge.io.remote), and the one TensorFlow of ``[tf]``.

The servers are real and local (tests/servers.py): an HTTP server that honours
Range requests, counts the bytes it sends and injects faults, and moto's
standalone S3 server for s3fs.  The TensorFlow-free part reads through the HTTP
server with checkpoints written by the native writer; the ``tf`` part compares
with TensorFlow reading the same files locally.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import errors
from ckptbridge.io import remote as _remote

from helpers import error_line, in_process, leftovers, tree, write_checkpoint
from servers import RangeHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- one TensorFlow for [tf]

#: The distributions that each install the ``tensorflow`` package: two of them in one venv write over each other.
TF_DISTRIBUTIONS = frozenset({
    "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos", "tensorflow-aarch64",
    "tensorflow-cpu-aws", "tensorflow-rocm", "intel-tensorflow", "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu",
    "tf-nightly-intel", "tf-nightly-macos",
})
#: What tf-keras 2.21 requires (its metadata: ``tensorflow<2.22,>=2.21``); the extra must give exactly this one.
TF_KERAS_REQUIRES = "tensorflow"


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return _norm(m.group(1))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_tf_extra_gives_the_one_tensorflow_tf_keras_requires() -> None:
    extra = _pyproject()["project"]["optional-dependencies"]["tf"]
    names = [_req_name(r) for r in extra]
    assert "tf-keras" in names
    assert [n for n in names if n in TF_DISTRIBUTIONS] == [TF_KERAS_REQUIRES], extra
    # scripts/_env.sh installs the extra with requirements/tf.txt as constraints: they must pin the same one.
    with open(os.path.join(ROOT, "requirements", "tf.txt")) as f:
        pinned = [_req_name(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert [n for n in pinned if n in TF_DISTRIBUTIONS] == [TF_KERAS_REQUIRES], pinned
    try:
        requires = importlib.metadata.requires("tf-keras") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tf-keras is not installed here: the recorded requirement was checked, not its metadata")
    wanted = {_req_name(r) for r in requires if ";" not in r or "extra" not in r.split(";", 1)[1]}
    assert wanted & TF_DISTRIBUTIONS == {TF_KERAS_REQUIRES}, requires


@pytest.mark.tf
def test_tf_venv_has_exactly_one_tensorflow_distribution() -> None:
    found = sorted({_norm(d.metadata["Name"]) for d in importlib.metadata.distributions()} & TF_DISTRIBUTIONS)
    assert len(found) == 1, f"TensorFlow distributions installed: {found}"
    files = importlib.metadata.distribution(found[0]).files or []
    assert any(str(p) == "tensorflow/__init__.py" for p in files), f"{found[0]} does not provide the tensorflow package"


def test_remote_extra_names_fsspec_and_aiohttp() -> None:
    extra = _pyproject()["project"]["optional-dependencies"]["remote"]
    assert sorted(_req_name(r) for r in extra) == ["aiohttp", "fsspec"]


# --------------------------------------------------------------------------- the remote module (no TensorFlow)

SECRETS = ("hunter2", "s3cr3t-token", "alice")


@pytest.fixture()
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_remote, "BACKOFF", 0.0)


@pytest.fixture()
def remote_extra() -> None:
    """Skips where the [remote] extra (fsspec, aiohttp) is not installed."""
    pytest.importorskip("fsspec", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    pytest.importorskip("aiohttp", reason="the [remote] extra (fsspec, aiohttp) is not installed")


@pytest.fixture()
def served(tmp_path: Any, remote_extra: None) -> Iterator[tuple[RangeHTTPServer, str]]:
    """(server, local root): an HTTP server on 127.0.0.1 over a directory holding run/model.ckpt-7 (V2, ~4 MB)."""
    root = tmp_path / "www"
    rng = np.random.default_rng(15)
    write_checkpoint(str(root / "run" / "model.ckpt-7"), {
        "net/big": rng.standard_normal((1000, 1000)).astype(np.float32),
        "net/bias": np.arange(10, dtype=np.float32),
        "global_step": np.array(7, dtype=np.int64),
    })
    (root / "run" / "checkpoint").write_text('model_checkpoint_path: "/old/machine/train/model.ckpt-7"\n'
                                             'all_model_checkpoint_paths: "/old/machine/train/model.ckpt-7"\n')
    server = RangeHTTPServer(str(root)).start()
    try:
        yield server, str(root)
    finally:
        server.stop()


@pytest.mark.parametrize("url, want", [
    ("https://alice:hunter2@host:8443/a/b.ckpt?X-Amz-Signature=s3cr3t-token#frag", "https://host:8443/a/b.ckpt"),
    ("http://127.0.0.1:9/run/model.ckpt-7", "http://127.0.0.1:9/run/model.ckpt-7"),
    ("s3://bucket/runs/model.ckpt-100?versionId=3", "s3://bucket/runs/model.ckpt-100"),
    ("gs://bucket", "gs://bucket"),
    ("http://alice@[::1]:8080/x", "http://[::1]:8080/x"),
    ("http://alice:hunter2@host:notaport/x?t=s3cr3t-token", "http://host:notaport/x"),
])
def test_redact_drops_userinfo_query_and_fragment(url: str, want: str) -> None:
    assert _remote.redact(url) == want


def test_importing_ckptbridge_imports_no_fsspec() -> None:
    code = ("import sys, ckptbridge, ckptbridge.io.remote, ckptbridge.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_open_place_tells_file_prefix_and_directory(served: tuple[RangeHTTPServer, str]) -> None:
    server, _ = served
    base = server.url + "/run"
    cases = {
        base + "/model.ckpt-7": "model.ckpt-7",                        # a prefix: its .index exists
        base + "/model.ckpt-7.index": "model.ckpt-7.index",            # a file
        base + "/model.ckpt-7.data-00000-of-00001": "model.ckpt-7.data-00000-of-00001",
        base + "/": "model.ckpt-7",                                    # a directory: its state file (an absolute path of another machine)
        base: "model.ckpt-7",                                          # the same without the slash
    }
    for url, name in cases.items():
        place, got = _remote.open_place(url, progress=False)
        assert (place.name, got) == (base, name), url
        assert place.listdir() is None  # plain HTTP cannot list
        assert place.exists("model.ckpt-7.index") and not place.exists("model.ckpt-8.index")
    with pytest.raises(errors.NotFoundError, match="no checkpoint at"):
        _remote.open_place(base + "/model.ckpt-8", progress=False)


def test_pread_fetches_only_the_range_asked_for(served: tuple[RangeHTTPServer, str], monkeypatch: pytest.MonkeyPatch) -> None:
    server, root = served
    monkeypatch.setattr(_remote, "CHUNK", 1 << 20)
    place, prefix = _remote.open_place(server.url + "/run/model.ckpt-7", progress=False)
    local = open(os.path.join(root, "run", prefix + ".data-00000-of-00001"), "rb").read()
    server.reset()
    before = _remote.fetched()[0]
    with place.open(prefix + ".data-00000-of-00001") as f:
        assert f.size == len(local) > 3_000_000
        got = f.pread(1_000_003, 2_500_000)  # three requests of at most CHUNK
        assert got == local[1_000_003:3_500_003]
        gets = [e for e in server.log if e.method == "GET"]
        assert [e.range for e in gets] == ["bytes=1000003-2048578", "bytes=2048579-3097154", "bytes=3097155-3500002"]
        assert server.sent == 2_500_000 == f.bytes_fetched == _remote.fetched()[0] - before
        small = f.pread(10, 40)  # a small read fetches READAHEAD and serves the next small reads from it
        assert small == local[10:50] and f.pread(100, 8) == local[100:108]
        assert server.sent == 2_500_000 + _remote.READAHEAD
        with pytest.raises(errors.FormatError, match="truncated"):
            f.pread(f.size - 4, 8)
    assert place.bytes_fetched == server.sent


def test_a_dropped_connection_is_retried_then_reads_exactly(served: tuple[RangeHTTPServer, str], fast_retries: None) -> None:
    server, root = served
    place, prefix = _remote.open_place(server.url + "/run/model.ckpt-7", progress=False)
    local = open(os.path.join(root, "run", prefix + ".data-00000-of-00001"), "rb").read()
    server.fault(".data-00000-of-00001", "drop", times=_remote.ATTEMPTS - 1)
    f = place.open(prefix + ".data-00000-of-00001")
    assert f.pread(0, f.size) == local
    assert [e.status for e in server.log if e.method == "GET"] == [206] * _remote.ATTEMPTS


@pytest.mark.parametrize("kind, error, needle", [
    ("drop", _remote.RemoteError, f"failed {_remote.ATTEMPTS} times"),
    ("404", errors.NotFoundError, "no such remote file"),
    ("403", _remote.RemotePermissionError, "permission denied"),
])
def test_faults_become_one_clear_error(served: tuple[RangeHTTPServer, str], fast_retries: None, kind: str, error: type, needle: str) -> None:
    server, _ = served
    place, prefix = _remote.open_place(server.url + "/run/model.ckpt-7", progress=False)
    server.fault(".data-00000-of-00001", kind)
    with pytest.raises(error, match=needle) as e:
        place.open(prefix + ".data-00000-of-00001").pread(0, 3_000_000)
    assert isinstance(e.value, errors.CkptBridgeError)
    assert "model.ckpt-7.data-00000-of-00001" in str(e.value) and ";" in str(e.value)
    ranged = [x for x in server.log if x.method == "GET" and x.range is not None]
    assert len(ranged) == (_remote.ATTEMPTS if kind == "drop" else 0)  # only what may pass is retried


def test_credentials_are_sent_and_never_shown(served: tuple[RangeHTTPServer, str], fast_retries: None) -> None:
    server, root = served
    server.require(query="token=s3cr3t-token", auth=("alice", "hunter2"))
    host = server.url.split("://", 1)[1]
    url = f"http://alice:hunter2@{host}/run/model.ckpt-7?token=s3cr3t-token"
    place, prefix = _remote.open_place(url, progress=False)
    f = place.open(prefix + ".index")
    assert f.pread(0, f.size) == open(os.path.join(root, "run", prefix + ".index"), "rb").read()
    shown = [place.name, f.name, repr(place), repr(f)]
    server.fault(".index", "drop")
    with pytest.raises(_remote.RemoteError) as e:
        place.open(prefix + ".index").pread(0, f.size)
    shown.append(str(e.value))
    with pytest.raises(_remote.RemotePermissionError) as e2:  # a wrong token: refused, and the message holds neither
        _remote.open_place(f"http://alice:hunter2@{host}/run/model.ckpt-7.index?token=wrong-s3cr3t-token", progress=False)
    shown.append(str(e2.value))
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, text
    assert all(e.path.endswith("?token=s3cr3t-token") for e in server.log if "wrong" not in e.path)


# --------------------------------------------------------------------------- S3 (moto's server, s3fs), TensorFlow's files


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[Any]:
    """moto's standalone S3 server on 127.0.0.1, found by s3fs through the usual AWS variables; stopped after."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from servers import MotoS3

    server = MotoS3().start()
    with pytest.MonkeyPatch.context() as mp:
        # Where s3fs (botocore) looks by default: no credential or endpoint is passed in code.
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": server.endpoint}.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # an instance cached for another module's server is not ours
        fs = fsspec.filesystem("s3")  # the instance open_place gets too (fsspec caches them): one listing cache
        try:
            fs.mkdir("ckpts")
            yield server, fs
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            server.stop()


def _upload(fs: Any, local_dir: str, key: str) -> None:
    for name in sorted(os.listdir(local_dir)):
        fs.put_file(os.path.join(local_dir, name), f"{key}/{name}")
    fs.invalidate_cache()


@pytest.mark.tf
def test_s3_prefix_directory_and_listing(moto_s3: Any, ckpts: Any, tmp_path: Any) -> None:
    server, fs = moto_s3
    os.makedirs(tmp_path / "run")
    prefix = ckpts.build_sharded(str(tmp_path / "run"))  # three data shards, written by TensorFlow
    base = os.path.basename(prefix)
    _upload(fs, str(tmp_path / "run"), "ckpts/sharded")
    for url in ("s3://ckpts/sharded/" + base, "s3://ckpts/sharded/" + base + ".index", "s3://ckpts/sharded", "s3://ckpts/sharded/"):
        place, name = _remote.open_place(url, progress=False)
        assert place.name == "s3://ckpts/sharded"
        assert name == (base + ".index" if url.endswith(".index") else base), url  # the state file, or the one *.index
    listed = place.listdir()
    assert listed is not None and base + ".index" in listed and len([n for n in listed if ".data-" in n]) == 3
    for fname in listed:
        local = open(os.path.join(str(tmp_path / "run"), fname), "rb").read()
        with place.open(fname) as f:
            assert f.size == len(local) and f.pread(0, f.size) == local
    # a second prefix and no state file: the listing is ambiguous, and the error lists both
    fs.rm_file("ckpts/sharded/checkpoint")
    fs.pipe_file(f"ckpts/sharded/other.ckpt{'.index'}", b"x")
    fs.invalidate_cache()
    with pytest.raises(errors.FormatError, match="2 checkpoints"):
        _remote.open_place("s3://ckpts/sharded", progress=False)
    with pytest.raises(errors.NotFoundError, match="no checkpoint at s3://ckpts/sharded/nothing"):
        _remote.open_place("s3://ckpts/sharded/nothing", progress=False)


@pytest.mark.tf
def test_s3_reads_are_ranged(moto_s3: Any, tmp_path: Any) -> None:
    server, fs = moto_s3
    blob = np.random.default_rng(0).bytes(3_000_000)
    fs.pipe_file("ckpts/blob/model.ckpt-1.data-00000-of-00001", blob)
    fs.invalidate_cache()
    place, name = _remote.open_place("s3://ckpts/blob/model.ckpt-1.data-00000-of-00001", progress=False)
    f = place.open(name)
    before = server.sent
    assert f.pread(1_234_567, 1_000_000) == blob[1_234_567:2_234_567]
    assert server.sent - before == 1_000_000 == f.bytes_fetched


# --------------------------------------------------------------------------- the CLI over HTTP (no TensorFlow)

BIG_TENSORS = 12          # 12 x 8 MB: a ~100 MB checkpoint
BIG_ELEMENTS = 2_000_000


@pytest.fixture()
def big_served(tmp_path: Any, remote_extra: None) -> Iterator[tuple[RangeHTTPServer, str]]:
    """(server, local prefix): a ~100 MB V2 checkpoint (native writer) on an HTTP server on 127.0.0.1."""
    rng = np.random.default_rng(7)
    tensors = {f"net/layer{i:02d}/weights": rng.random(BIG_ELEMENTS, dtype=np.float32) for i in range(BIG_TENSORS)}
    tensors["net/logits/biases"] = rng.random(1000, dtype=np.float32)
    prefix = write_checkpoint(str(tmp_path / "www" / "big" / "model.ckpt-100"), tensors)
    server = RangeHTTPServer(str(tmp_path / "www")).start()
    try:
        yield server, prefix
    finally:
        server.stop()


def _local(prefix: str, suffix: str) -> int:
    return os.path.getsize(prefix + suffix)


def test_ls_fetches_the_index_only(big_served: tuple[RangeHTTPServer, str]) -> None:
    server, prefix = big_served
    server.reset()
    rc, out, err = in_process("ls", server.url + "/big/model.ckpt-100")
    assert rc == 0, err
    assert "net/layer11/weights" in out and f"{BIG_TENSORS + 1} tensors" in out
    index = _local(prefix, ".index")
    data = _local(prefix, ".data-00000-of-00001")
    assert not [e for e in server.log if e.method == "GET" and ".data-" in e.path]
    assert server.sent == index < data // 1000


def test_export_include_fetches_the_tensor_and_the_index(big_served: tuple[RangeHTTPServer, str], tmp_path: Any) -> None:
    server, prefix = big_served
    out = str(tmp_path / "out" / "one.npz")
    os.makedirs(os.path.dirname(out))
    server.reset()
    rc, _, err = in_process("export", server.url + "/big/model.ckpt-100", out, "--include", "^net/layer05/weights$")
    assert rc == 0, err
    with ckptbridge.read(out) as r, ckptbridge.read(prefix) as local:
        assert list(r.keys()) == ["net/layer05/weights"]
        got, want = r["net/layer05/weights"], local["net/layer05/weights"]
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    tensor = BIG_ELEMENTS * 4
    index = _local(prefix, ".index")
    # the tensor and the index, give or take one readahead block; the file is 100 MB
    assert tensor + index <= server.sent <= tensor + index + _remote.READAHEAD, server.sent
    assert _local(prefix, ".data-00000-of-00001") > 10 * server.sent


@pytest.mark.parametrize("fault, needle", [
    ("drop", f"failed {_remote.ATTEMPTS} times"),
    ("404", "model.ckpt-7.data-00000-of-00001"),
    ("403", "permission denied"),
])
def test_cli_faults_are_one_line_exit_2_and_nothing_written(served: tuple[RangeHTTPServer, str], fast_retries: None, tmp_path: Any,
                                                            fault: str, needle: str) -> None:
    server, _ = served
    dest = tmp_path / "dest"
    dest.mkdir()
    server.fault(".data-00000-of-00001", fault)
    rc, out, err = in_process("export", server.url + "/run/model.ckpt-7", str(dest / "out.npz"))
    error_line((rc, err), needle)
    assert out == "" and tree(str(dest)) == set() and leftovers(str(dest)) == []


def test_cli_never_shows_or_records_the_urls_credentials(served: tuple[RangeHTTPServer, str], fast_retries: None, tmp_path: Any) -> None:
    server, _ = served
    server.require(query="token=s3cr3t-token", auth=("alice", "hunter2"))
    host = server.url.split("://", 1)[1]
    url = f"http://alice:hunter2@{host}/run/model.ckpt-7?token=s3cr3t-token"
    out = str(tmp_path / "out.h5")
    shown = []
    for argv in (("ls", url), ("export", url, out), ("ls", out), ("verify", url)):
        rc, so, se = in_process(*argv)
        assert rc == 0, se
        shown += [so, se]
    with open(out, "rb") as f:
        archive = f.read().decode("latin-1")
    assert f"http://{host}/run/model.ckpt-7" in archive  # the recorded source, without its secrets
    shown.append(archive)
    with ckptbridge.read(out) as r:
        assert "net/big" in r.keys()
    server.fault(".index", "drop")
    rc, so, se = in_process("export", url, str(tmp_path / "again.npz"))
    error_line((rc, se), "failed")
    shown += [so, se]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    assert f"http://{host}/run/model.ckpt-7" in shown[-1]  # the message names the URL, without its secrets


def test_a_stored_zip_over_http_is_read_by_range(tmp_path: Any, remote_extra: None) -> None:
    rng = np.random.default_rng(3)
    big = rng.random(4_000_000, dtype=np.float32)
    ckpt = write_checkpoint(str(tmp_path / "src" / "model.ckpt-9"), {"big": big, "small": np.arange(10, dtype=np.int64)})
    (tmp_path / "www").mkdir()
    with zipfile.ZipFile(tmp_path / "www" / "run.zip", "w") as z:  # stored: members are read in place
        for name in sorted(os.listdir(os.path.dirname(ckpt))):
            z.write(os.path.join(os.path.dirname(ckpt), name), arcname="run/" + name)
    size = os.path.getsize(tmp_path / "www" / "run.zip")
    server = RangeHTTPServer(str(tmp_path / "www")).start()
    try:
        rc, out, err = in_process("export", server.url + "/run.zip", str(tmp_path / "small.npz"), "--include", "^small$")
        sent = server.sent
    finally:
        server.stop()
    assert rc == 0, err
    with ckptbridge.read(str(tmp_path / "small.npz")) as r:
        assert list(r.keys()) == ["small"] and r["small"].tobytes() == np.arange(10, dtype=np.int64).tobytes()
    assert sent < size // 10, (sent, size)  # the index, the small tensor and the zip's directory: not the 16 MB member


def test_a_truncated_tarball_over_http_is_one_line_and_nothing_written(tmp_path: Any, remote_extra: None) -> None:
    ckpt = write_checkpoint(str(tmp_path / "src" / "model.ckpt-1"), {"w": np.arange(50_000, dtype=np.float32)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(os.listdir(os.path.dirname(ckpt))):
            tar.add(os.path.join(os.path.dirname(ckpt), name), arcname=name)
    whole = buf.getvalue()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "model_2016.tar.gz").write_bytes(whole[: len(whole) * 2 // 3])
    dest = tmp_path / "dest"
    dest.mkdir()
    server = RangeHTTPServer(str(tmp_path / "www")).start()
    try:
        rc, out, err = in_process("export", server.url + "/model_2016.tar.gz", str(dest / "out.npz"))
    finally:
        server.stop()
    error_line((rc, err), "model_2016.tar.gz")
    assert out == "" and tree(str(dest)) == set()


# --------------------------------------------------------------------------- bit-exact against TensorFlow, remote sources


def _tf_checkpoint(prefix: str, version: str) -> str:
    """A small checkpoint written by TensorFlow's Saver (``version`` "v1": one table file, as the model zoo's 2016 releases)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(21)
    with tf.Graph().as_default():
        v1.Variable(rng.standard_normal((3, 3, 3, 16)).astype(np.float32), name="vgg_16/conv1/conv1_1/weights")
        v1.Variable(rng.integers(-9, 9, 16, dtype=np.int32), name="vgg_16/conv1/conv1_1/biases")
        v1.Variable(rng.standard_normal((64, 10)), name="vgg_16/fc8/weights")
        v1.Variable(np.array([True, False, True]), name="flags")
        v1.Variable(np.int64(12345), name="global_step")
        write_version = v1.train.SaverDef.V1 if version == "v1" else v1.train.SaverDef.V2
        saver = v1.train.Saver(write_version=write_version)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            return str(saver.save(sess, prefix, write_meta_graph=False))


def _export_and_compare(url: str, out: str, oracle: str, assert_same_as_tf: Any, *extra: str) -> None:
    rc, _, err = in_process("export", url, out, *extra)
    assert rc == 0, err
    with ckptbridge.read(out) as r:
        assert assert_same_as_tf(r, oracle) == 5


@pytest.mark.tf
def test_export_from_http_and_s3_is_bit_exact_with_tensorflow(ckpts: Any, assert_same_as_tf: Any, moto_s3: Any, tmp_path: Any) -> None:
    prefix = _tf_checkpoint(str(tmp_path / "www" / "run" / "model.ckpt-3"), "v2")
    moto, fs = moto_s3
    _upload(fs, str(tmp_path / "www" / "run"), "ckpts/tfrun")
    server = RangeHTTPServer(str(tmp_path / "www")).start()
    try:
        _export_and_compare(server.url + "/run/model.ckpt-3", str(tmp_path / "http.npz"), prefix, assert_same_as_tf)
        _export_and_compare(server.url + "/run/model.ckpt-3", str(tmp_path / "http-tf.npz"), prefix, assert_same_as_tf, "--engine", "tf")
        sent_http = server.sent
    finally:
        server.stop()
    before = moto.sent
    _export_and_compare("s3://ckpts/tfrun/model.ckpt-3", str(tmp_path / "s3.h5"), prefix, assert_same_as_tf)
    files = sum(os.path.getsize(os.path.join(os.path.dirname(prefix), n)) for n in os.listdir(os.path.dirname(prefix)))
    assert 0 < moto.sent - before <= files and 0 < sent_http <= 2 * files  # two exports over HTTP, each at most the files once


@pytest.mark.tf
def test_model_zoo_tarball_and_zip_over_http_are_bit_exact_with_tensorflow(ckpts: Any, assert_same_as_tf: Any, tmp_path: Any) -> None:
    v1 = _tf_checkpoint(str(tmp_path / "v1" / "vgg_16.ckpt"), "v1")
    v2 = _tf_checkpoint(str(tmp_path / "v2" / "model.ckpt-5"), "v2")
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "vgg_16_2016_08_28.tar.gz", "w:gz") as tar:  # as the tf-slim model zoo ships them
        tar.add(v1, arcname="vgg_16.ckpt")
    with zipfile.ZipFile(www / "run.zip", "w") as z:
        for name in sorted(os.listdir(os.path.dirname(v2))):
            z.write(os.path.join(os.path.dirname(v2), name), arcname="run/" + name)
    server = RangeHTTPServer(str(www)).start()
    try:
        _export_and_compare(server.url + "/vgg_16_2016_08_28.tar.gz", str(tmp_path / "zoo.npz"), v1, assert_same_as_tf)
        _export_and_compare(server.url + "/run.zip", str(tmp_path / "zip.npz"), v2, assert_same_as_tf)
    finally:
        server.stop()
    assert leftovers(str(tmp_path)) == []

