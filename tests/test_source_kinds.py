"""The source-kind registry, ``ckptbridge.sources`` (issue 22, item 3).

A new kind of source is defined here, in the test, and registered with one line:
``read``, ``export`` and ``ls`` then open it by its content, at a local path and
at a URL (the Range HTTP server of tests/servers.py), and every built-in kind still
takes what it took.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import sources
from ckptbridge._resolve import open_source
from ckptbridge._source import Source
from ckptbridge.errors import FormatError, NotFoundError
from ckptbridge.io.ranged import RangedFile
from ckptbridge.sources import Input, Kind
from ckptbridge.spec import TensorSpec

from helpers import in_process, same, write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
V1_FILE = os.path.join(HERE, "data", "v1", "tiny_net.ckpt")

# --------------------------------------------------------------------------- a toy kind: one module, one line

MAGIC = b"TOYCKPT\n"


class ToyKindSource(Source):
    """A file of :data:`MAGIC` and JSON: per tensor its dtype, shape and bytes in hex.  Read through a
    :class:`RangedFile`, so the same class reads it locally and at a URL."""

    kind = "toy"

    def __init__(self, f: RangedFile, path: str, owner: Any = None) -> None:
        self.path, self._owner = path, owner
        with f:
            doc = json.loads(f.pread(len(MAGIC), f.size - len(MAGIC)))
        self._arrays = {n: np.frombuffer(bytes.fromhex(t["hex"]), dtype=t["dtype"]).reshape(t["shape"]) for n, t in doc.items()}

    def specs(self) -> Mapping[str, TensorSpec]:
        return {n: TensorSpec(n, str(a.dtype), a.shape) for n, a in sorted(self._arrays.items())}

    def read(self, name: str) -> np.ndarray:
        self.spec(name)
        return self._arrays[name]

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()  # the place a URL opened, which the source owns


def recognise_toy(inp: Input) -> bool | None:
    return True if inp.head(len(MAGIC)) == MAGIC else None


def open_toy(inp: Input, found: Any) -> Source:
    return ToyKindSource(inp.open_file(), inp.shown, inp.place)


@pytest.fixture
def toy() -> Iterator[Kind]:
    kind = sources.register(Kind("toy", "a toy kind defined in a test", recognise_toy, open_toy))  # its whole integration
    try:
        yield kind
    finally:
        sources.unregister(kind.name)


TENSORS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, "step": np.array(7, dtype=np.int64)}


def write_toy(path: str, tensors: Mapping[str, np.ndarray] = TENSORS) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc = {n: {"dtype": str(a.dtype), "shape": list(a.shape), "hex": a.tobytes().hex()} for n, a in tensors.items()}
    with open(path, "wb") as f:
        f.write(MAGIC + json.dumps(doc).encode())
    return path


def _read_all(path: str) -> dict[str, np.ndarray]:
    with ckptbridge.read(path) as r:
        assert r.kind == "toy"
        return {n: np.array(r[n]) for n in r}


# --------------------------------------------------------------------------- the registry


def test_kinds_lists_the_built_in_kinds_in_the_order_they_are_tried() -> None:
    assert sources.kinds() == ("checkpoint-archive", "keras", "archive", "saved-model", "directory", "checkpoint", "v1")
    assert all(k.description for k in sources.KINDS.values())


def test_a_registered_kind_goes_ahead_of_the_ones_that_take_what_is_left(toy: Kind) -> None:
    assert sources.kinds() == ("checkpoint-archive", "keras", "archive", "saved-model", "toy", "directory", "checkpoint", "v1")
    with pytest.raises(FormatError, match="already registered"):
        sources.register(Kind("toy", "again", recognise_toy, open_toy))
    with pytest.raises(FormatError, match="no source kind named 'nope'"):
        sources.register(Kind("other", "misplaced", recognise_toy, open_toy), before="nope")
    sources.register(Kind("first", "tried first", recognise_toy, open_toy), before="checkpoint-archive")
    try:
        assert sources.kinds()[:2] == ("first", "checkpoint-archive")
    finally:
        sources.unregister("first")
    assert "other" not in sources.kinds()


def test_the_kind_that_opened_a_source_is_carried_on_it(tmp_path: Any) -> None:
    prefix = write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), TENSORS)
    ckptbridge.export(prefix, str(tmp_path / "a.npz"))
    with tarfile.open(tmp_path / "run.tar", "w") as t:
        t.add(str(tmp_path / "ck"), arcname="run")
    cases = {prefix: "checkpoint", prefix + ".index": "checkpoint", str(tmp_path / "ck"): "directory", V1_FILE: "v1",
             str(tmp_path / "a.npz"): "archive", str(tmp_path / "run.tar"): "checkpoint-archive"}
    for path, kind in cases.items():
        with open_source(path) as src:
            assert src.opened_by == kind, path


# --------------------------------------------------------------------------- the toy kind, locally and at a URL


def test_a_toy_kind_opens_locally_by_content_whatever_its_name(tmp_path: Any, toy: Kind) -> None:
    for name in ("model.toy", "weights"):
        got = _read_all(write_toy(str(tmp_path / name)))
        assert sorted(got) == sorted(TENSORS) and all(same(got[n], TENSORS[n]) for n in TENSORS)
    with open_source(str(tmp_path / "weights")) as src:
        assert src.opened_by == "toy"
    out = str(tmp_path / "out.npz")
    report = ckptbridge.export(str(tmp_path / "model.toy"), out)
    assert sorted(report.written) == sorted(TENSORS)
    with ckptbridge.read(out) as r:
        assert all(same(r[n], TENSORS[n]) for n in TENSORS)
        assert r.metadata()["engine"] == "toy"
    rc, out_text, _ = in_process("ls", str(tmp_path / "weights"))
    assert rc == 0 and "w" in out_text and "toy" in out_text
    # what the kinds behind it take is still theirs
    prefix = write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), {"v": np.ones(3, np.float16)})
    with open_source(prefix) as src, open_source(V1_FILE) as v1:
        assert src.opened_by == "checkpoint" and v1.opened_by == "v1"


@pytest.fixture
def http_root(tmp_path: Any) -> Iterator[tuple[str, str]]:
    """(root directory, its URL): the Range HTTP server of tests/servers.py over a fresh directory."""
    pytest.importorskip("fsspec", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    pytest.importorskip("aiohttp", reason="the [remote] extra (fsspec, aiohttp) is not installed")
    from servers import RangeHTTPServer

    root = tmp_path / "www"
    root.mkdir()
    server = RangeHTTPServer(str(root)).start()
    try:
        yield str(root), server.url
    finally:
        server.stop()


def test_a_toy_kind_opens_at_a_url(http_root: tuple[str, str], tmp_path: Any, toy: Kind) -> None:
    root, url = http_root
    write_toy(os.path.join(root, "toys", "model.toy"))
    shutil.copy(V1_FILE, os.path.join(root, "toys", "tiny_net.ckpt"))
    got = _read_all(f"{url}/toys/model.toy")
    assert sorted(got) == sorted(TENSORS) and all(same(got[n], TENSORS[n]) for n in TENSORS)
    with open_source(f"{url}/toys/model.toy") as src:
        assert src.opened_by == "toy" and src.path == f"{url}/toys/model.toy"
    with open_source(f"{url}/toys/tiny_net.ckpt") as src:
        assert src.opened_by == "v1"  # the toy declines what is not its own, at a URL too
    out = str(tmp_path / "out.npz")
    ckptbridge.export(f"{url}/toys/model.toy", out)
    with ckptbridge.read(out) as r:
        assert all(same(r[n], TENSORS[n]) for n in TENSORS)


def test_unrecognised_inputs_keep_their_messages(tmp_path: Any, toy: Kind) -> None:
    with pytest.raises(NotFoundError, match="no such file or checkpoint: .*nothing; check the path"):
        ckptbridge.read(str(tmp_path / "nothing"))
    with pytest.raises(FormatError, match="chooses a checkpoint inside an archive .*is not one"):
        ckptbridge.read(write_toy(str(tmp_path / "model.toy")), member="x")


def test_a_source_view_delegates_all_it_does_not_override(tmp_path: Any) -> None:
    from ckptbridge._source import SourceView

    class Doubled(SourceView):
        def read(self, name: str) -> np.ndarray:
            return self._inner.read(name) * 2

    prefix = write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), TENSORS)
    with open_source(str(tmp_path / "ck")) as src:
        view = Doubled(src)
        assert (view.path, view.kind, view.label, view.opened_by) == (src.path, src.kind, "native", "directory")
        assert view.specs() == src.specs() and view.origin() is src and view.checksum("w") == src.checksum("w")
        assert view.read_blocks("w", 8) is not None and same(view.read("w"), TENSORS["w"] * 2)
        view.close()
    with pytest.raises(ckptbridge.CkptBridgeError, match="is closed"):
        src.read("w")  # closing the view closed what it shows
    assert os.path.isfile(prefix + ".index")
