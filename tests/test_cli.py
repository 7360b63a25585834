"""``python -m ckptbridge`` as a user runs it: real subprocesses, real exit codes, real stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ckptbridge

from helpers import assert_one_line_error, cli, raw_bundle

# --------------------------------------------------------------------------- import hygiene


def test_import_ckptbridge_does_not_import_tensorflow(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, w=np.ones(3, np.float32))
    code = textwrap.dedent(
        f"""
        import sys
        import ckptbridge
        assert "tensorflow" not in sys.modules, "import ckptbridge imported tensorflow"
        with ckptbridge.read({str(path)!r}) as r:
            r["w"]
        ckptbridge.verify({str(path)!r})
        import ckptbridge.cli
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "tf_slim", "keras"))
        print(bad)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version_and_help():
    proc = cli("--version")
    assert proc.returncode == 0 and ckptbridge.__version__ in proc.stdout
    proc = cli("export", "--help")
    assert proc.returncode == 0
    for opt in ("--include", "--exclude", "--weights-only", "--use-ema", "--compress", "--force", "--quiet"):
        assert opt in proc.stdout


# --------------------------------------------------------------------------- errors: one line, status 2


def test_error_missing_path(tmp_path):
    missing = str(tmp_path / "no" / "model.ckpt")
    assert_one_line_error(cli("ls", missing), missing)
    assert_one_line_error(cli("export", missing, str(tmp_path / "o.npz")), missing)
    assert not (tmp_path / "o.npz").exists()


def test_error_unknown_suffix(tmp_path):
    line = assert_one_line_error(cli("export", str(tmp_path / "m.ckpt"), str(tmp_path / "out.txt")), "out.txt")
    for suffix in (".npz", ".h5", ".hdf5"):
        assert suffix in line
    assert os.listdir(tmp_path) == []


def test_error_directory_without_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    assert_one_line_error(cli("export", str(empty), str(tmp_path / "o.npz")), str(empty))
    assert_one_line_error(cli("ls", str(empty)), str(empty))
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_error_damaged_archive(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_line_error(cli("ls", str(bad)), str(bad))


def test_error_existing_output_from_archive(tmp_path):
    """Export from an archive source needs no TensorFlow; the refusal still leaves the output alone."""
    src = tmp_path / "src.npz"
    np.savez(src, w=np.ones(3, np.float32))
    out = tmp_path / "out.h5"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli("export", str(src), str(out)), str(out), "--force")
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["out.h5", "src.npz"]


# --------------------------------------------------------------------------- with TensorFlow-written checkpoints


@pytest.mark.tf
def test_error_existing_output_without_force(sharded_ckpt, tmp_path):
    out = tmp_path / "o.npz"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli("export", sharded_ckpt, str(out)), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    proc = cli("export", sharded_ckpt, str(out), "--force", "--quiet")
    assert proc.returncode == 0, proc.stderr
    with ckptbridge.read(str(out)) as r:
        assert len(r) == 6
    assert sorted(os.listdir(tmp_path)) == ["o.npz"]


@pytest.mark.tf
@pytest.mark.parametrize("engine", ["auto", "tf"])
def test_ls_table(sharded_ckpt, ckpts, engine):
    expected = ckpts.tf_expected(sharded_ckpt)
    proc = cli("ls", sharded_ckpt, "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[:-1]}
    assert set(rows) == set(expected)
    total = 0
    for name, (dtype, shape) in expected.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        total += nbytes
        fields = rows[name].split()
        assert fields[1] == dtype
        assert str(list(shape)) in rows[name]
        assert fields[-1] == str(nbytes)
    assert lines[-1].startswith(f"{len(expected)} tensors, {total} bytes")


@pytest.mark.tf
def test_ls_json_totals(dtypes_ckpt, ckpts, tmp_path):
    expected = ckpts.tf_expected(dtypes_ckpt)
    proc = cli("ls", dtypes_ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    got = {t["name"]: t for t in doc["tensors"]}
    assert set(got) == set(expected)
    for name, (dtype, shape) in expected.items():
        assert got[name]["dtype"] == dtype, name
        assert got[name]["shape"] == list(shape), name
    assert doc["total_tensors"] == len(expected)
    assert doc["total_bytes"] == sum(t["bytes"] for t in doc["tensors"])
    numeric = {n: (d, s) for n, (d, s) in expected.items() if d != "string"}
    want_bytes = sum(int(np.prod(s)) * (2 if d == "bfloat16" else np.dtype(d).itemsize) for d, s in numeric.values())
    assert sum(got[n]["bytes"] for n in numeric) == want_bytes
    # the same listing for the exported archive
    out = tmp_path / "d.h5"
    assert cli("export", dtypes_ckpt, str(out), "-q").returncode == 0
    doc2 = json.loads(cli("ls", str(out), "--json").stdout)
    assert [(t["name"], t["dtype"], t["shape"]) for t in doc2["tensors"]] == [(t["name"], t["dtype"], t["shape"]) for t in doc["tensors"]]
    assert doc2["total_tensors"] == doc["total_tensors"]


@pytest.mark.tf
def test_export_no_progress_when_not_a_tty(tf2_ckpt, tmp_path, assert_same_as_tf):
    out = tmp_path / "m.npz"
    proc = cli("export", tf2_ckpt, str(out), "--weights-only")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "B/s" not in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    dropped = [ln for ln in lines if ln.startswith("dropped ")]
    assert any("save_counter/.ATTRIBUTES/VARIABLE_VALUE" in ln for ln in dropped)
    assert len([ln for ln in dropped if ln.startswith("dropped optimizer/")]) >= 5
    assert lines[-1].startswith("wrote 3 tensors") and str(out) in lines[-1]
    assert proc.stdout == ""
    with ckptbridge.read(str(out)) as r:
        assert_same_as_tf(r, tf2_ckpt, names=[n for n in r])
        assert sorted(r) == ["model/b/.ATTRIBUTES/VARIABLE_VALUE", "model/scale/.ATTRIBUTES/VARIABLE_VALUE", "model/w/.ATTRIBUTES/VARIABLE_VALUE"]


@pytest.mark.tf
def test_export_quiet_and_options(dtypes_ckpt, tmp_path):
    out = tmp_path / "m.h5"
    proc = cli("export", dtypes_ckpt, str(out), "-q", "--use-ema", "--compress", "--include", "^w", "--include", "^scalar/", "--exclude", "string")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    with ckptbridge.read(str(out)) as r:
        assert sorted(r) == ["scalar/bfloat16", "scalar/bool", "scalar/float32", "scalar/int64", "scalar/uint8", "w", "w/Momentum"]
        assert r.metadata()["ema_swaps"] == {"w": "w/ExponentialMovingAverage"}
    proc = cli("export", dtypes_ckpt, str(tmp_path / "e.npz"), "--use-ema", "--include", "^w")
    assert "ema: w <- w/ExponentialMovingAverage" in proc.stderr.splitlines()


@pytest.mark.tf
def test_export_v1_file(resnet_v1, tmp_path):
    out = tmp_path / "v1.npz"
    proc = cli("export", resnet_v1, str(out), "-q", "--include", "^resnet_v1_50/logits/")
    assert proc.returncode == 0, proc.stderr
    with ckptbridge.read(str(out)) as r:
        assert sorted(r) == [
            "resnet_v1_50/logits/biases", "resnet_v1_50/logits/biases/ExponentialMovingAverage", "resnet_v1_50/logits/biases/Momentum",
            "resnet_v1_50/logits/weights", "resnet_v1_50/logits/weights/ExponentialMovingAverage", "resnet_v1_50/logits/weights/Momentum",
        ]


@pytest.mark.tf
def test_native_engine_reads_v1(resnet_v1, tmp_path):
    r = cli("export", resnet_v1, str(tmp_path / "o.npz"), "--engine", "native", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert os.listdir(tmp_path) == ["o.npz"]


@pytest.mark.tf
def test_native_export_needs_no_tensorflow(sharded_ckpt, tmp_path):
    """A V2 checkpoint converts with the native engine in a process that never imports TensorFlow."""
    out = tmp_path / "o.npz"
    code = textwrap.dedent(
        f"""
        import sys, ckptbridge
        ckptbridge.export({sharded_ckpt!r}, {str(out)!r}, read=ckptbridge.ReadOptions(engine="native"))
        print("tensorflow" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    with ckptbridge.read(str(out)) as r:
        assert len(r) == 6


# --------------------------------------------------------------------------- names and dtypes as ls shows them


def test_ls_escapes_control_characters_and_bytes_that_are_not_utf8(tmp_path):
    prefix = str(tmp_path / "m.ckpt")
    four = np.zeros(1, np.float32).tobytes()
    raw_bundle(prefix, {b"\x1b[2J\x1b[31mPWNED": (1, (1,), four), b"w\xff": (1, (1,), four), b"ok": (1, (1,), four)})
    proc = cli("ls", prefix)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\\x1b[2J\\x1b[31mPWNED" in proc.stdout
    assert "w\\xff" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("3 tensors, 12 bytes")


def test_ls_and_export_never_hide_a_dtype_the_native_engine_cannot_carry(tmp_path):
    """Without TensorFlow: a variant (enum 21) and a DataType newer than ckptbridge's table (enum 39)."""
    prefix = str(tmp_path / "m.ckpt")
    four = np.ones(1, np.float32).tobytes()
    raw_bundle(prefix, {b"w": (1, (1,), four), b"future": (39, (2,), b"\x01\x02")})
    proc = cli("ls", prefix, "--json")
    doc = json.loads(proc.stdout)
    assert [(t["name"], t["dtype"], t["carried"]) for t in doc["tensors"]] == [("future", "DataType 39", False), ("w", "float32", True)]
    out = tmp_path / "m.npz"
    assert_one_line_error(cli("export", prefix, str(out)), "'future' (DataType 39", "--exclude '^future$'")
    assert not out.exists()
    assert cli("export", prefix, str(out), "-q", "--exclude", "^future$").returncode == 0
    with ckptbridge.read(str(out)) as r:
        assert list(r) == ["w"] and "future" in r.metadata()["dropped"]
    assert cli("verify", prefix).stdout.startswith("ok: 2 tensors (1 of a dtype ckptbridge does not carry")


def test_a_fifo_as_rename_file_is_refused_not_waited_on(tmp_path):
    archive = tmp_path / "a.npz"
    np.savez(archive, w=np.ones(3, np.float32))
    fifo = tmp_path / "names.json"
    os.mkfifo(fifo)
    proc = cli("export", str(archive), str(tmp_path / "b.npz"), "--rename-file", str(fifo), timeout=60)
    assert_one_line_error(proc, "--rename-file", "not a regular file")


def test_main_run_twice_in_one_process_keeps_no_state_from_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """After a Ctrl-C stopped one command, the next main() in the same process works and tells the truth."""
    import signal as _signal

    from ckptbridge import cli as cli_mod
    from ckptbridge.formats import npz as npz_mod

    src = str(tmp_path / "a.npz")
    ckptbridge.save({"w": np.arange(4, dtype=np.float32)}, src)
    real = npz_mod.NpzSink.write_blocks
    fired = []

    def interrupted(self, name, stream):
        if not fired:
            fired.append(name)
            _signal.raise_signal(_signal.SIGINT)  # what a user's Ctrl-C does, mid-export
        return real(self, name, stream)

    monkeypatch.setattr(npz_mod.NpzSink, "write_blocks", interrupted)
    # Run as a background job of a non-interactive shell (CI started with `cmd &`), this process
    # inherits SIGINT ignored, and main() rightly leaves it so: give it the terminal's default.
    previous = _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    try:
        first = tmp_path / "first.npz"
        code = cli_mod.main(["export", src, str(first), "-q"])
    finally:
        _signal.signal(_signal.SIGINT, previous)
    assert code == 130 and not first.exists()
    second = tmp_path / "second.npz"
    assert cli_mod.main(["export", src, str(second), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("interrupted") == 1 and "nothing was written" in err
    with ckptbridge.read(str(second)) as r:
        assert r["w"].tobytes() == np.arange(4, dtype=np.float32).tobytes()
