"""``ckptbridge archive``: every checkpoint under a source, one export each, a manifest, re-runs that skip what is done.

The TensorFlow-free part uses checkpoints of the native writer to test what archive
decides (discovery, the manifest, re-runs, failures, signals).  The ``tf`` part holds
the bit-exact claim: TensorFlow's own files, at moto's S3 server, archived on a Dask
cluster of real ``dask scheduler`` and ``dask worker`` processes, compared with
``tf.train.load_checkpoint``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import test_remote

import ckptbridge
from ckptbridge.io.manifest import MANIFEST

from helpers import CLI_ENV, cli, error_line, flip, in_process, leftovers, popen, same, write_checkpoint

moto_s3 = test_remote.moto_s3  # the S3 server fixture, kept once
_upload = test_remote._upload


def _tensors(step: int, n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {f"net/layer{i}/weights": rng.standard_normal((8, 8)).astype(np.float32) for i in range(n)} | {
        "global_step": np.int64(step), "net/bn/moving_mean": rng.standard_normal(8)}


def _runs(root: str, steps: dict[str, list[int]]) -> dict[str, dict[str, np.ndarray]]:
    """Training directories ``root/runs/<run>/model.ckpt-<step>``; rel -> tensors written."""
    written = {}
    for run, ss in steps.items():
        for s in ss:
            tensors = _tensors(s)
            write_checkpoint(os.path.join(root, "runs", run, f"model.ckpt-{s}"), tensors)
            written[f"runs/{run}/model.ckpt-{s}"] = tensors
    return written


def _manifest(dest: str) -> dict[str, dict[str, Any]]:
    with open(os.path.join(dest, MANIFEST), encoding="utf-8") as f:
        return {e["rel"]: e for e in map(json.loads, f)}


def _mtimes(dest: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, n), dest): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, files in os.walk(dest) for n in files if n != MANIFEST}


def _assert_same(path: str, tensors: dict[str, np.ndarray]) -> None:
    got = ckptbridge.load(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert same(got[k], np.asarray(v)), k


# --------------------------------------------------------------------------- local, without TensorFlow


def test_archive_mirrors_paths_and_records_each_checkpoint(tmp_path: Any) -> None:
    written = _runs(str(tmp_path), {"a": [100, 200], "b": [300]})
    os.makedirs(tmp_path / "runs" / "b" / "events")  # a directory holding no checkpoint, and files that are none
    (tmp_path / "runs" / "b" / "events" / "events.out.tfevents.1").write_bytes(b"\x00" * 64)
    (tmp_path / "runs" / "a" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-200"\n')
    dest = str(tmp_path / "out")
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "--jobs", "1")
    assert rc == 0, err
    assert "archived 3, skipped 0 up to date, 0 incomplete, 0 failed" in err
    entries = _manifest(dest)
    assert set(entries) == {rel + ".h5" for rel in written}
    for rel, tensors in written.items():
        out = os.path.join(dest, rel + ".h5")
        _assert_same(out, tensors)
        e = entries[rel + ".h5"]
        assert e["status"] == "done" and e["error"] is None and e["tensors"] == len(tensors)
        assert e["bytes"] == sum(np.asarray(v).nbytes for v in tensors.values())
        st = os.stat(out)
        assert e["output_identity"] == [st.st_size, str(st.st_mtime_ns)]
        prefix = os.path.join(str(tmp_path), rel)
        assert e["source_files"] == {os.path.basename(p): [os.path.getsize(p), str(os.stat(p).st_mtime_ns)]
                                     for p in (prefix + ".index", prefix + ".data-00000-of-00001")}
        assert e["checksum"].startswith("sha256-crc32c:") and len(e["checksum"]) == len("sha256-crc32c:") + 64
    # the checksum is of the tensors: the same tensors under the same names give the same one, others another
    assert len({e["checksum"] for e in entries.values()}) == 3
    assert leftovers(dest) == []


def test_the_checksum_is_what_the_read_back_found(tmp_path: Any) -> None:
    from ckptbridge._archive import content_checksum
    from ckptbridge.pipe.transfer import exchange_checksum

    tensors = _tensors(7)
    write_checkpoint(str(tmp_path / "c" / "model.ckpt-7"), tensors)
    report = ckptbridge.archive(str(tmp_path / "c"), str(tmp_path / "out"), workers=ckptbridge.Workers(jobs=1))
    assert [e.status for e in report.entries] == ["done"]
    got = ckptbridge.load(str(tmp_path / "out" / "c" / "model.ckpt-7.h5"))
    want = content_checksum({k: exchange_checksum(np.asarray(v)) for k, v in got.items()})
    assert _manifest(str(tmp_path / "out"))["c/model.ckpt-7.h5"]["checksum"] == want


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(tmp_path: Any) -> None:
    written = _runs(str(tmp_path), {"a": [1, 2], "b": [3]})
    dest = str(tmp_path / "out")
    src = str(tmp_path / "runs")
    assert in_process("archive", src, dest, "-j", "1")[0] == 0
    before = _mtimes(dest)
    rc, _, err = in_process("archive", src, dest, "-j", "1")
    assert rc == 0 and "archived 0, skipped 3 up to date" in err, err
    assert _mtimes(dest) == before
    # a checkpoint saved again, an output removed, an output replaced by something else: those three are redone
    time.sleep(0.01)
    write_checkpoint(str(tmp_path / "runs" / "a" / "model.ckpt-1"), _tensors(11))
    os.remove(os.path.join(dest, "runs", "a", "model.ckpt-2.h5"))
    manifest_before = _manifest(dest)
    rc, out, _ = in_process("archive", src, dest, "-j", "1", "--dry-run")
    assert rc == 0 and out.splitlines()[-1].startswith("dry run: would archive 2, 1 up to date, 0 incomplete"), out
    assert sorted(ln.split(" -> ")[1] for ln in out.splitlines()[:-1]) == [
        os.path.join(dest, "runs", "a", f"model.ckpt-{s}.h5") for s in (1, 2)]
    assert _manifest(dest) == manifest_before and _mtimes(dest) == {k: v for k, v in before.items() if "ckpt-2" not in k}
    rc, _, err = in_process("archive", src, dest, "-j", "1")
    assert rc == 0 and "archived 2, skipped 1 up to date" in err, err
    _assert_same(os.path.join(dest, "runs", "a", "model.ckpt-1.h5"), _tensors(11))
    _assert_same(os.path.join(dest, "runs", "a", "model.ckpt-2.h5"), written["runs/a/model.ckpt-2"])
    assert _mtimes(dest)["runs/b/model.ckpt-3.h5"] == before["runs/b/model.ckpt-3.h5"]
    shutil.copy(os.path.join(dest, "runs", "a", "model.ckpt-1.h5"), os.path.join(dest, "runs", "b", "model.ckpt-3.h5"))
    rc, _, err = in_process("archive", src, dest, "-j", "1")
    assert rc == 0 and "archived 1, skipped 2 up to date" in err, err
    _assert_same(os.path.join(dest, "runs", "b", "model.ckpt-3.h5"), written["runs/b/model.ckpt-3"])
    # other export options make other outputs: all redone, and the filter applied
    rc, _, err = in_process("archive", src, dest, "-j", "1", "--exclude", "global_step")
    assert rc == 0 and "archived 3, skipped 0" in err, err
    assert "global_step" not in ckptbridge.load(os.path.join(dest, "runs", "b", "model.ckpt-3.h5"))
    rc, _, err = in_process("archive", src, dest, "-j", "1", "--exclude", "global_step", "--force")
    assert rc == 0 and "archived 3, skipped 0" in err, err


def test_a_large_manifest_is_rewritten_at_most_every_interval_and_at_the_end(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptbridge import _archive
    from ckptbridge.io.manifest import Destination

    _runs(str(tmp_path), {"a": [1, 2, 3]})
    writes: list[int] = []
    real = Destination.write_manifest

    def counted(self: Destination, entries: dict[str, Any]) -> int:
        writes.append(sum(e.get("status") == "done" for e in entries.values()))
        return real(self, entries)

    monkeypatch.setattr(Destination, "write_manifest", counted)
    monkeypatch.setattr(_archive, "SMALL_MANIFEST", 0)  # every manifest is "large"
    monkeypatch.setattr(_archive, "MANIFEST_EVERY", 3600.0)
    report = ckptbridge.archive(str(tmp_path / "runs"), str(tmp_path / "out"), workers=ckptbridge.Workers(jobs=1))
    assert len(report.done) == 3
    assert writes == [0, 3]  # before the first checkpoint, then once at the end
    assert {e["status"] for e in _manifest(str(tmp_path / "out")).values()} == {"done"}
    writes.clear()
    monkeypatch.setattr(_archive, "SMALL_MANIFEST", 1 << 20)
    ckptbridge.archive(str(tmp_path / "runs"), str(tmp_path / "out"), workers=ckptbridge.Workers(jobs=1), force=True)
    assert writes == [3, 3, 3, 3]  # small: after each checkpoint (the first holds the earlier run's entries)


def test_a_corrupt_checkpoint_is_one_line_and_the_others_go_on(tmp_path: Any) -> None:
    written = _runs(str(tmp_path), {"a": [1, 2], "b": [3]})
    bad = str(tmp_path / "runs" / "a" / "model.ckpt-2")
    flip(bad + ".data-00000-of-00001", 40)
    dest = str(tmp_path / "out")
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "-j", "1", "-q")
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("ckptbridge: failed: ") and bad in lines[0] and "checksum" in lines[0], lines[0]
    assert "archived 2, skipped 0 up to date, 0 incomplete, 1 failed" in lines[1]
    assert not os.path.exists(os.path.join(dest, "runs", "a", "model.ckpt-2.h5")) and leftovers(dest) == []
    entries = _manifest(dest)
    assert entries["runs/a/model.ckpt-2.h5"]["status"] == "failed" and "checksum" in entries["runs/a/model.ckpt-2.h5"]["error"]
    for rel in ("runs/a/model.ckpt-1", "runs/b/model.ckpt-3"):
        _assert_same(os.path.join(dest, rel + ".h5"), written[rel])
    # the failed one is tried again, the rest skipped; repaired, it is archived
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "-j", "1", "-q")
    assert rc == 1 and "archived 0, skipped 2 up to date, 0 incomplete, 1 failed" in err, err
    flip(bad + ".data-00000-of-00001", 40)
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "-j", "1")
    assert rc == 0 and "archived 1, skipped 2" in err, err
    _assert_same(os.path.join(dest, "runs", "a", "model.ckpt-2.h5"), written["runs/a/model.ckpt-2"])


def test_checkpoints_still_being_written_are_skipped_and_listed(tmp_path: Any) -> None:
    _runs(str(tmp_path), {"a": [1, 2, 3]})
    run = tmp_path / "runs" / "a"
    data2 = (run / "model.ckpt-2.data-00000-of-00001").read_bytes()
    os.remove(run / "model.ckpt-2.data-00000-of-00001")  # the index is there, its data not yet
    os.remove(run / "model.ckpt-3.index")  # the data is there, the index not yet
    os.makedirs(run / "model.ckpt-4_temp")  # TensorFlow's sharded save under way: its parts, merged when all are written
    (run / "model.ckpt-4_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x" * 10)
    dest = str(tmp_path / "out")
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "-j", "1")
    assert rc == 0, err
    assert "archived 1, skipped 0 up to date, 3 incomplete, 0 failed" in err, err
    listed = [ln for ln in err.splitlines() if ln.startswith("incomplete, skipped: ")]
    assert len(listed) == 3 and any("model.ckpt-2" in ln and "data shards" in ln for ln in listed), listed
    assert any("model.ckpt-3" in ln and ".index" in ln for ln in listed) and any("_temp" in ln for ln in listed), listed
    entries = _manifest(dest)
    assert entries["runs/a/model.ckpt-2.h5"]["status"] == "incomplete"
    assert sorted(os.listdir(os.path.join(dest, "runs", "a"))) == ["model.ckpt-1.h5"]
    (run / "model.ckpt-2.data-00000-of-00001").write_bytes(data2)  # the save finished
    rc, _, err = in_process("archive", str(tmp_path / "runs"), dest, "-j", "1")
    assert rc == 0 and "archived 1, skipped 1 up to date, 2 incomplete" in err, err
    _assert_same(os.path.join(dest, "runs", "a", "model.ckpt-2.h5"), _tensors(2))


def test_globs_single_checkpoints_and_formats(tmp_path: Any) -> None:
    _runs(str(tmp_path), {"a": [1, 2], "b": [3]})
    dest = str(tmp_path / "out")
    rc, _, err = in_process("archive", str(tmp_path / "runs" / "*" / "model.ckpt-[12].index"), dest, "-j", "1", "--format", "npz")
    assert rc == 0 and "archived 2" in err, err
    assert sorted(_manifest(dest)) == ["a/model.ckpt-1.npz", "a/model.ckpt-2.npz"]
    rc, _, err = in_process("archive", str(tmp_path / "runs" / "b" / "model.ckpt-3"), dest, "-j", "1", "--format", "safetensors")
    assert rc == 0, err
    _assert_same(os.path.join(dest, "model.ckpt-3.safetensors"), _tensors(3))


def test_bad_arguments_exit_2(tmp_path: Any) -> None:
    _runs(str(tmp_path), {"a": [1]})
    dest = str(tmp_path / "out")
    r = cli("archive", dest)
    assert r.returncode == 2 and r.stderr.strip().endswith("error: the following arguments are required: DEST"), r.stderr
    error_line(in_process("archive", str(tmp_path / "nothing"), dest)[::2], "no checkpoint at")
    error_line(in_process("archive", str(tmp_path / "runs"), dest, "--jobs", "0")[::2], "--jobs")
    (tmp_path / "file").write_text("x")
    error_line(in_process("archive", str(tmp_path / "runs"), str(tmp_path / "file"))[::2], "is a file")
    assert not os.path.exists(dest)
    with pytest.raises(ckptbridge.FormatError, match="jobs"):
        ckptbridge.Workers(jobs=0)
    with pytest.raises(ckptbridge.FormatError, match="format"):
        ckptbridge.archive(str(tmp_path / "runs"), dest, format="zip")


def test_dask_without_the_extra_names_it(tmp_path: Any) -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("distributed is installed here")
    _runs(str(tmp_path), {"a": [1]})
    error_line(in_process("archive", str(tmp_path / "runs"), str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9")[::2],
               "ckptbridge[dask]")


def _dies_on_step_2(task: Any) -> dict[str, Any]:
    """run_task, except that the worker exporting step 2 dies as the OOM killer's victim does (SIGKILL)."""
    from ckptbridge import _archive

    if task.rel.endswith("model.ckpt-2.h5"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _archive._real_run_task(task)  # type: ignore[attr-defined, no-any-return]


def test_a_worker_that_dies_fails_its_checkpoint_and_the_others_go_on(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptbridge import _archive

    written = _runs(str(tmp_path), {"a": [1, 2, 3, 4, 5]})
    monkeypatch.setattr(_archive, "_start_method", lambda: "fork")  # the workers inherit the patched task
    monkeypatch.setattr(_archive, "_real_run_task", _archive.run_task, raising=False)
    monkeypatch.setattr(_archive, "run_task", _dies_on_step_2)
    dest = str(tmp_path / "out")
    report = ckptbridge.archive(str(tmp_path / "runs"), dest, workers=ckptbridge.Workers(jobs=2))
    assert [e.source for e in report.failed] == [str(tmp_path / "runs" / "a" / "model.ckpt-2")]
    assert "worker process exporting it died" in (report.failed[0].error or "")
    assert sorted(e.rel for e in report.done) == [f"runs/a/model.ckpt-{s}.h5" for s in (1, 3, 4, 5)]
    for s in (1, 3, 4, 5):
        _assert_same(os.path.join(dest, "runs", "a", f"model.ckpt-{s}.h5"), written[f"runs/a/model.ckpt-{s}"])
    assert _manifest(dest)["runs/a/model.ckpt-2.h5"]["status"] == "failed" and leftovers(dest) == []


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigterm_with_two_jobs_leaves_no_temporaries_and_a_rerun_completes(tmp_path: Any) -> None:
    big = {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(6)}  # 24 MiB a checkpoint: a few are under way when it stops
    for s in range(8):
        write_checkpoint(str(tmp_path / "runs" / "a" / f"model.ckpt-{s}"), big)
    dest = str(tmp_path / "out")
    proc = popen("archive", str(tmp_path / "runs"), dest, "--jobs", "2", env=CLI_ENV)
    try:
        # midway: one checkpoint done, and an export under way (its temporary beside its output)
        _wait_for(lambda: os.path.exists(os.path.join(dest, MANIFEST)) and any(
            e.get("status") == "done" for e in _manifest(dest).values()) and leftovers(dest) != [], 120, "a checkpoint done, one under way")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated by SIGTERM" in err.strip().splitlines()[-1], err
    assert leftovers(dest) == []
    done = {rel for rel, e in _manifest(dest).items() if e["status"] == "done"}
    assert 0 < len(done) < 8, done
    for rel in done:  # every output the manifest calls done is whole
        got = ckptbridge.load(os.path.join(dest, rel))
        assert sorted(got) == sorted(big) and all(same(got[k], big[k]) for k in big)
    r = cli("archive", str(tmp_path / "runs"), dest, "--jobs", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipped {len(done)} up to date" in r.stderr, r.stderr
    assert {rel for rel, e in _manifest(dest).items() if e["status"] == "done"} == {f"runs/a/model.ckpt-{s}.h5" for s in range(8)}
    assert leftovers(dest) == []


# --------------------------------------------------------------------------- TensorFlow's files at S3, on a Dask cluster


def _dask(*args: str, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    """``dask ARGS``, its log in a file: a pipe nobody reads would fill and stop it."""
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    with open(log, "wb") as f:
        return subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=f, env=env)


@pytest.fixture()
def dask_cluster(moto_s3: Any, tmp_path: Any) -> Iterator[str]:
    """``dask scheduler`` and one ``dask worker`` (one thread) on 127.0.0.1, seeing the S3 server through the AWS variables."""
    pytest.importorskip("distributed")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONWARNINGS="ignore")
    info = str(tmp_path / "scheduler.json")
    scheduler = _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", info, env=env,
                      log=str(tmp_path / "scheduler.log"))
    worker = None
    try:
        _wait_for(lambda: os.path.exists(info) and os.path.getsize(info) > 0, 60, "the scheduler")
        with open(info, encoding="utf-8") as f:
            address = json.load(f)["address"]
        worker = _dask("worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                       "--memory-limit", "0", "--local-directory", str(tmp_path / "worker"), env=env,
                       log=str(tmp_path / "worker.log"))  # its scratch space goes with tmp_path, not into /tmp
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for p in (worker, scheduler):
            if p is not None:
                p.send_signal(signal.SIGTERM)
        for p in (worker, scheduler):
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.mark.tf
def test_s3_runs_on_a_dask_cluster_are_bit_exact_with_tensorflow(moto_s3: Any, dask_cluster: str, ckpts: Any, assert_same_as_tf: Any,
                                                                  tmp_path: Any) -> None:
    _tf_checkpoint = test_remote._tf_checkpoint
    _, fs = moto_s3
    local = tmp_path / "runs"
    good = {
        "runs/a/model.ckpt-1": _tf_checkpoint(str(local / "a" / "model.ckpt-1"), "v2"),
        "runs/a/model.ckpt-2": _tf_checkpoint(str(local / "a" / "model.ckpt-2"), "v2"),
        "runs/b/model.ckpt-1": _tf_checkpoint(str(local / "b" / "model.ckpt-1"), "v1"),  # the model zoo's one table file
    }
    os.makedirs(local / "d")
    good["runs/d/sharded.ckpt"] = ckpts.build_sharded(str(local / "d"))  # three data shards
    bad = _tf_checkpoint(str(local / "c" / "model.ckpt-7"), "v2")
    flip(bad + ".data-00000-of-00001", 20)
    for run in ("a", "b", "c", "d"):
        _upload(fs, str(local / run), f"ckpts/runs/{run}")
    fs.put_file(good["runs/a/model.ckpt-2"] + ".index", "ckpts/runs/e/model.ckpt-9.index")  # its data still uploading
    fs.invalidate_cache()
    dest = "s3://ckpts/archive"
    rc, _, err = in_process("archive", "s3://ckpts/runs/", dest + "/", "--scheduler", dask_cluster, "-q")
    assert rc == 1, err
    failed = [ln for ln in err.splitlines() if ln.startswith("ckptbridge: failed: ")]
    assert len(failed) == 1 and "s3://ckpts/runs/c/model.ckpt-7" in failed[0], err
    assert "archived 4, skipped 0 up to date, 1 incomplete, 1 failed" in err, err
    fs.invalidate_cache()
    objects = {k: (v["ETag"], v["LastModified"]) for k, v in fs.find("ckpts/archive", detail=True).items()
               if not k.endswith(MANIFEST)}
    assert sorted(objects) == sorted(f"ckpts/archive/{rel}.h5" for rel in good)  # the corrupt one has none, nor any temporary
    for rel, prefix in good.items():
        local_copy = str(tmp_path / "got" / (rel.replace("/", "-") + ".h5"))
        os.makedirs(os.path.dirname(local_copy), exist_ok=True)
        fs.get_file(f"ckpts/archive/{rel}.h5", local_copy)
        with ckptbridge.read(local_copy) as r:
            assert assert_same_as_tf(r, prefix) > 0
    entries = {e["rel"]: e for e in map(json.loads, fs.cat_file(f"ckpts/archive/{MANIFEST}").decode().splitlines())}
    assert entries["runs/c/model.ckpt-7.h5"]["status"] == "failed" and "model.ckpt-7" in entries["runs/c/model.ckpt-7.h5"]["error"]
    assert entries["runs/e/model.ckpt-9.h5"]["status"] == "incomplete" and entries["runs/e/model.ckpt-9.h5"]["source"] == (
        "s3://ckpts/runs/e/model.ckpt-9")
    for rel in good:
        e = entries[rel + ".h5"]
        assert e["status"] == "done" and e["output_identity"][1] == objects[f"ckpts/archive/{rel}.h5"][0].strip('"')
        etags = [ident[1] for ident in e["source_files"].values()]
        assert all(len(t) == 32 for t in etags), etags  # each source file's S3 ETag (an MD5) is its identity
    rc, _, err = in_process("archive", "s3://ckpts/runs/", dest, "--scheduler", dask_cluster, "-q")
    assert rc == 1 and "archived 0, skipped 4 up to date, 1 incomplete, 1 failed" in err, err
    fs.invalidate_cache()
    again = {k: (v["ETag"], v["LastModified"]) for k, v in fs.find("ckpts/archive", detail=True).items() if not k.endswith(MANIFEST)}
    assert again == objects  # the same objects: nothing that was done was done again


@pytest.mark.tf
def test_a_directory_of_every_kind_with_two_jobs_is_bit_exact_with_tensorflow(ckpts: Any, assert_same_as_tf: Any, tmp_path: Any) -> None:
    import test_savedmodel

    root = tmp_path / "runs"
    prefixes = {
        "runs/slim/model.ckpt-1": test_remote._tf_checkpoint(str(root / "slim" / "model.ckpt-1"), "v2"),
        "runs/slim/model.ckpt-2": test_remote._tf_checkpoint(str(root / "slim" / "model.ckpt-2"), "v2"),
        "runs/zoo/vgg_16.ckpt": test_remote._tf_checkpoint(str(root / "zoo" / "vgg_16.ckpt"), "v1"),
    }
    tf2 = ckpts.build_tf2(str(root / "keras"))
    prefixes["runs/keras/tf2/" + os.path.basename(tf2)] = tf2
    test_savedmodel.build_module_savedmodel(str(root / "models" / "affine"), seed=3)
    prefixes["runs/models/affine"] = str(root / "models" / "affine" / "variables" / "variables")
    dest = str(tmp_path / "out")
    r = cli("archive", str(root), dest, "--jobs", "2", "--names", "keys", env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"archived {len(prefixes)}, skipped 0 up to date, 0 incomplete, 0 failed" in r.stderr, r.stderr
    assert sorted(_manifest(dest)) == sorted(rel + ".h5" for rel in prefixes)  # the SavedModel once, as its directory
    for rel, prefix in prefixes.items():
        with ckptbridge.read(os.path.join(dest, rel + ".h5")) as got:
            assert assert_same_as_tf(got, prefix) > 0, rel


@pytest.mark.tf  # moto and s3fs live in the TensorFlow venv only
def test_a_glob_at_s3_archives_what_it_matches(moto_s3: Any, tmp_path: Any) -> None:
    _, fs = moto_s3
    written = _runs(str(tmp_path), {"a": [1000, 1500, 2000], "b": [1000]})
    for run in ("a", "b"):
        _upload(fs, str(tmp_path / "runs" / run), f"ckpts/globbed/runs/{run}")
    dest = str(tmp_path / "out")
    rc, _, err = in_process("archive", "s3://ckpts/globbed/runs/*/model.ckpt-*000.index", dest, "-j", "1")
    assert rc == 0 and "archived 3, skipped 0 up to date" in err, err
    entries = _manifest(dest)
    assert sorted(entries) == ["a/model.ckpt-1000.h5", "a/model.ckpt-2000.h5", "b/model.ckpt-1000.h5"]
    assert entries["a/model.ckpt-2000.h5"]["source"] == "s3://ckpts/globbed/runs/a/model.ckpt-2000"
    for rel in entries:
        _assert_same(os.path.join(dest, rel), written["runs/" + rel[: -len(".h5")]])
