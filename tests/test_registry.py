"""The format and engine registries (issue 12, item 2) and the engine archives record (item 5).

A fourth archive format is defined here, in the test, and registered with one
line: export, read, rebuild, the dry run and the CLI's help then know it without
any other module being touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptbridge
from ckptbridge import _engines, cli, formats
from ckptbridge._source import ArchiveSource, Encoded, Sink, Source
from ckptbridge.errors import FormatError, OutputExistsError
from ckptbridge.formats import Format, Holds, meta
from ckptbridge.io import ckptfiles as _ckptfiles

from helpers import same, write_checkpoint

# --------------------------------------------------------------------------- a toy fourth format


class ToySource(ArchiveSource):
    """A JSON file: per tensor its dtype, shape, encoding and stored bytes in hex; plus the metadata."""

    kind = "toyjson"

    def __init__(self, path: str, *, verify: bool = True, max_tensor_bytes: int | None = None) -> None:
        self.path = path
        with open(path, encoding="utf-8") as f:
            self._doc = json.load(f)
        self._meta = self._doc["metadata"]
        self._extras = {}
        self._specs = {n: ckptbridge.TensorSpec(n, t["dtype"], tuple(t["shape"])) for n, t in sorted(self._doc["tensors"].items())}

    def read(self, name: str) -> np.ndarray:
        t = self._doc["tensors"][name]
        stored = np.frombuffer(bytes.fromhex(t["hex"]), dtype=np.dtype(t["stored"])).reshape(t["stored_shape"])
        return meta.decode(stored, t["dtype"], tuple(t["shape"]), t["encoding"], f"{self.path}: {name}")


class ToySink(Sink):
    """Keeps the tensors in memory, writes the JSON to a temporary name on finish, renames on publish."""

    def __init__(self, path: str, *, force: bool = False, source: str | None = None) -> None:
        if os.path.lexists(path) and not force:
            raise OutputExistsError(f"output {path} already exists")
        super().__init__(path)
        self._tmp, self._source = path + ".toy-tmp", source
        self._tensors: dict[str, Any] = {}

    def put(self, tensor: Encoded) -> None:  # checked, encoded and checksummed by Sink.write
        stored = tensor.stored
        self._tensors[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "encoding": tensor.encoding,
                                      "stored": stored.dtype.str, "stored_shape": list(stored.shape), "hex": stored.tobytes().hex()}

    def finish(self, metadata: dict[str, Any] | None = None) -> None:
        with open(self._tmp, "w", encoding="utf-8") as f:
            json.dump({"metadata": meta.provenance(self._source, metadata), "tensors": self._tensors}, f)

    @property
    def readback_path(self) -> str:
        return self._tmp

    def open_readback(self) -> Source:
        return ToySource(self._tmp)

    def publish(self) -> None:
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


@pytest.fixture
def toy() -> Iterator[Format]:
    """The fourth format, registered for one test: its whole integration is this line."""
    fmt = formats.register(Format("toyjson", (".toyjson",), ToySource, ToySink, "a JSON toy defined in a test"))
    try:
        yield fmt
    finally:
        formats.unregister(fmt.name)


# --------------------------------------------------------------------------- checkpoints


def _strings(*items: bytes) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


TENSORS = {
    "conv/weights": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
    "conv/bias_bf16": np.array([1.5, -0.0, np.inf], dtype=ml_dtypes.bfloat16),
    "global_step": np.array(42, dtype=np.int64),
    "vocab": _strings(b"a", b"", b"\xff\x00bytes"),
    "c128": np.array([1 + 2j, -3.5j], dtype=np.complex128),
}


def _checkpoint(tmp_path: Any, tensors: dict[str, np.ndarray] = TENSORS) -> str:
    return write_checkpoint(str(tmp_path / "ck" / "model.ckpt"), tensors)


# --------------------------------------------------------------------------- the fourth format


def test_a_fourth_format_round_trips_through_export_read_and_rebuild(tmp_path: Any, toy: Format) -> None:
    prefix = _checkpoint(tmp_path)
    out = str(tmp_path / "model.toyjson")
    report = ckptbridge.export(prefix, out)
    assert sorted(report.written) == sorted(TENSORS)
    with ckptbridge.read(out) as r:
        assert r.kind == "toyjson"
        assert sorted(r) == sorted(TENSORS)
        for name, want in TENSORS.items():
            assert same(r[name], want), name
        assert r.metadata()["engine"] == "native"
    back = str(tmp_path / "back" / "model.ckpt")
    ckptbridge.rebuild(out, back)
    with ckptbridge.read(back) as r:
        for name, want in TENSORS.items():
            assert same(r[name], want), name
    assert ckptbridge.verify(out).ok
    # read from the toy, written to a format the registry had before
    ckptbridge.export(out, str(tmp_path / "again.npz"))
    with ckptbridge.read(str(tmp_path / "again.npz")) as r:
        assert r.metadata()["engine"] == "toyjson"
        assert same(r["vocab"], TENSORS["vocab"])


def test_a_registered_format_is_in_the_cli_help_and_the_unknown_suffix_message(tmp_path: Any, toy: Format) -> None:
    assert ".toyjson" in _help_suffixes()
    with pytest.raises(FormatError, match=r"\.toyjson"):
        ckptbridge.export(_checkpoint(tmp_path), str(tmp_path / "out.unknown"))


def test_what_a_format_holds_is_checked_by_the_dry_run(tmp_path: Any) -> None:
    fmt = formats.register(Format("nobf16", (".nobf16",), ToySource, ToySink, "a toy without bfloat16",
                                  Holds(dtypes=lambda d: d.carried and d.name != "bfloat16")))
    try:
        assert "bfloat16" not in fmt.holds.dtype_names() and "float32" in fmt.holds.dtype_names()
        with pytest.raises(FormatError, match="conv/bias_bf16.*bfloat16"):
            ckptbridge.export(_checkpoint(tmp_path), str(tmp_path / "x.nobf16"), dry_run=True)
        assert not os.path.exists(tmp_path / "x.nobf16")
        ckptbridge.export(_checkpoint(tmp_path), str(tmp_path / "x.nobf16"), ckptbridge.Naming(select=ckptbridge.Select(exclude=["bf16"])),
                          dry_run=True)
    finally:
        formats.unregister("nobf16")


def test_the_registry_refuses_a_suffix_twice_and_bad_suffixes() -> None:
    with pytest.raises(FormatError, match="already belongs to npz"):
        formats.register(Format("dup", (".npz",), ToySource, ToySink, "a clash"))
    with pytest.raises(FormatError, match="lower case"):
        formats.register(Format("upper", (".NPY",), ToySource, ToySink, "upper case"))
    assert "dup" not in formats.FORMATS and "upper" not in formats.FORMATS


def test_safetensors_holds_exactly_the_dtypes_it_has_a_code_for() -> None:
    pytest.importorskip("safetensors")
    from ckptbridge.formats.safetensors import ST_DTYPES

    assert set(formats.FORMATS["safetensors"].holds.dtype_names()) == set(ST_DTYPES)
    assert {"string", "complex128"} <= set(formats.FORMATS["npz"].holds.dtype_names())


def test_reading_the_registry_imports_no_format_dependency() -> None:
    code = ("import sys, ckptbridge.formats as f, ckptbridge._engines as e; f.suffixes(); e.choices(); "
            "print(sorted(m for m in ('numpy', 'h5py', 'safetensors', 'tensorflow', 'ckptbridge.formats.npz') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the CLI reads the registries


def _subparser(name: str) -> Any:
    p = cli._parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name], sub


def _help_suffixes() -> list[str]:
    export, _ = _subparser("export")
    output = next(a for a in export._actions if a.dest == "output")
    return re.findall(r"\.[a-z0-9]+", output.help)


def test_cli_help_lists_exactly_the_registry_suffixes() -> None:
    assert _help_suffixes() == list(formats.suffixes())
    export, sub = _subparser("export")
    helps = {a.dest: a.help for a in sub._choices_actions}
    for command in ("export", "import", "ls"):
        assert re.findall(r"\.[a-z0-9]+", helps[command]) == list(formats.suffixes()), command
    compress = next(a for a in export._actions if a.dest == "compress")
    assert all(s in compress.help for f in formats.FORMATS.values() if f.compression for s in f.suffixes)


def test_cli_engine_choices_come_from_the_engine_registry() -> None:
    export, _ = _subparser("export")
    engine = next(a for a in export._actions if a.dest == "engine")
    assert tuple(engine.choices) == _engines.choices() == ("auto", *_engines.ENGINES)
    assert all(name in engine.help for name in _engines.choices())


def test_an_unknown_engine_is_refused_with_the_registry_choices(tmp_path: Any) -> None:
    with pytest.raises(FormatError, match="auto, native, tf"):
        ckptbridge.read(_checkpoint(tmp_path), engine="fast")


# --------------------------------------------------------------------------- what metadata records (item 5)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_export_records_the_native_engine_not_its_package(tmp_path: Any, suffix: str) -> None:
    out = str(tmp_path / f"out{suffix}")
    ckptbridge.export(_checkpoint(tmp_path), out, read=ckptbridge.ReadOptions(engine="native"))
    with ckptbridge.read(out) as r:
        assert r.metadata()["engine"] == "native"  # was "bundle"


def test_export_from_an_archive_records_its_format(tmp_path: Any) -> None:
    first, second = str(tmp_path / "a.npz"), str(tmp_path / "b.h5")
    ckptbridge.export(_checkpoint(tmp_path), first)
    ckptbridge.export(first, second)
    with ckptbridge.read(second) as r:
        assert r.metadata()["engine"] == "npz"  # was "formats"


@pytest.mark.tf
def test_export_records_tensorflow(tmp_path: Any) -> None:
    out = str(tmp_path / "out.npz")
    ckptbridge.export(_checkpoint(tmp_path, {"w": TENSORS["conv/weights"]}), out, read=ckptbridge.ReadOptions(engine="tf"))
    with ckptbridge.read(out) as r:
        assert r.metadata()["engine"] == "tensorflow"  # was "tf"


def test_every_engine_label_is_what_export_can_record() -> None:
    assert {e.name: e.label for e in _engines.ENGINES.values()} == {"native": "native", "tf": "tensorflow"}


# --------------------------------------------------------------------------- checkpoint file names


def test_checkpoint_file_names_agree_with_their_pattern(tmp_path: Any) -> None:
    p = str(tmp_path / "m.ckpt-7")
    shard = _ckptfiles.data_path(p, 2, 13)
    assert shard.endswith(".data-00002-of-00013")
    m = _ckptfiles.DATA_RE.search(shard)
    assert m is not None and int(m.group(1)) == 13
    assert _ckptfiles.prefix_of(shard) == p
    prefix = _checkpoint(tmp_path, {"w": np.zeros(3, np.float32)})
    files = _ckptfiles.checkpoint_files(prefix)
    assert files == [_ckptfiles.index_path(prefix), _ckptfiles.data_path(prefix, 0, 1)]
    assert _ckptfiles.complete_v2(prefix)
    assert _ckptfiles.prefix_of(_ckptfiles.index_path(prefix)) == prefix
    os.unlink(_ckptfiles.data_path(prefix, 0, 1))
    assert not _ckptfiles.complete_v2(prefix)
