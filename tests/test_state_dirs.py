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

import numpy as np
import pytest

import ckptbridge
from ckptbridge.errors import NotFoundError, OutputExistsError
from ckptbridge.io import state as _state

from helpers import SECRET, assert_one_line_error, assert_same_array, cli, write_checkpoint

MUSICNN_STATE = "/home/jpons/Dropbox/PhD-MTG/musicnn/models/MSD_musicnn/1562267674ismir_17/"
SAVER_DIR_FILES = {".index", ".data-00000-of-00001", ".meta", "checkpoint"}  # Saver.save(sess, "dir/"), as musicnn ships


def _state_file(directory: Any, named: str) -> None:
    (directory / _state.STATE_NAME).write_text(f'model_checkpoint_path: "{named}"\nall_model_checkpoint_paths: "{named}"\n')


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("named, base", [
    ("model.ckpt-7", "model.ckpt-7"),
    ("/home/u/run/model.ckpt-7", "model.ckpt-7"),
    ("C:\\run\\model.ckpt-7", "model.ckpt-7"),
    ("\\\\server\\share\\model.ckpt-7", "model.ckpt-7"),
    ("we\"ird\\x.ckpt", "we\"ird\\x.ckpt"),        # a backslash in a POSIX name is part of it
    ("..\\..\\x", "..\\..\\x"),                  # one name, inside the directory
    ("../../x", "x"),
    (MUSICNN_STATE, ""),     # Saver.save(sess, "/home/.../1562267674ismir_17/")
    (".", ""),               # Saver.save(sess, "dir/") by a relative path
    ("./", ""),
    ("..", ""),
    ("a/../..", ""),
    ("/home/u/run/model.ckpt-?????-of-00003", "model.ckpt-?????-of-00003"),
])
def test_a_state_file_path_is_looked_for_by_its_base_name(named: str, base: str) -> None:
    assert _state.state_basename(named) == base


# --------------------------------------------------------------------------- never outside the directory


@pytest.fixture()
def two_dirs(tmp_path: Any) -> tuple[Any, Any]:
    """(d, other): each holds a checkpoint model.ckpt, with different tensors (own/w, other/w)."""
    write_checkpoint(str(tmp_path / "d" / "model.ckpt"), {"own/w": np.arange(3, dtype=np.float32)})
    write_checkpoint(str(tmp_path / "other" / "model.ckpt"), {"other/w": np.ones(5, dtype=np.int64)})
    return tmp_path / "d", tmp_path / "other"


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_state_file_naming_another_directorys_checkpoint_reads_this_directorys(two_dirs: tuple[Any, Any], how: str) -> None:
    d, other = two_dirs
    named = str(other / "model.ckpt") if how == "absolute" else "../other/model.ckpt"
    _state_file(d, named)
    with ckptbridge.read(str(d)) as r:
        assert list(r) == ["own/w"] and r["own/w"].tolist() == [0, 1, 2]
        assert len(r.notes) == 1 and repr(named) in r.notes[0] and "outside the directory" in r.notes[0]
        assert f"read {os.path.join(str(d), 'model.ckpt')} from the directory instead" in r.notes[0]
    proc = cli("ls", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "own/w" in proc.stdout and "other/w" not in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("note: ")] == [f"note: {r.notes[0]}"]


def test_export_reports_the_state_file_path_it_did_not_follow(two_dirs: tuple[Any, Any], tmp_path: Any) -> None:
    d, other = two_dirs
    _state_file(d, str(other / "model.ckpt"))
    report = ckptbridge.export(str(d), str(tmp_path / "o.npz"))
    assert report.written == ["own/w"] and len(report.notes) == 1 and "outside the directory" in report.notes[0]
    assert ckptbridge.export(str(d), str(tmp_path / "o2.npz"), dry_run=True).notes == report.notes
    proc = cli("export", str(d), str(tmp_path / "o3.npz"))
    assert proc.returncode == 0, proc.stderr
    assert f"note: {report.notes[0]}" in proc.stderr.splitlines()
    with ckptbridge.read(str(tmp_path / "o3.npz")) as r:
        assert list(r) == ["own/w"]


@pytest.mark.parametrize("named", ["{secret}", "../../../../../../../../../..{secret}"])
def test_a_state_file_naming_a_file_outside_never_opens_it(tmp_path: Any, secret: str, named: str) -> None:
    d = tmp_path / "run" / "d"
    d.mkdir(parents=True)
    named = named.format(secret=secret)
    _state_file(d, named)
    with pytest.raises(NotFoundError, match="outside the directory, which ckptbridge does not follow") as e:
        ckptbridge.read(str(d))
    assert repr(named) in str(e.value) and os.path.join(str(d), "secret.bin") in str(e.value)
    line = assert_one_line_error(cli("ls", str(d)), "outside the directory")
    assert SECRET.decode() not in line
    # beside a checkpoint of its own, the directory's latest complete one is read, and the note says why
    write_checkpoint(str(d / "run.ckpt-3"), {"w": np.zeros(2, dtype=np.float32)})
    with ckptbridge.read(str(d)) as r:
        assert list(r) == ["w"]
        assert "secret.bin is not in it either, so read its latest complete checkpoint, " + str(d / "run.ckpt-3") in r.notes[0]


@pytest.mark.parametrize("named", ["model.ckpt", "./model.ckpt", "{d}/model.ckpt", "{d}/../d/model.ckpt", "{link}/model.ckpt"])
def test_a_state_file_naming_its_own_directory_reads_it_without_a_note(two_dirs: tuple[Any, Any], named: str) -> None:
    d, _ = two_dirs
    os.symlink(str(d), str(d.parent / "link"))
    _state_file(d, named.format(d=d, link=d.parent / "link"))
    with ckptbridge.read(str(d)) as r:
        assert list(r) == ["own/w"] and r.notes == []
    proc = cli("ls", str(d))
    assert proc.returncode == 0 and "note:" not in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- a prefix with an empty base name (musicnn)


@pytest.mark.parametrize("state", [MUSICNN_STATE, ".", None])
def test_an_empty_base_name_checkpoint_is_the_directorys_own(tmp_path: Any, state: str | None) -> None:
    d = tmp_path / "MSD_musicnn"
    values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(3, dtype=np.int64)}
    write_checkpoint(str(d) + "/", values)
    if state is not None:
        _state_file(d, state)
    for path in (str(d), str(d) + "/"):
        with ckptbridge.read(path) as r:
            assert r.path == str(d) + "/" and sorted(r) == sorted(values)
            for name, want in values.items():
                assert_same_array(r[name], want, name)
            assert len(r.notes) == (state == MUSICNN_STATE)
    proc = cli("ls", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "2 tensors" in proc.stdout and "no checkpoint found" not in proc.stderr


def test_a_remote_directory_with_an_empty_base_name_checkpoint(tmp_path: Any) -> None:
    pytest.importorskip("fsspec", reason="the [remote] extra is not installed")
    pytest.importorskip("aiohttp", reason="the [remote] extra is not installed")
    from ckptbridge.io import remote as _remote

    from servers import RangeHTTPServer

    root = tmp_path / "www"
    values = {"w": np.arange(4, dtype=np.float32)}
    write_checkpoint(str(root / "MSD_musicnn") + "/", values)
    _state_file(root / "MSD_musicnn", MUSICNN_STATE)
    server = RangeHTTPServer(str(root)).start()
    try:
        place, name = _remote.open_place(server.url + "/MSD_musicnn/", progress=False)
        place.close()
        assert name == ".index"
        with ckptbridge.read(server.url + "/MSD_musicnn") as r:
            assert_same_array(r["w"], values["w"], "w")
    finally:
        server.stop()


# --------------------------------------------------------------------------- import to out/


def test_import_to_a_directory_prefix_writes_an_empty_base_name(tmp_path: Any) -> None:
    values = {"a": np.arange(4, dtype=np.float32), "s": np.array([b"x", b""], dtype=object)}
    archive = str(tmp_path / "a.npz")
    ckptbridge.save(values, archive)
    out = str(tmp_path / "out") + "/"
    report = ckptbridge.rebuild(archive, out)
    assert report.output == out and sorted(os.listdir(out)) == [".data-00000-of-00001", ".index", "checkpoint"]
    assert _state.read_state(out) == _state.CheckpointState("./", ["./"])
    for path in (out, out[:-1]):
        with ckptbridge.read(path) as r:
            assert r.path == out and r.notes == []
            for name, want in values.items():
                assert_same_array(r[name], want, name)
    with pytest.raises(OutputExistsError, match=r"already exists \(\.index\)"):
        ckptbridge.rebuild(archive, out)
    ckptbridge.rebuild(archive, out, force=True)
    assert _state.read_state(out) == _state.CheckpointState("./", ["./"])
    # an existing empty directory takes one too; named without its slash it stays an error
    (tmp_path / "empty").mkdir()
    proc = cli("import", archive, str(tmp_path / "empty") + "/")
    assert proc.returncode == 0, proc.stderr
    assert f"TensorFlow restores {tmp_path / 'empty'}/ from its directory" in proc.stderr
    assert_one_line_error(cli("import", archive, str(tmp_path / "out")), "is a directory; name a checkpoint prefix")


# --------------------------------------------------------------------------- TensorFlow as the oracle


def _saver_dir(ckpts: Any, directory: str, *, v1: bool = False) -> dict[str, np.ndarray]:
    """What ``Saver.save(sess, directory + "/")`` wrote (V2, or a sharded V1), as TensorFlow reads it back."""
    tf = ckpts.tf
    V1 = tf.compat.v1
    values = {"net/w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "net/b": np.array([1, -2], dtype=np.int64),
              "vocab": np.array([b"a", b"\xff"], dtype=object), "flag": np.array(True)}
    os.makedirs(directory)
    with tf.Graph().as_default():
        for name, v in values.items():
            V1.get_variable(name, initializer=tf.constant(v.tolist() if v.dtype == object else v))
        saver = V1.train.Saver(write_version=V1.train.SaverDef.V1, sharded=True) if v1 else V1.train.Saver()
        with V1.Session() as sess:
            sess.run(V1.global_variables_initializer())
            saver.save(sess, directory + "/")
    return values


def _assert_same_as_reader(r: Any, reader: Any, ckpts: Any) -> None:
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    assert sorted(r) == sorted(shapes)
    for name in shapes:
        assert_same_array(r[name], ckpts._tf_value(reader, name, dtypes[name], tuple(shapes[name])), name)


@pytest.mark.tf
@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1-sharded"])
def test_saver_dir_checkpoint_with_a_foreign_state_file(ckpts: Any, tmp_path: Any, v1: bool) -> None:
    d = str(tmp_path / "MSD_musicnn")
    _saver_dir(ckpts, d, v1=v1)
    # the layout TensorFlow writes for "dir/": what musicnn ships (a sharded V1 Saver names its shards' pattern)
    assert set(os.listdir(d)) == ({"-00000-of-00001", ".meta", "checkpoint"} if v1 else SAVER_DIR_FILES)
    shards = "-?????-of-00001" if v1 else ""
    assert _state.read_state(d).model_checkpoint_path == d + "/" + shards  # type: ignore[union-attr]
    _state_file(tmp_path / "MSD_musicnn", MUSICNN_STATE + shards)
    with pytest.raises(ValueError, match="Couldn't find 'checkpoint' file"):
        ckpts.tf.train.load_checkpoint(d)  # TensorFlow's own lookup follows the foreign path
    reader = ckpts.tf.compat.v1.train.NewCheckpointReader(d + "/" + ("-00000-of-00001" if v1 else ""))
    for engine in ("native", "tf"):
        with ckptbridge.read(d, engine=engine) as r:
            _assert_same_as_reader(r, reader, ckpts)
            assert r.path == d + "/" and len(r.notes) == 1 and repr(MUSICNN_STATE + shards) in r.notes[0]
        proc = cli("ls", d, "--engine", engine)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # nothing from TensorFlow's logger either
        assert "4 tensors" in proc.stdout and len([x for x in proc.stdout.splitlines() if x.startswith("note: ")]) == 1


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["native", "tf"])
def test_import_to_a_directory_prefix_restores_in_tensorflow(ckpts: Any, tmp_path: Any, engine: str) -> None:
    tf = ckpts.tf
    V1 = tf.compat.v1
    values = {"net/w": np.arange(6, dtype=np.float32).reshape(2, 3), "net/b": np.array([7, 8], dtype=np.int64)}
    archive = str(tmp_path / "a.npz")
    ckptbridge.save(values, archive)
    out = str(tmp_path / "out")
    proc = cli("import", archive, out + "/", "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    assert tf.train.latest_checkpoint(out) == out + "/./"
    for path in (out, out + "/"):
        _assert_same_as_reader(values, tf.train.load_checkpoint(path), ckpts)
    with tf.Graph().as_default():
        got = {n: V1.get_variable(n, shape=v.shape, dtype=tf.as_dtype(v.dtype)) for n, v in values.items()}
        with V1.Session() as sess:
            V1.train.Saver().restore(sess, out + "/")
            for name, v in sess.run(got).items():
                assert_same_array(v, values[name], name)


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
