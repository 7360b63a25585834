"""Publishing outputs, the ``checkpoint`` state file, and the CLI as a process (issue 17).

Each case is what a user or a hostile input did on 15c8d4f: a closed pipe, a
state file that cannot be written or belongs to a training job, a SIGKILL
between the renames of a forced replace, two runs racing to one output, a
dangling symlink, a FIFO, a Ctrl-C during start-up, a malformed state file.
Subprocesses run under a time limit and an address-space cap (RLIMIT_AS), as in
test_fuzz.py.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

from ckptbridge import OutputExistsError
from ckptbridge import cli as cli_module
from ckptbridge.bundle import BundleReader, BundleWriter
from ckptbridge.io import atomic as _atomic

from helpers import ENV, TMP_SUFFIX, error_line, in_process, leftovers, popen, run, tree_digest
from helpers import cli as _cli

AS_LIMIT = 4 << 30
TIMEOUT = 60
OLD = {"big": np.ones(1000, np.float32)}
NEW = {"w": np.zeros(3, np.float32)}


# --------------------------------------------------------------------------- helpers


def cli(*args: str, cwd: Any = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m ckptbridge`` in a subprocess, under a time limit and RLIMIT_AS."""
    return _cli(*args, cwd=cwd, env=ENV, default_sigint=True, as_limit=AS_LIMIT, timeout=timeout)


def python(code: str, *args: str, cwd: Any = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """A Python snippet in a subprocess, bounded as :func:`cli`."""
    return run([sys.executable, "-c", code, *args], cwd=cwd or None, env=ENV, timeout=timeout, as_limit=AS_LIMIT)


def save_npz(path: Any, tensors: dict[str, np.ndarray]) -> str:
    np.savez(str(path), **tensors)
    return str(path)


def save_ckpt(prefix: str, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> str:
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    w = BundleWriter(prefix, max_shard_bytes=max_shard_bytes)
    for name, value in tensors.items():
        w.write(name, value)
    w.commit()
    return prefix


def read_ckpt(prefix: str) -> dict[str, bytes]:
    """Every tensor of a checkpoint (checksums verified) as bytes; raises if it is not whole."""
    with BundleReader(prefix, verify=True) as r:
        return {n: r.read(n).tobytes() for n in r.specs()}


def as_bytes(tensors: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {n: a.tobytes() for n, a in tensors.items()}


def write_state(directory: Any, *paths: str) -> str:
    text = f'model_checkpoint_path: "{paths[-1]}"\n' + "".join(f'all_model_checkpoint_paths: "{p}"\n' for p in paths)
    path = os.path.join(str(directory), "checkpoint")
    with open(path, "w") as f:
        f.write(text)
    return path


def no_temporaries(root: Any) -> None:
    found = [p for p in leftovers(str(root)) if TMP_SUFFIX in os.path.basename(p)]
    assert not found, f"temporaries left behind: {found}"


# --------------------------------------------------------------------------- issue 17 item 4: a closed pipe


def test_ls_into_a_pipe_closed_by_head_stops_quietly(tmp_path: Any) -> None:
    # Far more than a pipe buffer (64 KiB) of listing, so the writes after head exits fail with EPIPE.
    names = {f"layer_{i:05d}/" + "x" * 80: np.zeros(1, np.float32) for i in range(4000)}
    save_npz(tmp_path / "many.npz", names)
    script = f'set -o pipefail; "{sys.executable}" -m ckptbridge ls many.npz 2>err | head -1 >first; echo "${{PIPESTATUS[0]}}" >rc'
    run(["bash", "-c", script], cwd=tmp_path, env=ENV, timeout=TIMEOUT, as_limit=AS_LIMIT)
    err = (tmp_path / "err").read_text()
    assert err == "", f"a closed pipe is not an error: {err!r}"
    assert int((tmp_path / "rc").read_text()) == cli_module.EXIT_BROKEN_PIPE
    assert (tmp_path / "first").read_text().startswith(sorted(names)[0])


# --------------------------------------------------------------------------- hostile 7: the state file cannot be written


def test_state_file_that_is_a_directory_is_refused_before_the_old_checkpoint_is_replaced(tmp_path: Any) -> None:
    save_npz(tmp_path / "old.npz", OLD)
    save_npz(tmp_path / "new.npz", NEW)
    assert cli("import", "old.npz", "ck/model.ckpt", "-q", cwd=tmp_path).returncode == 0
    os.remove(tmp_path / "ck" / "checkpoint")
    os.mkdir(tmp_path / "ck" / "checkpoint")
    before = tree_digest(str(tmp_path / "ck"))
    error_line(cli("import", "new.npz", "ck/model.ckpt", "--force", cwd=tmp_path), "ck/checkpoint", "directory")
    assert tree_digest(str(tmp_path / "ck")) == before
    assert read_ckpt(str(tmp_path / "ck" / "model.ckpt")) == as_bytes(OLD)
    no_temporaries(tmp_path)


def _fail_state_writes(monkeypatch: Any) -> None:
    """ENOSPC for any file created for the state file (its temporary), as on a full disk."""
    real_open = os.open

    def full(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if os.path.basename(os.fspath(path)).startswith(".checkpoint.") and flags & os.O_CREAT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", full)


@pytest.mark.parametrize("force", [True, False])
def test_no_space_for_the_state_file_writes_nothing(tmp_path: Any, monkeypatch: Any, capsys: Any, force: bool) -> None:
    save_npz(tmp_path / "old.npz", OLD)
    save_npz(tmp_path / "new.npz", NEW)
    monkeypatch.chdir(tmp_path)
    if force:  # replacing a checkpoint, and asking for the state file to name it: the old one must stay
        assert in_process("import", "old.npz", "ck/model.ckpt", "-q")[0] == 0
        write_state(tmp_path / "ck", "model.ckpt", "model.ckpt-0")  # a later one is the latest
        before = tree_digest(str(tmp_path / "ck"))
    _fail_state_writes(monkeypatch)
    rc, _, err = in_process("import", "new.npz", "ck/model.ckpt", *(["--force"] if force else []))
    assert rc == 2 and "no space left" in err and "nothing was written" in err, err
    if force:
        assert tree_digest(str(tmp_path / "ck")) == before
        assert read_ckpt(str(tmp_path / "ck" / "model.ckpt")) == as_bytes(OLD)
    else:
        assert not os.path.exists(tmp_path / "ck"), "the new checkpoint's directory was left behind"
    no_temporaries(tmp_path)


def test_state_file_rename_failure_says_what_is_on_disk(tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    save_npz(tmp_path / "new.npz", NEW)
    monkeypatch.chdir(tmp_path)
    save_ckpt(str(tmp_path / "ck" / "model.ckpt-1"), OLD)
    write_state(tmp_path / "ck", "model.ckpt-1")
    state_before = (tmp_path / "ck" / "checkpoint").read_bytes()
    real_replace = os.replace

    def eio(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if os.path.basename(os.fspath(dst)) == "checkpoint":
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(dst))
        real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", eio)
    rc, _, err = in_process("import", "new.npz", "ck/model.ckpt-2", "--force")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "nothing was written" not in err, err
    assert "ck/model.ckpt-2 was written and is complete" in err and "still names model.ckpt-1" in err, err
    assert read_ckpt(str(tmp_path / "ck" / "model.ckpt-2")) == as_bytes(NEW)
    assert (tmp_path / "ck" / "checkpoint").read_bytes() == state_before
    no_temporaries(tmp_path)


def test_a_state_file_that_cannot_be_updated_is_one_error_type_of_the_public_api(tmp_path: Any, monkeypatch: Any) -> None:
    """The library raises StateFileError (from ckptbridge.errors, re-exported at the root): a caller can tell
    "the checkpoint is written, its state file is not" from a failed write."""
    import ckptbridge
    from ckptbridge.errors import CkptBridgeError, StateFileError

    save_npz(tmp_path / "new.npz", NEW)
    save_ckpt(str(tmp_path / "ck" / "model.ckpt-1"), OLD)
    write_state(tmp_path / "ck", "model.ckpt-1")
    real_replace = os.replace

    def eio(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if os.path.basename(os.fspath(dst)) == "checkpoint":
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(dst))
        real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", eio)
    with pytest.raises(StateFileError, match="was written and is complete") as e:
        ckptbridge.rebuild(str(tmp_path / "new.npz"), str(tmp_path / "ck" / "model.ckpt-2"), force=True)
    assert ckptbridge.StateFileError is StateFileError and isinstance(e.value, CkptBridgeError)
    assert "StateFileError" in ckptbridge.__all__
    assert read_ckpt(str(tmp_path / "ck" / "model.ckpt-2")) == as_bytes(NEW)


# --------------------------------------------------------------------------- hostile 10: a training directory's state file


def test_import_beside_training_checkpoints_leaves_the_state_file(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)
    for step in ("500", "1000"):
        save_ckpt(str(tmp_path / "train" / f"model.ckpt-{step}"), OLD)
    state = write_state(tmp_path / "train", "model.ckpt-500", "model.ckpt-1000")
    before = open(state, "rb").read()
    r = cli("import", "a.npz", "train/other.ckpt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert open(state, "rb").read() == before
    assert "left as it was" in r.stderr and "model.ckpt-1000" in r.stderr and "--force" in r.stderr, r.stderr
    assert json.loads(cli("ls", "train", "--json", cwd=tmp_path).stdout)["path"].endswith("model.ckpt-1000")
    # Asked for with --force: the new one becomes the latest and no earlier one is dropped.
    r = cli("import", "a.npz", "train/third.ckpt", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from ckptbridge.io import state as _state

    got = _state.read_state(str(tmp_path / "train"))
    assert got is not None and got.model_checkpoint_path == "third.ckpt"
    assert got.all_model_checkpoint_paths == ["model.ckpt-500", "model.ckpt-1000", "third.ckpt"]
    assert json.loads(cli("ls", "train", "--json", cwd=tmp_path).stdout)["path"].endswith("third.ckpt")


@pytest.mark.tf
def test_updated_state_file_is_what_tensorflow_restores(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)
    odd = "we\"ird 'name'\x01\u00e9.ckpt"  # no backslash: TensorFlow globs the prefix, where it is an escape
    for step in ("500", "1000"):
        save_ckpt(str(tmp_path / "train" / f"model.ckpt-{step}"), OLD)
    write_state(tmp_path / "train", "model.ckpt-500", "model.ckpt-1000")
    assert cli("import", "a.npz", "train/" + odd, "--force", "-q", cwd=tmp_path).returncode == 0
    assert cli("import", "a.npz", "fresh/" + odd, "-q", cwd=tmp_path).returncode == 0
    code = textwrap.dedent("""
        import json, sys, tensorflow as tf
        out = {}
        for d in sys.argv[1:]:
            s = tf.train.get_checkpoint_state(d)
            out[d] = [tf.train.latest_checkpoint(d), list(s.all_model_checkpoint_paths)]
        print(json.dumps(out))
    """)
    train, fresh = str(tmp_path / "train"), str(tmp_path / "fresh")
    r = python(code, train, fresh, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[train][0] == os.path.join(train, odd)
    assert [os.path.basename(p) for p in got[train][1]] == ["model.ckpt-500", "model.ckpt-1000", odd]
    assert got[fresh][0] == os.path.join(fresh, odd)


# --------------------------------------------------------------------------- hostile 11 (e): a malformed state file


def test_malformed_state_file_is_named_not_an_internal_error(tmp_path: Any) -> None:
    save_ckpt(str(tmp_path / "d" / "m.ckpt"), NEW)
    with open(tmp_path / "d" / "checkpoint", "w") as f:
        f.write('model_checkpoint_path: "m\\x.ckpt"\n')
    error_line(cli("ls", "d", cwd=tmp_path), "d/checkpoint", "malformed", "\\x")


def test_state_file_names_are_escaped_and_read_back(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)
    odd = 'we"ird\\x.ckpt'
    r = cli("import", "a.npz", "d/" + odd, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    time.sleep(0.01)
    save_ckpt(str(tmp_path / "d" / "newer.ckpt"), OLD)  # newer, but not what the state file names
    got = cli("ls", "d", "--json", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["path"] == os.path.join("d", odd)
    assert "state file" in r.stderr and "created" in r.stderr, r.stderr


# --------------------------------------------------------------------------- hostile 8: SIGKILL between the renames of a forced replace

KILLER = textwrap.dedent(r"""
    import os, resource, signal, sys
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    directory, kill_at = os.path.abspath(sys.argv[2]), int(sys.argv[3])
    from ckptbridge.io import atomic as _atomic
    count = 0

    def step(fn):
        def run(*args, **kwargs):
            global count
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if any(os.path.dirname(os.path.abspath(os.fsdecode(p))) == directory for p in paths):
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return run

    # Every change a reader of the checkpoint's directory can see, wherever it is made from.
    for name in ("replace", "rename", "unlink", "remove", "link", "rmdir"):
        setattr(os, name, step(getattr(os, name)))
    if hasattr(_atomic, "rename_noreplace"):
        _atomic.rename_noreplace = step(_atomic.rename_noreplace)
    from ckptbridge.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def _kill_at_every_step(tmp_path: Any, old_shard_bytes: int | None) -> list[tuple[int, str]]:
    """Replace ck/model.ckpt (OLD) with --force (NEW), killed before each step in turn.

    Returns (step, snapshot directory) for every kill; asserts what a native reader sees.
    """
    save_npz(tmp_path / "new.npz", NEW)
    snapshots = []
    for k in range(1, 40):
        work = tmp_path / f"run{k}"
        ck = work / "ck"
        save_ckpt(str(ck / "model.ckpt"), {"a": OLD["big"], "b": OLD["big"] * 2}, max_shard_bytes=old_shard_bytes)
        write_state(ck, "model.ckpt")
        r = python(KILLER, str(AS_LIMIT), str(ck), str(k), "import", str(tmp_path / "new.npz"), str(ck / "model.ckpt"), "--force", "-q")
        if r.returncode == 0:
            assert read_ckpt(str(ck / "model.ckpt")) == as_bytes(NEW)
            no_temporaries(work)
            assert k > 1, "no step of the replace was seen"
            return snapshots
        assert r.returncode == -signal.SIGKILL, r.stderr
        old = {"a": OLD["big"].tobytes(), "b": (OLD["big"] * 2).tobytes()}
        try:
            got = read_ckpt(str(ck / "model.ckpt"))
        except Exception:  # noqa: BLE001 - not whole at the prefix: the old one must be whole where the error says
            got = None
        if got is not None:
            assert got in (old, as_bytes(NEW)), f"killed before step {k}: a mix of old and new"
        else:
            assert old_shard_bytes is None, f"killed before step {k}: no checkpoint whole at the prefix"
            line = error_line(cli("ls", str(ck / "model.ckpt")), "previous checkpoint is whole in")
            kept = _atomic.previous_kept(str(ck / "model.ckpt"))
            assert kept is not None and os.path.dirname(kept) in line, line
            assert read_ckpt(kept) == old, f"killed before step {k}: the kept previous checkpoint is not whole"
            error_line(cli("ls", str(ck)), "previous checkpoint is whole in")
        snapshots.append((k, str(ck)))
    pytest.fail("the forced replace never finished")


def test_sigkill_at_any_step_of_a_forced_replace_keeps_a_whole_checkpoint(tmp_path: Any) -> None:
    _kill_at_every_step(tmp_path, old_shard_bytes=None)


def test_sigkill_at_any_step_keeps_the_prefix_readable_when_shard_names_differ(tmp_path: Any) -> None:
    # The old checkpoint has two shards, the new one one: no name is shared but the index.
    _kill_at_every_step(tmp_path, old_shard_bytes=4100)


@pytest.mark.tf
def test_sigkill_at_any_step_tensorflow_reads_a_whole_checkpoint(tmp_path: Any) -> None:
    snapshots = _kill_at_every_step(tmp_path, old_shard_bytes=None)
    targets = []
    for _, ck in snapshots:
        prefix = os.path.join(ck, "model.ckpt")
        targets.append(prefix if os.path.exists(prefix + ".index") else _atomic.previous_kept(prefix))
    code = textwrap.dedent("""
        import json, sys, tensorflow as tf
        out = []
        for p in sys.argv[1:]:
            r = tf.train.load_checkpoint(p)
            out.append({n: r.get_tensor(n).tolist() for n in sorted(r.get_variable_to_shape_map())})
        print(json.dumps(out))
    """)
    r = python(code, *targets, timeout=300)
    assert r.returncode == 0, r.stderr
    old = {"a": OLD["big"].tolist(), "b": (OLD["big"] * 2).tolist()}
    for got in json.loads(r.stdout.strip().splitlines()[-1]):
        assert got in (old, {"w": NEW["w"].tolist()})


# --------------------------------------------------------------------------- hostile 11 (b): two runs racing to one output


def test_the_second_of_two_racing_archive_publishes_fails(tmp_path: Any) -> None:
    dest = str(tmp_path / "out.npz")
    a, b = _atomic.AtomicFile(dest), _atomic.AtomicFile(dest)  # both pass the existence check
    for f, text in ((a, b"first"), (b, b"second")):
        with open(f.tmp, "wb") as out:
            out.write(text)
    a.commit()
    with pytest.raises(OutputExistsError, match="already exists"):
        b.commit()
    b.abort()
    assert open(dest, "rb").read() == b"first"
    no_temporaries(tmp_path)


@pytest.mark.parametrize("second_shards", [None, 4100], ids=["same-shard-names", "other-shard-names"])
def test_the_second_of_two_racing_checkpoint_publishes_fails(tmp_path: Any, second_shards: int | None) -> None:
    prefix = str(tmp_path / "ck" / "model.ckpt")
    a, b = _atomic.AtomicCheckpoint(prefix), _atomic.AtomicCheckpoint(prefix)
    save_ckpt(a.tmp_prefix, NEW)
    save_ckpt(b.tmp_prefix, {"a": OLD["big"], "b": OLD["big"]}, max_shard_bytes=second_shards)
    a.commit()
    listing = sorted(os.listdir(tmp_path / "ck"))
    listing.remove(os.path.basename(b.tmpdir))
    with pytest.raises(OutputExistsError, match="already exists"):
        b.commit()
    b.abort()
    assert read_ckpt(prefix) == as_bytes(NEW)
    assert sorted(os.listdir(tmp_path / "ck")) == listing, "the loser left files beside the winner's"
    no_temporaries(tmp_path)


@pytest.mark.parametrize("fallback", ["link", "check-then-rename"])
def test_publish_without_renameat2_still_refuses_an_existing_output(tmp_path: Any, monkeypatch: Any, fallback: str) -> None:
    monkeypatch.setattr(_atomic, "_renameat2", False)
    if fallback == "check-then-rename":
        def no_links(*a: Any, **k: Any) -> None:
            raise OSError(errno.EPERM, "hard links not supported")

        monkeypatch.setattr(os, "link", no_links)
    dest = str(tmp_path / "out.npz")
    os.symlink("/nonexistent", dest)  # a dangling symlink is an existing output too
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        _atomic.rename_noreplace(str(src), dest)
    assert os.path.islink(dest) and src.exists()
    os.unlink(dest)
    _atomic.rename_noreplace(str(src), dest)
    assert open(dest, "rb").read() == b"x" and not src.exists()


# --------------------------------------------------------------------------- hostile 11 (c): a dangling symlink


def test_dangling_symlink_at_the_index_is_not_replaced_without_force(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)
    (tmp_path / "d").mkdir()
    os.symlink("/nonexistent", tmp_path / "d" / "m.ckpt.index")
    error_line(cli("import", "a.npz", "d/m.ckpt", cwd=tmp_path), "d/m.ckpt", "--force")
    assert os.readlink(tmp_path / "d" / "m.ckpt.index") == "/nonexistent"
    no_temporaries(tmp_path)


# --------------------------------------------------------------------------- hostile 11 (d): FIFOs


@pytest.mark.parametrize("where", ["archive", "index", "data", "state file"])
def test_a_fifo_as_an_input_is_refused_without_opening_it(tmp_path: Any, where: str) -> None:
    prefix = save_ckpt(str(tmp_path / "d" / "m.ckpt"), NEW)
    if where == "archive":
        os.mkfifo(tmp_path / "x.npz")
        target, needle = "x.npz", "x.npz"
    elif where == "index":
        os.replace(prefix + ".index", tmp_path / "spare")
        os.mkfifo(prefix + ".index")
        target, needle = "d/m.ckpt", "m.ckpt.index"
    elif where == "data":
        data = glob.glob(prefix + ".data-*")[0]
        os.unlink(data)
        os.mkfifo(data)
        target, needle = "d/m.ckpt", os.path.basename(data)
    else:
        os.mkfifo(tmp_path / "d" / "checkpoint")
        target, needle = "d", "d/checkpoint"
    error_line(cli("ls", target, cwd=tmp_path, timeout=20), needle, "FIFO", "regular file")


def test_a_fifo_state_file_beside_an_import_is_left_alone(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "checkpoint")
    r = cli("import", "a.npz", "d/m.ckpt", cwd=tmp_path, timeout=20)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "d" / "checkpoint") and not os.path.isfile(tmp_path / "d" / "checkpoint")
    error_line(cli("import", "a.npz", "d/n.ckpt", "--force", cwd=tmp_path, timeout=20), "d/checkpoint", "FIFO")
    assert not glob.glob(str(tmp_path / "d" / "n.ckpt*"))


# --------------------------------------------------------------------------- hostile 11 (f): Ctrl-C during start-up


def _maps_numpy(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "_multiarray_umath" in f.read()
    except OSError:
        return False


def test_ctrl_c_while_python_imports_numpy_ends_with_one_line(tmp_path: Any) -> None:
    save_npz(tmp_path / "a.npz", NEW)

    p = popen("ls", "a.npz", cwd=tmp_path, as_limit=AS_LIMIT)
    try:
        end = time.monotonic() + 30
        while not _maps_numpy(p.pid):  # start-up is well under way: NumPy is being imported
            assert p.poll() is None and time.monotonic() < end, "the command ended before NumPy was loaded"
            time.sleep(0.002)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=TIMEOUT)
    finally:
        p.kill()
    error_line((p.returncode, err), "interrupted", status=130)
