"""The TF2 object graph stays true to the tensors written (issue 17, item 2), and
recorded original names are checked like every other archive name (hostile finding 9).

TF-free tests build TrackableObjectGraph bytes with a small encoder below
(field numbers from tensorflow/core/protobuf/trackable_object_graph.proto); the
tf-marked ones take checkpoints TensorFlow wrote for a tf-keras model and its
Adam optimizer, convert them with the CLI, and restore the result in a fresh
TensorFlow process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptbridge
from ckptbridge.bundle._wire import field_bytes, field_varint
from test_cli import ERR, assert_one_line_error, cli

V = "/.ATTRIBUTES/VARIABLE_VALUE"


def _og() -> Any:
    # Imported per test, so that on a tree without the module only its own tests fail.
    from ckptbridge import objgraph

    return objgraph


# --------------------------------------------------------------------------- --original-names (hostile finding 9)


def _archive_with_original_names(path: str, originals: dict[str, str]) -> None:
    import crc32c

    w = np.zeros(3, np.float32)
    doc = {"format": "ckptbridge", "format_version": 1, "original_names": originals,
           "tensors": {"w": {"dtype": "float32", "shape": [3], "encoding": "raw", "crc32c": crc32c.crc32c(w.tobytes())}}}

    def npy(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        np.lib.format.write_array(b, a)
        return b.getvalue()

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy(w))
        z.writestr("__ckptbridge__.npy", npy(np.frombuffer(json.dumps(doc).encode(), np.uint8)))


HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mHELLO"


@pytest.mark.parametrize("command", ["import", "export"])
def test_original_names_with_escape_sequences_are_refused(tmp_path, command):
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, {"w": HOSTILE})
    if command == "import":
        out = tmp_path / "ck"
        proc = cli("import", arc, str(out / "model.ckpt"), "--original-names")
    else:
        out = tmp_path / "out.npz"
        proc = cli("export", arc, str(out))
    line = assert_one_line_error(proc, "e.npz", "original name")
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "\x00" not in proc.stderr
    assert line.startswith(ERR)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]


@pytest.mark.parametrize("originals", [{"w": "a\x00b"}, {"w": "w\u009b31m"}, {"w": "x\ty"}, {"w": ""}, {"\x1b[2Jw": "w"}])
@pytest.mark.parametrize("dry_run", [False, True])
def test_every_unsafe_original_name_is_refused_before_anything_is_written(tmp_path, originals, dry_run):
    arc = str(tmp_path / "e.npz")
    _archive_with_original_names(arc, originals)
    with pytest.raises(ckptbridge.CorruptError, match="original name"):
        ckptbridge.rebuild(arc, str(tmp_path / "ck" / "model.ckpt"), original_names=True, dry_run=dry_run)
    with pytest.raises(ckptbridge.CorruptError, match="original name"):
        ckptbridge.export(arc, str(tmp_path / "out.npz"), dry_run=dry_run)
    assert sorted(os.listdir(tmp_path)) == ["e.npz"]
    with ckptbridge.read(arc) as r:  # names are only refused where they are used
        assert list(r) == ["w"]
