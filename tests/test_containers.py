"""Checkpoints inside .tar / .tar.gz / .zip archives, and the readers through the ranged-file layer.

TensorFlow writes the checkpoints of the ``tf`` tests and is the oracle
(``tf.train.load_checkpoint`` on the local files, bit-exact).  The rest runs
without TensorFlow: the native readers through an in-memory place that counts
the bytes it serves, archives of native-written checkpoints, hostile members,
truncated archives and the temporary space.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import errors
from ckptbridge.bundle import BundleReader, V1Reader
from ckptbridge.io import containers as _containers
from ckptbridge.io.ranged import LocalFile, LocalPlace, Place, RangedFile, read_exact

from helpers import ERR, TMP_SUFFIX, assert_same_array, leftovers, write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
V1_DATA = os.path.join(HERE, "data", "v1")
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- an in-memory place


class MemoryFile(RangedFile):
    def __init__(self, name: str, data: bytes, log: list[tuple[str, int, int]]) -> None:
        self.name, self._data, self.size, self._log = name, data, len(data), log
        self.closed = 0

    def pread(self, offset: int, n: int) -> bytes:
        if offset + n > self.size:
            raise errors.FormatError(f"{self.name} is truncated")
        self._log.append((self.name, offset, n))
        return self._data[offset:offset + n]

    def close(self) -> None:
        self.closed += 1


class MemoryPlace(Place):
    """Files held in memory: no local directory, no mmap, every read logged."""

    def __init__(self, files: dict[str, bytes], name: str = "mem://bucket/run") -> None:
        self.files, self.name = files, name
        self.log: list[tuple[str, int, int]] = []
        self.closed = 0

    def open(self, relpath: str) -> RangedFile:
        if relpath not in self.files:
            raise errors.NotFoundError(f"{self.name}/{relpath} does not exist")
        return MemoryFile(f"{self.name}/{relpath}", self.files[relpath], self.log)

    def exists(self, relpath: str) -> bool:
        return relpath in self.files

    def listdir(self, reldir: str = "") -> list[str] | None:
        d = reldir.strip("/")
        return sorted(n.rsplit("/", 1)[-1] for n in self.files if (n.rsplit("/", 1)[0] if "/" in n else "") == d)

    def close(self) -> None:
        self.closed += 1

    def fetched(self, suffix: str = "") -> int:
        return sum(n for name, _, n in self.log if name.endswith(suffix))


def load_dir(directory: str) -> dict[str, bytes]:
    out = {}
    for n in os.listdir(directory):
        with open(os.path.join(directory, n), "rb") as f:
            out[n] = f.read()
    return out


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(15)
    return {
        "big/kernel": rng.standard_normal((256, 1024), dtype=np.float32),        # 1 MiB
        "small/bias": rng.standard_normal(7).astype(np.float64),
        "step": np.array(42, dtype=np.int64),
        "names": np.array([b"a", b"\x00b", b""], dtype=object),
    }


@pytest.fixture()
def v2_dir(tmp_path: Any) -> str:
    write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), tensors())
    return str(tmp_path / "ck")


# --------------------------------------------------------------------------- the interface


def test_local_file_reads_exactly_and_refuses_past_the_end(tmp_path: Any) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 4)
    with LocalFile(str(p)) as f:
        assert f.size == 1024
        assert f.pread(250, 10) == bytes(range(250, 256)) + bytes(range(4))
        assert bytes(f.buffer()[:3]) == b"\x00\x01\x02"
        with pytest.raises(errors.FormatError, match="truncated"):
            f.pread(1020, 5)
        with pytest.raises(errors.FormatError, match="truncated"):
            read_exact(f, 1020, 5)
    f.close()  # twice is fine
    with pytest.raises(errors.NotFoundError):
        LocalFile(str(tmp_path / "missing"))
    place = LocalPlace(str(tmp_path))
    assert place.listdir() == ["f.bin"] and place.exists("f.bin") and not place.exists("g")
    with pytest.raises(errors.FormatError):
        place.open("../etc/passwd")


# --------------------------------------------------------------------------- readers through a place


def test_v2_reader_through_a_memory_place_reads_what_a_tensor_needs(v2_dir: str) -> None:
    files = load_dir(v2_dir)
    place = MemoryPlace(files)
    want = tensors()
    with BundleReader("model.ckpt", place=place) as r:
        assert r.path == "mem://bucket/run/model.ckpt"
        index_bytes = place.fetched(".index")
        assert index_bytes == len(files["model.ckpt.index"])
        assert place.fetched(".data-00000-of-00001") == 0          # opening reads the index only
        got = r.read("small/bias")
        assert_same_array(got, want["small/bias"], "small/bias")
        assert place.fetched(".data-00000-of-00001") == want["small/bias"].nbytes  # that tensor's bytes, not the file
        for name in want:
            assert_same_array(r.read(name), want[name], name)
        # Streaming reads the tensor block by block, each block one ranged read.
        before = len(place.log)
        stream = r.read_blocks("big/kernel", 64 << 10)
        assert stream is not None
        parts = [a.copy() for _, a in stream]
        assert len(place.log) - before == len(parts) == 16
        assert np.concatenate(parts).reshape(256, 1024).tobytes() == want["big/kernel"].tobytes()
    assert place.closed == 1                                            # the reader owns its place


def test_v2_reader_through_a_place_still_checks_checksums(v2_dir: str) -> None:
    files = load_dir(v2_dir)
    data = bytearray(files["model.ckpt.data-00000-of-00001"])
    data[100] ^= 0x10                                                   # inside big/kernel (the first tensor by name)
    files["model.ckpt.data-00000-of-00001"] = bytes(data)
    with BundleReader("model.ckpt", place=MemoryPlace(files)) as r:
        with pytest.raises(errors.CorruptError, match="checksum"):
            r.read("big/kernel")
        stream = r.read_blocks("big/kernel", 64 << 10)
        assert stream is not None
        with pytest.raises(errors.CorruptError, match="checksum"):
            stream.drain()


def test_v2_reader_missing_shard_in_a_place(v2_dir: str) -> None:
    files = load_dir(v2_dir)
    del files["model.ckpt.data-00000-of-00001"]
    place = MemoryPlace(files)
    with pytest.raises(errors.CorruptError, match="missing"):
        BundleReader("model.ckpt", place=place)
    assert place.closed == 1


@pytest.mark.parametrize("name", ["tiny_net.ckpt", "dtypes.ckpt", "partitioned.ckpt"])
def test_v1_reader_through_a_memory_place_matches_the_local_reader(name: str) -> None:
    """The committed V1 fixtures (written by TensorFlow): ranged reads give what mmap gives, bit for bit."""
    place = MemoryPlace(load_dir(V1_DATA))
    with V1Reader(os.path.join(V1_DATA, name)) as local, V1Reader(name, place=place) as ranged:
        assert dict(ranged.specs()) == dict(local.specs())
        assert len(local.specs()) > 0
        for n in local.specs():
            assert_same_array(ranged.read(n), local.read(n), n)
    assert place.closed == 1


def test_open_source_on_a_place_like_a_remote_one(v2_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL resolves to (place, name) through _remote.open_place, then the engine reads there."""
    from ckptbridge import _resolve

    place = MemoryPlace(load_dir(v2_dir))
    monkeypatch.setattr(_resolve, "_remote_place", lambda url, progress: (place, "model.ckpt.index"))
    with ckptbridge.read("mem://bucket/run/model.ckpt.index") as r:
        assert r.path == "mem://bucket/run/model.ckpt"
        for name, want in tensors().items():
            assert_same_array(r[name], want, name)
    assert place.closed == 1


def test_a_url_without_fsspec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "fsspec" or m.startswith("fsspec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fsspec", None)                   # import fails as without the extra
    with pytest.raises(errors.MissingDependencyError, match=r"ckptbridge\[remote\]") as e:
        ckptbridge.read("s3://user:pw@bucket/run/model.ckpt?token=abc")
    assert "pw" not in str(e.value) and "token" not in str(e.value)


# --------------------------------------------------------------------------- archives of checkpoints (no TensorFlow)


def make_tar(path: str, entries: dict[str, str], mode: str = "w") -> str:
    """entries: archive name -> local path."""
    with tarfile.open(path, mode) as t:
        for arc, local in entries.items():
            t.add(local, arcname=arc)
    return path


def make_zip(path: str, entries: dict[str, str], compression: int = zipfile.ZIP_STORED) -> str:
    """A zip of ``entries`` (name in the archive -> local file), every member stored with ``compression``."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for arc, local in entries.items():
            z.write(local, arc)
    return path


def ckpt_entries(directory: str, under: str) -> dict[str, str]:
    return {f"{under}/{n}": os.path.join(directory, n) for n in sorted(os.listdir(directory))}


def check_tensors(path: str, **kw: Any) -> None:
    want = tensors()
    with ckptbridge.read(path, **kw) as r:
        assert set(r) == set(want)
        for name in want:
            assert_same_array(r[name], want[name], name)


def no_scratch(directory: str) -> None:
    assert [n for n in os.listdir(directory) if TMP_SUFFIX in n] == []


@pytest.fixture()
def tmpdir_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The system temp of this test: where ls/diff/verify unpack."""
    import tempfile

    d = tmp_path / "systemp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return str(d)


def test_uncompressed_tar_is_read_in_place(v2_dir: str, tmp_path: Any, tmpdir_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar(str(tmp_path / "run.tar"), ckpt_entries(v2_dir, "run"))
    made: list[str] = []
    real = _containers.Scratch.__init__
    monkeypatch.setattr(_containers.Scratch, "__init__", lambda self, d: (made.append(d or ""), real(self, d))[1])
    check_tensors(archive)
    assert made == []                                                    # nothing unpacked
    with ckptbridge.read(archive) as r:
        assert r.path == f"{archive}/run/model.ckpt"


def test_plain_tar_with_two_checkpoints_needs_member(v2_dir: str, tmp_path: Any) -> None:
    other = str(tmp_path / "other" / "other.ckpt")
    write_checkpoint(other, {"x": np.arange(3, dtype=np.int32)})
    archive = make_tar(str(tmp_path / "two.tar"), {**ckpt_entries(v2_dir, "a"), **ckpt_entries(os.path.dirname(other), "b")})
    with pytest.raises(errors.FormatError, match=r"holds 2 checkpoints: a/model.ckpt, b/other.ckpt; choose one with member") :
        ckptbridge.read(archive)
    check_tensors(archive, member="a/model.ckpt")
    check_tensors(archive, member="a/model.ckpt.index")                 # a file of it names it too
    with ckptbridge.read(archive, member="b/other.ckpt") as r:
        assert r["x"].tobytes() == np.arange(3, dtype=np.int32).tobytes()
    with pytest.raises(errors.NotFoundError, match="a/model.ckpt, b/other.ckpt"):
        ckptbridge.read(archive, member="c/model.ckpt")


def test_gzip_tar_is_unpacked_and_the_space_removed(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    archive = make_tar(str(tmp_path / "run.tar.gz"), ckpt_entries(v2_dir, "run"), "w:gz")
    r = ckptbridge.read(archive)
    assert len([n for n in os.listdir(tmpdir_env) if TMP_SUFFIX in n]) == 1   # unpacked into the system temp
    r.close()
    no_scratch(tmpdir_env)
    check_tensors(archive)
    out = str(tmp_path / "out" / "w.npz")
    os.makedirs(os.path.dirname(out))
    ckptbridge.export(archive, out)                                      # unpacked beside the output, then removed
    assert sorted(os.listdir(os.path.dirname(out))) == ["w.npz"]
    with np.load(out) as z:
        assert z["big/kernel"].tobytes() == tensors()["big/kernel"].tobytes()
    no_scratch(tmpdir_env)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_of_a_v2_prefix(v2_dir: str, tmp_path: Any, tmpdir_env: str, compression: int) -> None:
    archive = str(tmp_path / "model.zip")
    make_zip(archive, ckpt_entries(v2_dir, "m"), compression)
    check_tensors(archive)
    no_scratch(tmpdir_env)


def test_a_zip_mixing_stored_and_deflated_members(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    archive = str(tmp_path / "mixed.zip")
    with zipfile.ZipFile(archive, "w") as z:
        for arc, local in ckpt_entries(v2_dir, "m").items():
            z.write(local, arc, zipfile.ZIP_DEFLATED if arc.endswith(".index") else zipfile.ZIP_STORED)
    check_tensors(archive)
    no_scratch(tmpdir_env)


def test_v1_file_in_a_gzip_tar_like_the_model_zoo(tmp_path: Any, tmpdir_env: str) -> None:
    archive = make_tar(str(tmp_path / "tiny_2016_08_28.tar.gz"), {"tiny_net.ckpt": os.path.join(V1_DATA, "tiny_net.ckpt")}, "w:gz")
    with ckptbridge.read(archive) as got, ckptbridge.read(os.path.join(V1_DATA, "tiny_net.ckpt")) as want:
        assert list(got) == list(want) and len(want) > 0
        for n in want:
            assert_same_array(got[n], want[n], n)
    no_scratch(tmpdir_env)


def test_an_archive_without_a_checkpoint(tmp_path: Any) -> None:
    readme = tmp_path / "README"
    readme.write_text("no weights here")
    archive = make_tar(str(tmp_path / "empty.tar"), {"README": str(readme)})
    with pytest.raises(errors.NotFoundError, match="no checkpoint in .*README"):
        ckptbridge.read(archive)


def _tar_with(path: str, members: list[tarfile.TarInfo], data: bytes = b"x") -> str:
    with tarfile.open(path, "w") as t:
        for m in members:
            t.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return i


@pytest.mark.parametrize("member", [
    _info("../x"), _info("/abs/model.ckpt"), _info("run/../../x"),
    _info("run/link", tarfile.SYMTYPE, "../../etc/passwd"), _info("run/link", tarfile.SYMTYPE, "/etc/passwd"),
    _info("run/hard", tarfile.LNKTYPE, "../outside"),
], ids=["dotdot", "absolute", "nested-dotdot", "symlink-up", "symlink-absolute", "hardlink-up"])
def test_escaping_tar_members_are_refused(tmp_path: Any, member: tarfile.TarInfo, v2_dir: str) -> None:
    archive = str(tmp_path / "evil.tar")
    with tarfile.open(archive, "w") as t:
        for arc, local in ckpt_entries(v2_dir, "run").items():
            t.add(local, arcname=arc)
        t.addfile(member, io.BytesIO(b"x") if member.isreg() else None)
    with pytest.raises(errors.UnsafeArchiveError, match="outside the archive"):
        ckptbridge.read(archive)


def test_escaping_zip_members_are_refused(tmp_path: Any) -> None:
    for name, data, link in [("../x", b"x", False), ("/abs", b"x", False), ("run/link", b"../../secret", True)]:
        archive = str(tmp_path / "evil.zip")
        with zipfile.ZipFile(archive, "w") as z:
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (0o120777 << 16)
            z.writestr(info, data)
        with pytest.raises(errors.UnsafeArchiveError, match="outside the archive"):
            ckptbridge.read(archive)


def test_links_inside_the_archive_are_followed(v2_dir: str, tmp_path: Any) -> None:
    archive = str(tmp_path / "linked.tar")
    with tarfile.open(archive, "w") as t:
        for arc, local in ckpt_entries(v2_dir, "store").items():
            t.add(local, arcname=arc)
        for n in sorted(os.listdir(v2_dir)):
            t.addfile(_info(f"run/{n}", tarfile.SYMTYPE, f"../store/{n}"))
    check_tensors(archive, member="run/model.ckpt")


def test_unpacking_refuses_to_fill_the_disk(v2_dir: str, tmp_path: Any, tmpdir_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar(str(tmp_path / "run.tgz"), ckpt_entries(v2_dir, "run"), "w:gz")
    monkeypatch.setattr(_containers, "RESERVE_BYTES", 1 << 62)
    with pytest.raises(errors.CkptBridgeError, match="not enough free space"):
        ckptbridge.read(archive)
    no_scratch(tmpdir_env)


class Interrupting(RangedFile):
    """A local file whose reads stop with Ctrl-C once ``after`` bytes are read (as a signal would arrive)."""

    def __init__(self, path: str, after: int) -> None:
        self._f, self.name, self.after, self.read = LocalFile(path), path, after, 0
        self.size = self._f.size

    def pread(self, offset: int, n: int) -> bytes:
        self.read += n
        if self.read > self.after:
            raise KeyboardInterrupt
        return self._f.pread(offset, n)

    def close(self) -> None:
        self._f.close()


def test_ctrl_c_while_unpacking_removes_the_scratch(tmp_path: Any) -> None:
    rng = np.random.default_rng(1)
    write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), {"w": rng.standard_normal(1 << 20, dtype=np.float32)})  # 4 MiB
    archive = make_tar(str(tmp_path / "run.tar.gz"), ckpt_entries(str(tmp_path / "ck"), "run"), "w:gz")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    f = Interrupting(archive, os.path.getsize(archive) // 2)
    with pytest.raises(KeyboardInterrupt):
        _containers.open_container(f, scratch_dir=str(scratch))
    assert f.read > f.after and os.listdir(scratch) == []               # it was unpacking, and it left nothing


def test_a_tar_at_a_url_is_read_by_range(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote uncompressed tar: listing reads its headers and the index, one tensor about its bytes."""
    from ckptbridge import _resolve

    rng = np.random.default_rng(2)
    big = rng.standard_normal(1 << 21, dtype=np.float32)                  # 8 MiB
    write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), {"big": big, "small": np.arange(4, dtype=np.int16)})
    archive = make_tar(str(tmp_path / "run.tar"), ckpt_entries(str(tmp_path / "ck"), "run"))
    place = MemoryPlace({"run.tar": open(archive, "rb").read()}, name="mem://bucket")
    monkeypatch.setattr(_resolve, "_remote_place", lambda url, progress: (place, "run.tar"))
    with ckptbridge.read("mem://bucket/run.tar") as r:
        assert r.path == "mem://bucket/run.tar/run/model.ckpt"
        assert sorted(r.specs) == ["big", "small"]
        listed = place.fetched()
        assert listed < 512 << 10                                         # headers and the index, not the 8 MiB
        assert r["small"].tobytes() == np.arange(4, dtype=np.int16).tobytes()
        assert place.fetched() - listed == 8                              # exactly that tensor's bytes
        assert r["big"].tobytes() == big.tobytes()
    assert place.closed == 1


def test_scratch_is_in_the_ledger_the_cli_sweeps(tmp_path: Any) -> None:
    from ckptbridge.io import atomic as _atomic

    s = _containers.Scratch(str(tmp_path))
    open(os.path.join(s.path, "f"), "wb").close()
    assert s.path.endswith(TMP_SUFFIX) and s.path in _atomic._pending
    _atomic.discard_pending()                                            # what the CLI does when a signal stops a command
    assert not os.path.exists(s.path) and s.path not in _atomic._pending


def cli(*args: str, cwd: str, tmpdir: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=tmpdir, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ckptbridge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERR) and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar", "w"), (".zip", "zip")])
def test_cli_truncated_tarball(v2_dir: str, tmp_path: Any, tmpdir_env: str, suffix: str, mode: str) -> None:
    whole = str(tmp_path / f"whole{suffix}")
    if mode == "zip":
        make_zip(whole, ckpt_entries(v2_dir, "run"), zipfile.ZIP_DEFLATED)
    else:
        make_tar(whole, ckpt_entries(v2_dir, "run"), mode)
    data = open(whole, "rb").read()
    cut = str(tmp_path / f"cut{suffix}")
    with open(cut, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    out.mkdir()
    r = cli("export", cut, str(out / "w.npz"), "-q", cwd=str(tmp_path), tmpdir=tmpdir_env)
    one_line(r, "truncated")
    assert os.listdir(out) == []                                         # nothing at the destination, no scratch left
    assert leftovers(str(tmp_path)) == []


def test_cli_member_and_escape(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    other = str(tmp_path / "other" / "other.ckpt")
    write_checkpoint(other, {"x": np.arange(3, dtype=np.int32)})
    archive = make_tar(str(tmp_path / "two.tar"), {**ckpt_entries(v2_dir, "a"), **ckpt_entries(os.path.dirname(other), "b")})
    one_line(cli("ls", archive, cwd=str(tmp_path), tmpdir=tmpdir_env), "a/model.ckpt, b/other.ckpt", "--member")
    r = cli("ls", archive, "--member", "b/other.ckpt", "--json", cwd=str(tmp_path), tmpdir=tmpdir_env)
    assert r.returncode == 0, r.stderr
    assert [t["name"] for t in json.loads(r.stdout)["tensors"]] == ["x"]
    evil = str(tmp_path / "evil.tgz")
    with tarfile.open(evil, "w:gz") as t:
        t.addfile(_info("../../x"), io.BytesIO(b"x"))
    out = tmp_path / "out"
    out.mkdir()
    one_line(cli("export", evil, str(out / "w.npz"), cwd=str(tmp_path), tmpdir=tmpdir_env), "outside the archive")
    r = cli("diff", archive, v2_dir, "--member-a", "a/model.ckpt", cwd=str(tmp_path), tmpdir=tmpdir_env)
    assert r.returncode == 0 and r.stdout.startswith("identical: 4 tensors"), (r.stdout, r.stderr)
    one_line(cli("diff", v2_dir, archive, cwd=str(tmp_path), tmpdir=tmpdir_env), "--member-b")
    assert os.listdir(out) == [] and os.listdir(tmpdir_env) == []
    assert not os.path.exists(tmp_path.parent / "x")


def tar_bytes(entries: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """An uncompressed tar of ``entries`` (archive name -> local path) and where each member's header starts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for arc, local in entries.items():
            t.add(local, arcname=arc)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        offsets = {m.name: m.offset for m in t.getmembers()}
    return buf.getvalue(), offsets


def gzip_parts(data: bytes, cuts: list[int]) -> bytes:
    """``data`` as one gzip member per part between ``cuts``: what pigz, bgzip or ``cat a.gz b.gz`` write."""
    bounds = [0, *cuts, len(data)]
    out = b"".join(gzip.compress(data[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert gzip.decompress(out) == data                                  # a valid gzip file: gzip -d reads it all
    return out


@pytest.mark.parametrize("where", ["between-checkpoints", "inside-a-file", "every-4k"])
def test_a_gzip_of_several_members_reads_like_one(v2_dir: str, tmp_path: Any, tmpdir_env: str, where: str) -> None:
    """tarfile's "r|gz" stopped at the end of the first gzip member: the archive then held a's checkpoint only."""
    other = str(tmp_path / "other" / "other.ckpt")
    write_checkpoint(other, {"x": np.arange(3, dtype=np.int32)})
    data, offsets = tar_bytes({**ckpt_entries(v2_dir, "a"), **ckpt_entries(os.path.dirname(other), "b")})
    cuts = {"between-checkpoints": [offsets["b/other.ckpt.data-00000-of-00001"]],
            "inside-a-file": [offsets["a/model.ckpt.data-00000-of-00001"] + 700_001],
            "every-4k": list(range(4096, len(data), 4096))}[where]
    single, multi = tmp_path / "one.tar.gz", tmp_path / "parts.tar.gz"
    single.write_bytes(gzip.compress(data))
    multi.write_bytes(gzip_parts(data, cuts))
    for archive in (str(single), str(multi)):
        with pytest.raises(errors.FormatError, match=r"holds 2 checkpoints: a/model.ckpt, b/other.ckpt; choose one"):
            ckptbridge.read(archive)
        check_tensors(archive, member="a/model.ckpt")
        with ckptbridge.read(archive, member="b/other.ckpt") as r:
            assert r["x"].tobytes() == np.arange(3, dtype=np.int32).tobytes()
    no_scratch(tmpdir_env)


def test_a_damaged_later_gzip_member_is_damage(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    data, offsets = tar_bytes(ckpt_entries(v2_dir, "a"))
    blob = bytearray(gzip_parts(data, [offsets["a/model.ckpt.index"]]))
    blob[-6] ^= 0xFF                                                      # the last member's CRC-32
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(bytes(blob))
    with pytest.raises(errors.FormatError, match="truncated or damaged"):
        ckptbridge.read(str(archive))
    no_scratch(tmpdir_env)


@pytest.mark.parametrize("order", ["file-first", "directory-first"])
def test_a_file_and_a_directory_of_one_name(v2_dir: str, tmp_path: Any, tmpdir_env: str, order: str) -> None:
    """The clash is in the archive: it used to surface as "File exists: o/x.npz", blaming the output."""
    archive = str(tmp_path / "clash.tgz")
    with tarfile.open(archive, "w:gz") as t:
        if order == "file-first":
            t.addfile(_info("m"), io.BytesIO(b"x"))
        for arc, local in ckpt_entries(v2_dir, "m").items():
            t.add(local, arcname=arc)
        if order == "directory-first":
            t.addfile(_info("m"), io.BytesIO(b"x"))
    out = tmp_path / "o"
    out.mkdir()
    line = one_line(cli("export", archive, str(out / "x.npz"), cwd=str(tmp_path), tmpdir=tmpdir_env),
                    "clash.tgz holds both a file and a directory named 'm'")
    assert "x.npz" not in line and "internal error" not in line
    assert os.listdir(out) == [] and leftovers(str(tmp_path)) == []
    zipped = str(tmp_path / "clash.zip")
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m", b"x")
        for arc, local in ckpt_entries(v2_dir, "m").items():
            z.write(local, arc)
    with pytest.raises(errors.FormatError, match="clash.zip holds both a file and a directory named 'm'"):
        ckptbridge.read(zipped)
    no_scratch(tmpdir_env)


@pytest.mark.parametrize("segments,needle", [(10_000, "longer than any file system path"), (1_500, "1501 path segments deep")])
def test_member_names_no_file_system_holds(tmp_path: Any, tmpdir_env: str, segments: int, needle: str) -> None:
    """10,000 segments ended in "internal error: maximum recursion depth" (os.makedirs recurses per level)."""
    deep = "/".join(["a"] * segments) + "/model.ckpt.index"
    for suffix in (".tar.gz", ".tar"):
        archive = str(tmp_path / f"deep{suffix}")
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w", format=tarfile.PAX_FORMAT) as t:
            info = tarfile.TarInfo(deep)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
        line = one_line(cli("ls", archive, cwd=str(tmp_path), tmpdir=tmpdir_env), needle)
        assert "internal error" not in line and len(line) < 1000
    no_scratch(tmpdir_env)


def test_a_deep_name_within_the_bounds_unpacks(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    under = "/".join(f"d{i}" for i in range(_containers.MAX_NAME_DEPTH - 1))
    archive = make_tar(str(tmp_path / "deep.tgz"), {f"{under}/{n}": os.path.join(v2_dir, n) for n in os.listdir(v2_dir)}, "w:gz")
    check_tensors(archive)
    no_scratch(tmpdir_env)


def _with_directory_offset(src: str, dest: str, offset: int) -> None:
    data = bytearray(open(src, "rb").read())
    end = data.rindex(b"PK\x05\x06")
    data[end + 16:end + 20] = struct.pack("<I", offset)
    open(dest, "wb").write(bytes(data))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_zip_directory_offset_that_points_elsewhere(v2_dir: str, tmp_path: Any, tmpdir_env: str, compression: int) -> None:
    """An end record pointing past the end gave negative offsets: "internal error: ValueError: bad range"."""
    whole = str(tmp_path / "whole.zip")
    make_zip(whole, ckpt_entries(v2_dir, "m"), compression)
    size = os.path.getsize(whole)
    with zipfile.ZipFile(whole) as z:
        start = z.start_dir
    cases = [(size + 100, f"byte {size + 100}, past the end of the {size}-byte file"),
             (0xFFFFFFF0, f"byte {0xFFFFFFF0}, past the end of the {size}-byte file"),
             (start + 10, f"byte {start + 10}, but it is at byte {start}")]
    for offset, needle in cases:
        bad = str(tmp_path / "bad.zip")
        _with_directory_offset(whole, bad, offset)
        with pytest.raises(errors.CorruptError, match="damaged"):
            ckptbridge.read(bad)
        line = one_line(cli("ls", bad, cwd=str(tmp_path), tmpdir=tmpdir_env), needle, "damaged")
        assert "internal error" not in line
    no_scratch(tmpdir_env)


def test_a_zip_member_placed_outside_the_file(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    archive = str(tmp_path / "moved.zip")
    make_zip(archive, ckpt_entries(v2_dir, "m"))
    data = bytearray(open(archive, "rb").read())
    cd = data.index(b"PK\x01\x02")
    data[cd + 42:cd + 46] = struct.pack("<I", len(data) + 4096)          # the first member's local header offset
    open(archive, "wb").write(bytes(data))
    with pytest.raises(errors.CorruptError, match=rf"outside the \d+ bytes before the directory \(a {len(data)}-byte file\)"):
        ckptbridge.read(archive)


def test_a_zip_directory_that_hides_members_is_damage(v2_dir: str, tmp_path: Any, tmpdir_env: str) -> None:
    """zipfile returns the entries before one whose comment length runs past the directory: the checkpoint's
    .index then went missing and the archive read as one without a checkpoint."""
    archive = str(tmp_path / "hidden.zip")
    make_zip(archive, ckpt_entries(v2_dir, "m"))
    data = bytearray(open(archive, "rb").read())
    cd = data.index(b"PK\x01\x02")
    data[cd + 32:cd + 34] = b"\xff\xff"                                    # the first entry's comment swallows the rest
    open(archive, "wb").write(bytes(data))
    with pytest.raises(errors.CorruptError, match="lists 2 members but 1 can be read"):
        ckptbridge.read(archive)


# --------------------------------------------------------------------------- with TensorFlow


@pytest.fixture(scope="module")
def tf_ckpts(module_tmp: Callable[[str], Any]) -> dict[str, str]:
    """A small net saved by TensorFlow's Saver as V1 (one file) and V2 (a prefix)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    d = str(module_tmp("tfck"))
    out = {}
    with tf.Graph().as_default():
        v1.set_random_seed(15)
        v1.get_variable("conv1/weights", [3, 3, 3, 8], dtype=tf.float32)
        v1.get_variable("conv1/biases", [8], dtype=tf.float32)
        v1.get_variable("fc/weights", [64, 10], dtype=tf.float64)
        v1.get_variable("fc6/weights", [512, 1024], dtype=tf.float32)   # 2 MiB: a V1 file of several table blocks
        v1.train.get_or_create_global_step()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            os.makedirs(os.path.join(d, "v1"))
            out["v1"] = v1.train.Saver(write_version=v1.train.SaverDef.V1).save(sess, os.path.join(d, "v1", "net.ckpt"), write_meta_graph=False)
            out["v2"] = v1.train.Saver().save(sess, os.path.join(d, "v2", "model.ckpt"), global_step=100)
    return out


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
def test_tf_model_zoo_tar_gz_of_a_v1_file(tf_ckpts: dict[str, str], tmp_path: Any, tmpdir_env: str, assert_same_as_tf: Any,
                                          engine: str) -> None:
    archive = make_tar(str(tmp_path / "net_2016_08_28.tar.gz"), {"net.ckpt": tf_ckpts["v1"]}, "w:gz")
    out = str(tmp_path / "net.npz")
    ckptbridge.export(archive, out, read=ckptbridge.ReadOptions(engine=engine))
    with ckptbridge.read(out) as got:
        assert assert_same_as_tf(got, tf_ckpts["v1"]) == 5
        assert got.metadata()["source"] == f"{archive}/net.ckpt"
    assert leftovers(str(tmp_path)) == [] and os.listdir(tmpdir_env) == []


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_tf_zip_of_a_v2_prefix(tf_ckpts: dict[str, str], tmp_path: Any, tmpdir_env: str, assert_same_as_tf: Any,
                               engine: str, compression: int) -> None:
    directory = os.path.dirname(tf_ckpts["v2"])
    archive = str(tmp_path / "model.zip")
    with zipfile.ZipFile(archive, "w", compression) as z:
        for n in sorted(os.listdir(directory)):
            z.write(os.path.join(directory, n), f"train/{n}")             # with the state file and the .meta
    with ckptbridge.read(archive, engine=engine) as r:
        assert r.path.endswith("model.zip/train/model.ckpt-100")
        assert assert_same_as_tf(r, tf_ckpts["v2"]) == 5
    assert os.listdir(tmpdir_env) == []                                  # TensorFlow's staging and unpacking both removed


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
def test_tf_plain_tar_with_two_checkpoints(tf_ckpts: dict[str, str], tmp_path: Any, tmpdir_env: str, assert_same_as_tf: Any,
                                           engine: str) -> None:
    directory = os.path.dirname(tf_ckpts["v2"])
    entries = {f"v2/{n}": os.path.join(directory, n) for n in sorted(os.listdir(directory))}
    archive = make_tar(str(tmp_path / "both.tar"), {**entries, "v1/net.ckpt": tf_ckpts["v1"]})
    with pytest.raises(errors.FormatError, match="v1/net.ckpt, v2/model.ckpt-100"):
        ckptbridge.read(archive, engine=engine)
    with ckptbridge.read(archive, engine=engine, member="v1/net.ckpt") as r:
        assert assert_same_as_tf(r, tf_ckpts["v1"]) == 5
    with ckptbridge.read(archive, engine=engine, member="v2/model.ckpt-100") as r:
        assert assert_same_as_tf(r, tf_ckpts["v2"]) == 5
    assert os.listdir(tmpdir_env) == []


@pytest.mark.tf
def test_tf_v1_through_a_place_reads_the_blocks_a_tensor_needs(tf_ckpts: dict[str, str], assert_same_as_tf: Any) -> None:
    files = load_dir(os.path.dirname(tf_ckpts["v1"]))
    size = len(files["net.ckpt"])
    place = MemoryPlace(files)
    with V1Reader("net.ckpt", place=place) as r:
        opened = place.fetched("net.ckpt")
        assert opened < size // 4                                        # the footer, the index and the metadata block
        small = r.read("conv1/biases")
        assert place.fetched("net.ckpt") - opened < size // 4            # that tensor's block, not fc6's 2 MiB
        assert small.shape == (8,)
        assert assert_same_as_tf({n: r.read(n) for n in r.specs()}, tf_ckpts["v1"]) == 5


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
def test_tf_tar_gz_of_several_gzip_members(tf_ckpts: dict[str, str], tmp_path: Any, tmpdir_env: str, assert_same_as_tf: Any,
                                           engine: str) -> None:
    """A .tar.gz written as two gzip members (gzip -t passes, GNU tar lists both): its first part alone held
    step 100's V2 checkpoint, which was read without a word about the V1 one after it."""
    directory = os.path.dirname(tf_ckpts["v2"])
    entries = {f"v2/{n}": os.path.join(directory, n) for n in sorted(os.listdir(directory))}
    data, offsets = tar_bytes({**entries, "v1/net.ckpt": tf_ckpts["v1"]})
    archive = str(tmp_path / "both.tar.gz")
    with open(archive, "wb") as f:
        f.write(gzip_parts(data, [offsets["v1/net.ckpt"]]))
    with pytest.raises(errors.FormatError, match="holds 2 checkpoints: v1/net.ckpt, v2/model.ckpt-100"):
        ckptbridge.read(archive, engine=engine)
    with ckptbridge.read(archive, engine=engine, member="v1/net.ckpt") as r:
        assert assert_same_as_tf(r, tf_ckpts["v1"]) == 5
    with ckptbridge.read(archive, engine=engine, member="v2/model.ckpt-100") as r:
        assert assert_same_as_tf(r, tf_ckpts["v2"]) == 5
    out = tmp_path / "out"
    out.mkdir()
    one_line(cli("export", archive, str(out / "w.npz"), cwd=str(tmp_path), tmpdir=tmpdir_env), "holds 2 checkpoints", "--member")
    assert os.listdir(out) == [] and os.listdir(tmpdir_env) == []
