"""A checkpoint directory and its ``checkpoint`` state file: the directory never resolves outside itself.

TensorFlow records the path a checkpoint was saved under, often an absolute one of the machine that
saved it.  ckptbridge looks for that path's base name in the directory itself and says so where the
path was elsewhere (``_state.confined``, shared with remote directories).  The other side of the same
rule: ``Saver.save(sess, "dir/")`` writes a prefix with an empty base name (``dir/.index``, as
musicnn 0.1.0 ships its checkpoints), which resolves to the directory's own checkpoint, and
``import a.npz out/`` writes one.  TensorFlow is the oracle where it wrote the files: its reader
opened on the prefix (``NewCheckpointReader("dir/")``, what ``tf.train.load_checkpoint`` opens once it
has a prefix; given the directory, ``load_checkpoint`` follows the state file and fails).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

import ckptbridge

from helpers import assert_one_line_error, assert_same_array, cli

# --------------------------------------------------------------------------- --engine tf: what TensorFlow's reader cannot do


V1_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v1")


@pytest.mark.tf
@pytest.mark.parametrize("fixture, what", [("partitioned.ckpt", "Sliced checkpoints are not supported"),
                                           ("dtypes.ckpt", "Data type not supported")])
def test_tf_engine_says_what_its_reader_cannot_do(ckpts: Any, fixture: str, what: str, tmp_path: Any) -> None:
    out = str(tmp_path / "o.npz")
    line = assert_one_line_error(cli("export", os.path.join(V1_DATA, fixture), out, "--engine", "tf"), what, "--engine native")
    assert "damaged" not in line and "ERROR:tensorflow" not in line
    assert not os.path.exists(out)
    proc = cli("export", os.path.join(V1_DATA, fixture), out, "--engine", "native")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.tf
@pytest.mark.parametrize("name", ["partitioned.ckpt", "partitioned.ckpt-00000-of-00003", "partitioned.ckpt-00002-of-00003"])
def test_tf_engine_reads_every_shard_of_a_sharded_v1_checkpoint(ckpts: Any, name: str) -> None:
    with ckptbridge.read(os.path.join(V1_DATA, name), engine="native") as native, \
            ckptbridge.read(os.path.join(V1_DATA, name), engine="tf") as r:
        assert {n: (s.dtype, s.shape) for n, s in r.specs.items()} == {n: (s.dtype, s.shape) for n, s in native.specs.items()}
        assert len(r.specs) == 7
        assert_same_array(r["vocab"], native["vocab"], "vocab")
