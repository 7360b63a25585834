"""A command pays only for what it uses: no ml_dtypes, h5py or TensorFlow for a checkpoint that needs none.

``import ml_dtypes`` takes about a second with ml_dtypes 0.7.0.  Before the dtype
table named its ml_dtypes types lazily, every command imported it, ``ls`` of a
float32 checkpoint included.  Each check runs in a fresh interpreter (this test
process has imported all of them already), and looks at ``sys.modules`` there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from helpers import CLI_ENV, write_checkpoint

#: what a float32 checkpoint's listing or reading must not import
HEAVY = ("ml_dtypes", "tensorflow", "h5py", "fsspec", "safetensors")

# Runs in a clean interpreter: the listing, then every tensor read, with the heavy modules seen after each step.
_PROBE = r"""
import json, sys
import ckptbridge

HEAVY = sys.argv[1].split(",")
def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

out = {}
with ckptbridge.read(sys.argv[2], engine="native") as r:
    out["specs"] = {n: [s.dtype, list(s.shape)] for n, s in r.specs.items()}
    out["after_specs"] = loaded()
    out["arrays"] = {n: [str(r[n].dtype), r[n].tobytes().hex()] for n in (sys.argv[3:] or sorted(r.specs))}
    out["after_read"] = loaded()
print(json.dumps(out))
"""


def probe(prefix: str, *names: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(HEAVY), prefix, *names], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


# `python -m ckptbridge ARGS`, then sys.modules written to the file $CKPTBRIDGE_TEST_MODULES as the process exits.
# (-X importtime would miss what importlib.import_module loads: the registries' "module:Name" entries.)
_RUN_AND_LIST = r"""
import atexit, json, os, runpy, sys
atexit.register(lambda: open(os.environ["CKPTBRIDGE_TEST_MODULES"], "w").write(json.dumps(sorted(sys.modules))))
sys.argv[0] = "ckptbridge"
runpy.run_module("ckptbridge", run_name="__main__", alter_sys=True)
"""


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -m ckptbridge ARGS``: the process, and every module it imported (full names)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        listing = os.path.join(d, "modules.json")
        proc = subprocess.run([sys.executable, "-c", _RUN_AND_LIST, *args], capture_output=True, text=True,
                              env={**CLI_ENV, "CKPTBRIDGE_TEST_MODULES": listing}, timeout=120)
        with open(listing) as f:
            return proc, set(json.load(f))


def imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -m ckptbridge ARGS``: the process, and every top-level package it imported."""
    proc, mods = imported_modules(*args)
    return proc, {m.split(".")[0] for m in mods}


@pytest.fixture()
def float32_ckpt(tmp_path: Any) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    tensors = {"conv/weights": rng.standard_normal((3, 3, 2, 4)).astype(np.float32), "conv/biases": np.arange(4, dtype=np.float32),
               "global_step": np.array(7, dtype=np.int64), "names": np.array([b"a", b"\xc3\xa9"], dtype=object)}
    return write_checkpoint(str(tmp_path / "f32" / "model.ckpt"), tensors), tensors


def test_specs_and_reads_of_a_float32_checkpoint_import_no_ml_dtypes(float32_ckpt: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, tensors = float32_ckpt
    got = probe(prefix, "conv/weights", "global_step")
    assert got["specs"]["conv/weights"] == ["float32", [3, 3, 2, 4]] and got["specs"]["names"] == ["string", [2]]
    assert got["after_specs"] == [] and got["after_read"] == []
    for name in ("conv/weights", "global_step"):
        assert got["arrays"][name] == [str(tensors[name].dtype), tensors[name].tobytes().hex()]


def test_bfloat16_is_listed_without_ml_dtypes_and_read_bit_exact_with_it(tmp_path: Any) -> None:
    bits = np.array([0x0000, 0x8000, 0x3FC0, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0xC110], dtype=np.uint16)  # ±0, inf, a NaN payload, subnormal
    bf = bits.view(ml_dtypes.bfloat16).reshape(2, 4)
    prefix = write_checkpoint(str(tmp_path / "bf16" / "model.ckpt"),
                              {"w_bf16": bf, "s_bf16": np.array(1.5, dtype=ml_dtypes.bfloat16), "w": np.ones(3, np.float32)})
    got = probe(prefix)
    assert got["specs"]["w_bf16"] == ["bfloat16", [2, 4]]
    assert got["after_specs"] == []               # listing needs names and widths only
    assert got["after_read"] == ["ml_dtypes"]     # the tensor that needs it brings it in
    assert got["arrays"]["w_bf16"] == ["bfloat16", bf.tobytes().hex()]
    assert got["arrays"]["s_bf16"] == ["bfloat16", np.array(1.5, dtype=ml_dtypes.bfloat16).tobytes().hex()]


def test_the_dtype_table_gives_widths_without_ml_dtypes_and_the_same_types_with_it() -> None:
    code = r"""
import json, sys
from ckptbridge import _dtypes
widths = {n: _dtypes.BY_NAME[n].itemsize for n in _dtypes.NUMERIC}
before = "ml_dtypes" in sys.modules
import ml_dtypes
bad = [n for n in _dtypes.NUMERIC
       if not (_dtypes.BY_NAME[n].memory.itemsize == _dtypes.BY_NAME[n].storage.itemsize == widths[n] > 0)
       or _dtypes.of_array(_dtypes.BY_NAME[n].memory).name != n]
same = _dtypes.numpy_dtype("bfloat16") == ml_dtypes.bfloat16 and _dtypes.numpy_dtype("int4") == ml_dtypes.int4
print(json.dumps([before, bad, same, widths["bfloat16"], widths["float8_e4m3fn"]]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, [], True, 2, 1]


def test_ls_of_a_float32_checkpoint_imports_no_ml_dtypes(float32_ckpt: tuple[str, dict[str, np.ndarray]]) -> None:
    prefix, _ = float32_ckpt
    proc, mods = imported_by("ls", "--json", prefix)
    assert proc.returncode == 0, proc.stderr
    assert {t["name"]: t["dtype"] for t in json.loads(proc.stdout)["tensors"]} == {
        "conv/weights": "float32", "conv/biases": "float32", "global_step": "int64", "names": "string"}
    assert "ckptbridge" in mods and "numpy" in mods  # the probe sees the imports at all
    assert sorted(mods & set(HEAVY)) == []


@pytest.mark.tf
def test_tensorflow_written_bfloat16_reads_as_tensorflow_reads_it_in_a_clean_process(dtypes_ckpt: str) -> None:
    import tensorflow as tf

    got = probe(dtypes_ckpt, "dtypes/bfloat16", "scalar/bfloat16", "dtypes/float32")
    assert got["after_specs"] == [] and got["after_read"] == ["ml_dtypes"]
    reader = tf.train.load_checkpoint(dtypes_ckpt)
    for name in ("dtypes/bfloat16", "scalar/bfloat16", "dtypes/float32"):
        want = np.asarray(reader.get_tensor(name))
        assert got["arrays"][name] == [str(want.dtype), want.tobytes().hex()], name


def test_match_tensorflow_is_public_and_imports_no_framework_until_called() -> None:
    """``ckptbridge.match_tensorflow`` and the maps are reached without torch, Keras or TensorFlow in the process."""
    code = ("import sys, ckptbridge; f = ckptbridge.match_tensorflow; ckptbridge.port_maps(); "
            "print(f.__module__, sorted(m for m in ('torch', 'torchvision', 'timm', 'keras', 'tf_keras', 'tensorflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ckptbridge.ports.match", "[]"]
    import ckptbridge

    assert "match_tensorflow" in ckptbridge.__all__


# --------------------------------------------------------------------------- every command's import set

#: what no command on a float32 checkpoint or its .npz needs: the heavy packages, the crc32c package's
#: __init__ (importlib.metadata, for a version string: ckptbridge loads the checksum from its extension),
#: the V1 reader (the checkpoint is V2), and the port maps' planner
LEAN = (*HEAVY, "importlib.metadata", "ckptbridge.bundle.v1", "ckptbridge.ports.plan")
#: what a command that writes nothing to a checkpoint does not import (the outputs' atomic publication;
#: an archive's format module holds its sink too, and imports it)
READ_ONLY = ("ckptbridge.io.atomic",)
#: neither --help nor maps reads a checkpoint: no NumPy, no readers
NO_READERS = ("numpy", "ckptbridge._api", "ckptbridge.sources", "ckptbridge.bundle", *READ_ONLY)


def _commands(prefix: str, archive: str, out: str) -> dict[str, tuple[list[str], tuple[str, ...], tuple[str, ...]]]:
    """command -> (arguments, modules it must import, modules it must not)."""
    npz, h5, st = (os.path.join(out, "m" + s) for s in (".npz", ".h5", ".safetensors"))
    back = os.path.join(out, "back", "model.ckpt")
    reads = ("numpy", "ckptbridge.bundle.reader")
    return {
        "help": (["--help"], ("argparse",), (*LEAN, *NO_READERS)),
        "maps": (["maps"], ("ckptbridge.ports.parse",), (*LEAN, *NO_READERS[1:])),
        "ls": (["ls", prefix], reads, (*LEAN, *READ_ONLY)),
        "ls --json": (["ls", "--json", prefix], reads, (*LEAN, *READ_ONLY)),
        "verify": (["verify", prefix], reads, (*LEAN, *READ_ONLY)),
        "verify .npz": (["verify", archive], ("numpy", "ckptbridge.formats.npz"), LEAN),
        "diff": (["diff", prefix, archive], reads, LEAN),
        "export .npz": (["export", "-q", prefix, npz], (*reads, "ckptbridge.io.atomic"), LEAN),
        "export .npz --compress": (["export", "-q", "--compress", prefix, npz + "c.npz"], reads, LEAN),
        "export .h5": (["export", "-q", prefix, h5], ("h5py",), tuple(m for m in LEAN if m != "h5py")),
        "export .safetensors": (["export", "-q", "--exclude", "^names$", prefix, st], ("ckptbridge.formats.safetensors",),
                                tuple(m for m in LEAN if m != "safetensors")),
        "import": (["import", "-q", archive, back], ("ckptbridge.bundle.writer", "ckptbridge.io.atomic"), LEAN),
        "archive --format npz": (["archive", "-q", "--format", "npz", os.path.dirname(prefix), os.path.join(out, "mirror")],
                                 ("ckptbridge.formats.npz",), LEAN),
    }


_COMMANDS = list(_commands("P", "A", "O"))


@pytest.mark.parametrize("command", _COMMANDS)
def test_each_command_imports_only_what_it_uses(float32_ckpt: tuple[str, dict[str, np.ndarray]], tmp_path: Any, command: str) -> None:
    prefix, _ = float32_ckpt
    archive = str(tmp_path / "a.npz")
    proc = subprocess.run([sys.executable, "-m", "ckptbridge", "export", "-q", prefix, archive], capture_output=True, text=True,
                          env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    args, needs, never = _commands(prefix, archive, str(tmp_path))[command]
    proc, mods = imported_modules(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ckptbridge.cli" in mods and set(needs) <= mods, sorted(set(needs) - mods)  # the probe sees this command's imports
    assert sorted(m for m in mods if m in never or m.split(".")[0] in never) == []


def test_the_checksum_is_the_crc32c_packages_and_leaves_the_package_unimported() -> None:
    code = r"""
import json, sys
from ckptbridge.io import checksum
got = [checksum.crc32c(b"123456789"), checksum.crc32c(b"6789", value=checksum.crc32c(b"12345"))]
before = sorted(m for m in ("crc32c", "importlib.metadata") if m in sys.modules)
import crc32c
print(json.dumps([got, before, crc32c.crc32c(b"123456789")]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # 0xE3069283: crc32c's check value (RFC 3720, "123456789")
    assert json.loads(proc.stdout) == [[0xE3069283, 0xE3069283], [], 0xE3069283]
