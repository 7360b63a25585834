"""``ckptbridge.save`` / ``ckptbridge.load``: a dict of arrays to any format and back, exactly, without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ckptbridge
from ckptbridge import FormatError, OutputExistsError, UncarriedDtypeError

from helpers import CLI_ENV, raw_bundle, same

ARRAYS = {
    "net/w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "net/b": np.array([1.5, -0.0], dtype=ml_dtypes.bfloat16),
    "net/f8": np.array([0.5, 448.0], dtype=ml_dtypes.float8_e4m3fn),
    "net/q": np.array([[-128, 127]], dtype=np.int8).view([("qint8", "i1")]),
    "step": np.array(7, dtype=np.int64),
    "names": np.array([b"", b"\x00\xff"], dtype=object),
}


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".ckpt"])
def test_save_then_load_is_bit_exact(tmp_path: Any, suffix: str) -> None:
    path = str(tmp_path / f"out{suffix}")
    report = ckptbridge.save(ARRAYS, path)
    assert sorted(report.written) == sorted(ARRAYS)
    got = ckptbridge.load(path)
    assert sorted(got) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        assert same(got[name], want), name
        assert got[name].flags.writeable  # load hands out arrays the caller owns


def test_save_keeps_string_metadata_in_archives_and_refuses_it_for_checkpoints(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    ckptbridge.save({"w": ARRAYS["net/w"], "f8": ARRAYS["net/f8"]}, path, metadata={"source": "unit test"})
    with ckptbridge.read(path) as r:
        assert r.metadata()["user"] == {"source": "unit test"}
    with pytest.raises(FormatError, match="no place for metadata"):
        ckptbridge.save({"w": ARRAYS["net/w"]}, str(tmp_path / "c" / "m.ckpt"), metadata={"a": "b"})
    assert not os.path.exists(tmp_path / "c" / "m.ckpt.index")
    with pytest.raises(FormatError, match="strings to strings"):
        ckptbridge.save({"w": ARRAYS["net/w"]}, str(tmp_path / "x.npz"), metadata={"a": 1})  # type: ignore[dict-item]


def test_save_refuses_what_it_cannot_write_exactly_and_writes_nothing(tmp_path: Any) -> None:
    out = tmp_path / "x.npz"
    with pytest.raises(FormatError, match="'s'.*bytes only"):
        ckptbridge.save({"s": np.array(["text"], dtype=object)}, str(out))
    with pytest.raises(FormatError, match="'u'"):
        ckptbridge.save({"u": np.array(["text"])}, str(out))  # NumPy unicode: not a TensorFlow dtype
    with pytest.raises(FormatError, match="non-empty strings"):
        ckptbridge.save({"": np.zeros(1)}, str(out))
    assert os.listdir(tmp_path) == []
    ckptbridge.save({"w": np.zeros(1)}, str(out))
    with pytest.raises(OutputExistsError):
        ckptbridge.save({"w": np.ones(1)}, str(out))
    ckptbridge.save({"w": np.ones(1)}, str(out), force=True)
    assert same(ckptbridge.load(str(out))["w"], np.ones(1))


def test_load_refuses_a_checkpoint_with_a_variant_by_name(tmp_path: Any) -> None:
    prefix = str(tmp_path / "m.ckpt")
    raw_bundle(prefix, {b"w": (1, (1,), np.ones(1, np.float32).tobytes()), b"it": (21, (), b"")})
    with pytest.raises(UncarriedDtypeError, match="'it' \\(variant"):
        ckptbridge.load(prefix)
    with ckptbridge.read(prefix) as r:
        assert list(r) == ["w"]


@pytest.mark.tf
def test_tensorflow_reads_a_saved_checkpoint_as_saved(tmp_path: Any, assert_same_as_tf: Any) -> None:
    path = str(tmp_path / "m.ckpt")
    ckptbridge.save(ARRAYS, path)
    assert assert_same_as_tf(ARRAYS, path) == len(ARRAYS)


def _counting(tensors: dict[str, np.ndarray]) -> Any:
    from ckptbridge._source import ArraySource

    class Counting(ArraySource):
        reads = 0

        def read(self, name: str) -> np.ndarray:
            type(self).reads += 1
            return super().read(name)

    return Counting(tensors)


@pytest.mark.parametrize("engine", ["native", pytest.param("tf", marks=pytest.mark.tf)])
def test_checkpoint_sinks_refuse_bad_keys_before_writing_anything(tmp_path: Any, engine: str) -> None:
    """A key starting with NUL would read back as a slice and vanish; the object graph's key is taken."""
    from ckptbridge._resolve import open_checkpoint_sink
    from ckptbridge.pipe.names import make_plan
    from ckptbridge.pipe.transfer import transfer

    src = _counting({"a": np.zeros(2, np.float32), "\x00hidden": np.ones(2, np.float32), "_CHECKPOINTABLE_OBJECT_GRAPH": np.zeros(1)})
    prefix = str(tmp_path / "out" / "m.ckpt")
    sink = open_checkpoint_sink(prefix, engine=engine)
    with pytest.raises(FormatError, match="2 tensor name.*NUL byte.*object graph"):
        transfer(src, sink, make_plan(list(src.specs())))
    assert type(src).reads == 0
    assert not os.path.exists(prefix + ".index")
    assert os.listdir(tmp_path) == []  # the directory the sink made is gone too


# Runs in a fresh interpreter that can import the standard library, ckptbridge and the distributions
# pyproject.toml lists as core dependencies, and nothing else: what `pip install ckptbridge` gives.
_PLAIN_INSTALL = r"""
import importlib.abc, importlib.metadata, json, os, re, sys, tomllib

with open(sys.argv[1], "rb") as f:
    core = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower().replace("_", "-") for d in tomllib.load(f)["project"]["dependencies"]}
allowed = {"ckptbridge"} | {m for m, dists in importlib.metadata.packages_distributions().items()
                            if any(d.lower().replace("_", "-") in core for d in dists)}

class PlainInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed:
            return None
        raise ModuleNotFoundError(f"No module named {name!r} in a plain install", name=name)

sys.meta_path.insert(0, PlainInstall())
try:
    import pytest  # installed here, and no core dependency: the finder must refuse it
    sys.exit("the plain-install finder let pytest in")
except ModuleNotFoundError:
    pass
import ml_dtypes, numpy as np
import ckptbridge

arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5, "h": np.array([1.5, -0.0], dtype=np.float16),
          "bf": np.array([1.5, -2.0, 3.0], dtype=ml_dtypes.bfloat16), "step": np.array(7, dtype=np.int64),
          "mask": np.array([True, False]), "u8": np.arange(4, dtype=np.uint8).reshape(2, 2)}
out = {}
for suffix in (".npz", ".h5", ".safetensors"):
    path = os.path.join(sys.argv[2], "plain" + suffix)
    ckptbridge.save(arrays, path)
    got = ckptbridge.load(path)
    out[suffix] = {n: [str(a.dtype), list(a.shape), a.tobytes().hex()] for n, a in sorted(got.items())}
out["want"] = {n: [str(a.dtype), list(a.shape), a.tobytes().hex()] for n, a in sorted(arrays.items())}
print(json.dumps(out))
"""


def test_a_plain_install_saves_and_loads_every_format_it_names(tmp_path: Any) -> None:
    """`pip install ckptbridge`, with no extra, writes and reads .npz, .h5 and .safetensors bit-exact."""
    pyproject = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "pyproject.toml")
    if not os.path.isfile(pyproject):
        pytest.skip("needs the source tree's pyproject.toml (its core dependencies)")
    proc = subprocess.run([sys.executable, "-c", _PLAIN_INSTALL, pyproject, str(tmp_path)], capture_output=True, text=True,
                          env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    want = got.pop("want")
    assert sorted(got) == [".h5", ".npz", ".safetensors"]
    for suffix, tensors in got.items():
        assert tensors == want, suffix
