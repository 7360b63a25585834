"""Archives from strangers (issue #8): crafted .npz / HDF5 files are refused, safely.

Every malicious archive is built here, in the test, next to a "secret" file
whose bytes must never leave it.  Each is fed to the real command line
(``python -m ckptbridge import/ls/diff/verify``) in a subprocess whose address
space is capped (RLIMIT_AS), so a refusal that came only after a large
allocation would show up as "out of memory" instead of the expected message.
Each case asserts: exit status 2, one ``ckptbridge: error:`` line naming the
dataset/member and what it points to, the secret's bytes nowhere in any
output, and nothing written.  The writing side (symlinked outputs, umask,
temporary names) is tested at the end.  No TensorFlow needed.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zipfile

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

import ckptbridge  # noqa: E402
from ckptbridge.errors import CorruptError, FormatError, UnsafeArchiveError  # noqa: E402

from helpers import SECRET, TMP_SUFFIX, assert_refused, leftovers, npy_header, run_cli, tree, write_zip  # noqa: E402

# --- HDF5: data from outside the file ------------------------------------------------


def test_hdf5_external_raw_storage_refused(tmp_path, secret, good_npz):
    p = str(tmp_path / "ext.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("conv/w", shape=(4096,), dtype="u1", external=[(secret, 0, 4096)])
    # The trap is real: plain h5py copies the secret out.
    with h5py.File(p, "r") as f:
        assert SECRET in f["conv/w"][()].tobytes()
    assert_refused(p, ["'conv/w'", "external file", secret], good_npz)
    with pytest.raises(UnsafeArchiveError):
        ckptbridge.read(p)


def test_hdf5_external_storage_in_our_own_object_graph_refused(tmp_path, secret, good_npz):
    """ckptbridge's own datasets (.ckptbridge/object_graph would be carried into the
    checkpoint) are checked like tensors, not read first."""
    p = str(tmp_path / "og.h5")
    with h5py.File(p, "w") as f:
        f["w"] = np.arange(3.0)
        f.create_dataset(".ckptbridge/object_graph", shape=(4096,), dtype="u1", external=[(secret, 0, 4096)])
    assert_refused(p, ["'.ckptbridge/object_graph'", secret], good_npz, commands=("import", "ls"))


def test_hdf5_external_link_refused(tmp_path, secret, good_npz):
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = np.frombuffer(open(secret, "rb").read(), dtype=np.uint8)
    p = str(tmp_path / "elink.h5")
    with h5py.File(p, "w") as f:
        f["fc/w"] = h5py.ExternalLink(other, "/x")
    with h5py.File(p, "r") as f:  # plain h5py follows it
        assert SECRET in f["fc/w"][()].tobytes()
    assert_refused(p, ["'fc/w'", "external link", other], good_npz)


def test_hdf5_external_link_in_metadata_group_refused(tmp_path, secret, good_npz):
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = np.frombuffer(open(secret, "rb").read(), dtype=np.uint8)
    p = str(tmp_path / "melink.h5")
    with h5py.File(p, "w") as f:
        f["w"] = np.arange(3.0)
        f.create_group(".ckptbridge")["object_graph"] = h5py.ExternalLink(other, "/x")
    assert_refused(p, ["'.ckptbridge/object_graph'", other], good_npz, commands=("import", "ls"))


def test_hdf5_virtual_dataset_refused(tmp_path, secret, good_npz):
    src = str(tmp_path / "src.h5")
    with h5py.File(src, "w") as f:
        f["x"] = np.frombuffer(open(secret, "rb").read(), dtype=np.uint8)
    layout = h5py.VirtualLayout(shape=(4096,), dtype="u1")
    layout[:] = h5py.VirtualSource(src, "x", shape=(4096,))
    p = str(tmp_path / "vds.h5")
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("w", layout)
    with h5py.File(p, "r") as f:
        assert SECRET in f["w"][()].tobytes()
    assert_refused(p, ["'w'", "virtual dataset", src], good_npz)


def test_hdf5_unknown_filter_refused(tmp_path, good_npz):
    p = str(tmp_path / "filt.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.arange(100.0), chunks=(10,), compression=32004, allow_unknown_filter=True)
    assert_refused(p, ["'w'", "id 32004"], good_npz, commands=("import", "ls"))


# --- HDF5: links inside the file ------------------------------------------------------


def test_hdf5_soft_link_within_file_allowed_and_listed_once(tmp_path):
    p = str(tmp_path / "soft.h5")
    with h5py.File(p, "w") as f:
        f["g/a"] = np.arange(4.0)
        f["g/alias"] = h5py.SoftLink("a")          # relative
        f["b"] = h5py.SoftLink("/g/a")             # absolute
        f["h"] = h5py.SoftLink("/g")               # to a group
    with ckptbridge.read(p) as r:
        assert list(r) == ["g/a"]
        assert r["g/a"].tobytes() == np.arange(4.0).tobytes()


@pytest.mark.parametrize("case", ["dangling", "loop", "through_external"])
def test_hdf5_bad_soft_links_refused(tmp_path, good_npz, case):
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3.0)
    p = str(tmp_path / f"{case}.h5")
    with h5py.File(p, "w") as f:
        f["a"] = np.arange(3.0)
        if case == "dangling":
            f["s"] = h5py.SoftLink("/nowhere")
            needles = ["'s'", "'/nowhere'", "dangling"]
        elif case == "loop":
            f["s"] = h5py.SoftLink("/t")
            f["t"] = h5py.SoftLink("/s")
            needles = ["'/t'", "loop"]
        else:
            f["e"] = h5py.ExternalLink(other, "/")
            f["s"] = h5py.SoftLink("/e/x")
            needles = ["external link", other]
    assert_refused(p, needles, good_npz, commands=("import", "ls"))


@pytest.mark.parametrize("what", ["dataset", "group_cycle"])
def test_hdf5_hard_links_refused(tmp_path, good_npz, what):
    p = str(tmp_path / f"hard_{what}.h5")
    with h5py.File(p, "w") as f:
        g = f.create_group("g")
        g["a"] = np.arange(3.0)
        if what == "dataset":
            f["b"] = g["a"]
            needles = ["'g/a'", "hard link"]
        else:
            g["loop"] = g
            needles = ["'g/loop'", "hard link", "'g'"]
    assert_refused(p, needles, good_npz, commands=("import", "ls"))


# --- HDF5: sizes ------------------------------------------------------------------


def _patch_once(path: str, old: bytes, new: bytes) -> None:
    raw = open(path, "rb").read()
    assert raw.count(old) == 1, raw.count(old)
    open(path, "wb").write(raw.replace(old, new))


def test_hdf5_contiguous_dataset_lying_about_its_storage_refused(tmp_path, good_npz):
    p = str(tmp_path / "lie.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.arange(100 * 100, dtype="f8").reshape(100, 100))
        off = f["w"].id.get_offset()
    # Layout message (version 3, contiguous): address, then size.  Claim 1000x the bytes.
    _patch_once(p, b"\x03\x01" + struct.pack("<QQ", off, 80000), b"\x03\x01" + struct.pack("<QQ", off, 80_000_000))
    assert_refused(p, ["'w'", "80000000", "damaged or crafted"], good_npz)


def test_hdf5_fill_value_memory_bomb_refused(tmp_path, good_npz):
    """A 2 KB file declaring a 32 GiB chunked dataset that was never written (fill value)."""
    p = str(tmp_path / "bomb.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("w", shape=(1 << 16, 1 << 16), dtype="f8", chunks=(256, 256), compression="gzip")
    assert os.path.getsize(p) < 1 << 16
    assert_refused(p, ["'w'", str(1 << 35), "memory bomb"], good_npz)


def test_hdf5_gzip_within_real_ratio_is_read(tmp_path):
    """The expansion bound does not reject a genuine, highly compressible tensor."""
    p = str(tmp_path / "zeros.h5")
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.zeros((2048, 2048), np.float32), chunks=(256, 256), compression="gzip")
    with ckptbridge.read(p) as r:
        assert r["w"].tobytes() == np.zeros((2048, 2048), np.float32).tobytes()


def test_hdf5_max_tensor_gb_on_every_reading_command(tmp_path, good_npz):
    p = str(tmp_path / "big.h5")
    with h5py.File(p, "w") as f:
        f["w"] = np.zeros(1 << 18, np.float32)  # 1 MiB
    for argv in (["ls", p], ["verify", p], ["diff", good_npz, p], ["import", p, str(tmp_path / "o" / "m.ckpt")]):
        r = run_cli(*argv, "--max-tensor-gb", "0.0005", cwd=str(tmp_path))
        assert r.returncode == 2 and b"over the limit" in r.stderr and b"--max-tensor-gb" in r.stderr, (argv, r.stderr)
    assert run_cli("ls", p, cwd=str(tmp_path)).returncode == 0
    assert not os.path.exists(tmp_path / "o")


def test_hdf5_reference_dataset_is_not_a_tensor(tmp_path, good_npz):
    p = str(tmp_path / "ref.h5")
    with h5py.File(p, "w") as f:
        f["a"] = np.arange(3.0)
        f.create_dataset("r", data=[f["a"].ref], dtype=h5py.ref_dtype)
    assert_refused(p, ["'r'", "references"], good_npz, commands=("ls",))


# --- .npz --------------------------------------------------------------------------


def test_npz_pickled_member_refused(tmp_path, good_npz):
    p = str(tmp_path / "pickle.npz")
    np.savez(p, w=np.array([{"x": 1}, print], dtype=object))  # np.savez pickles object arrays
    assert_refused(p, ["'w'", "pickled"], good_npz)


def test_npz_header_claiming_more_than_the_member_holds_refused(tmp_path, good_npz):
    """An .npy header claiming 2^40 float64s (8 TiB) in front of 8 bytes."""
    p = str(tmp_path / "lie.npz")
    write_zip(p, {"w.npy": npy_header("<f8", (1 << 40,)) + b"\0" * 8})
    assert_refused(p, ["'w'", "header claims", str(8 << 40)], good_npz)


def test_npz_header_claim_under_limit_but_not_backed_refused_in_memory_cap(tmp_path, good_npz):
    """Claims 16 GiB (under the 64 GB default): the size check, not the limit, refuses it."""
    p = str(tmp_path / "lie16.npz")
    write_zip(p, {"w.npy": npy_header("|u1", (16 << 30,)) + b"\0" * 64}, zipfile.ZIP_DEFLATED)
    assert_refused(p, ["'w'", "header claims"], good_npz)


def test_npz_impossible_deflate_ratio_refused(tmp_path, good_npz):
    """A deflated member whose zip directory claims 3 GiB from a few bytes (patched sizes)."""
    p = str(tmp_path / "bomb.npz")
    n = 3 << 30
    hdr = npy_header("|u1", (n,))
    write_zip(p, {"w.npy": hdr + b"\0" * 1024}, zipfile.ZIP_DEFLATED)
    real = len(hdr) + 1024
    raw = bytearray(open(p, "rb").read())
    # Uncompressed size: local header at 22, central directory entry at 24.
    lh = raw.find(b"PK\x03\x04")
    cd = raw.find(b"PK\x01\x02")
    assert struct.unpack_from("<L", raw, lh + 22)[0] == real == struct.unpack_from("<L", raw, cd + 24)[0]
    struct.pack_into("<L", raw, lh + 22, len(hdr) + n)
    struct.pack_into("<L", raw, cd + 24, len(hdr) + n)
    open(p, "wb").write(bytes(raw))
    assert_refused(p, ["'w.npy'", "compression ratio"], good_npz)


def test_npz_genuine_compressed_zeros_read(tmp_path):
    p = str(tmp_path / "zeros.npz")
    np.savez_compressed(p, w=np.zeros((1024, 1024), np.float32))
    with ckptbridge.read(p) as r:
        assert r["w"].tobytes() == np.zeros((1024, 1024), np.float32).tobytes()


def test_npz_overlapping_members_refused(tmp_path, good_npz):
    """Two directory entries over the same bytes (the overlapping-files zip bomb)."""
    p = str(tmp_path / "overlap.npz")
    write_zip(p, {"a.npy": npy_header("<f4", (4,)) + b"\0" * 16})
    raw = open(p, "rb").read()
    cd = raw.find(b"PK\x01\x02")
    eocd = raw.find(b"PK\x05\x06")
    entry = raw[cd:eocd]
    twin = entry.replace(b"a.npy", b"b.npy")
    tail = bytearray(raw[eocd:])
    struct.pack_into("<HH", tail, 8, 2, 2)                  # entries on disk / total
    struct.pack_into("<L", tail, 12, len(entry) + len(twin))  # directory size
    open(p, "wb").write(raw[:eocd] + twin + bytes(tail))
    with zipfile.ZipFile(p) as z:
        assert [i.filename for i in z.infolist()] == ["a.npy", "b.npy"]
    assert_refused(p, ["'a.npy'", "'b.npy'", "share bytes"], good_npz, commands=("import", "ls"))


def _central_entries(raw: bytes) -> tuple[int, list[bytes], int]:
    """(where the central directory starts, its entries, where the end record starts) of a zip
    without a comment or extra fields, as zipfile's writestr makes it."""
    cd, eocd = raw.find(b"PK\x01\x02"), raw.find(b"PK\x05\x06")
    entries, pos = [], cd
    while pos < eocd:
        n, extra, comment = struct.unpack_from("<HHH", raw, pos + 28)
        end = pos + 46 + n + extra + comment
        entries.append(raw[pos:end])
        pos = end
    return cd, entries, eocd


def _with_directory(raw: bytes, entries: list[bytes]) -> bytes:
    cd, _, eocd = _central_entries(raw)
    tail = bytearray(raw[eocd:])
    struct.pack_into("<HH", tail, 8, len(entries), len(entries))
    struct.pack_into("<L", tail, 12, sum(map(len, entries)))
    return raw[:cd] + b"".join(entries) + bytes(tail)


def test_npz_listed_out_of_file_order_reads(tmp_path):
    """A directory may list members in any order; the overlap check sorts once at the end (an
    insertion per member was quadratic for a directory listed backwards)."""
    p = str(tmp_path / "backwards.npz")
    arrays = {f"t{i:03d}": np.full(3, i, np.float32) for i in range(200)}
    np.savez(p, **arrays)
    raw = open(p, "rb").read()
    _, entries, _ = _central_entries(raw)
    open(p, "wb").write(_with_directory(raw, entries[::-1]))
    with zipfile.ZipFile(p) as z:
        assert z.infolist()[0].filename == "t199.npy"
    with ckptbridge.read(p) as r:
        assert sorted(r) == sorted(arrays)
        for k, v in arrays.items():
            assert r[k].tobytes() == v.tobytes()


def test_npz_overlap_among_members_listed_out_of_order_refused(tmp_path, good_npz):
    p = str(tmp_path / "overlap_backwards.npz")
    write_zip(p, {"a.npy": npy_header("<f4", (4,)) + b"\0" * 16, "c.npy": npy_header("<f4", (2,)) + b"\0" * 8})
    raw = open(p, "rb").read()
    _, (a, c), _ = _central_entries(raw)
    # c first (later in the file), then a and a twin of a over the same bytes: both out of order
    open(p, "wb").write(_with_directory(raw, [c, a, a.replace(b"a.npy", b"b.npy")]))
    assert_refused(p, ["'a.npy'", "'b.npy'", "share bytes"], good_npz, commands=("import", "ls"))


@pytest.mark.parametrize("header", [
    "{'descr': '<f8', 'fortran_order': False, 'shape': " + "(" * 50000 + ")" * 50000 + "}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (" + "9" * 100000 + ",)}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (" + "1," * 100 + ")}",
    "{'descr': '<f8', 'fortran_order': __import__('os').system('false'), 'shape': (1,)}",
    "[" * 200000 + "]" * 200000,
])
def test_npz_hostile_headers_are_corrupt_not_crashes(tmp_path, good_npz, header):
    p = str(tmp_path / "hdr.npz")
    h = header.encode("latin1") + b"\n"
    write_zip(p, {"w.npy": b"\x93NUMPY\x02\x00" + struct.pack("<I", len(h)) + h + b"\0" * 8})
    with pytest.raises(CorruptError):
        ckptbridge.read(p)
    assert_refused(p, ["'w'"], good_npz, commands=("ls",))


def test_npz_malformed_metadata_record_refused(tmp_path, good_npz):
    p = str(tmp_path / "meta.npz")
    doc = {"format": "ckptbridge", "format_version": 1, "tensors": {"w": {"dtype": "float32", "shape": None, "crc32c": 0}}}
    buf = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    np.savez(p, w=np.arange(3, dtype=np.float32), __ckptbridge__=buf)
    assert_refused(p, ["'w'", "invalid shape"], good_npz, commands=("import", "ls"))
    # A record that claims another shape than the stored array: refused at open, so ls never lies.
    doc["tensors"]["w"]["shape"] = [1 << 20]
    np.savez(p, w=np.arange(3, dtype=np.float32), __ckptbridge__=np.frombuffer(json.dumps(doc).encode(), np.uint8))
    assert_refused(p, ["'w'", "metadata says float32[1048576]"], good_npz, commands=("ls",))


# --- names are data -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["evil\x1b[2Jname", "tab\tname", "c1\x9bname"])
def test_control_characters_in_names_refused(tmp_path, good_npz, name):
    p = str(tmp_path / "ctrl.npz")
    np.savez(p, **{name: np.arange(3.0)})
    assert_refused(p, ["control character"], good_npz, commands=("import", "ls"))
    h = str(tmp_path / "ctrl.h5")
    with h5py.File(h, "w") as f:
        f["w"] = np.arange(3.0)
        f["w"].attrs["ckptbridge_name"] = name
    assert_refused(h, ["'w'", "control character"], good_npz, commands=("import", "ls"))


def test_empty_name_refused(tmp_path, good_npz):
    p = str(tmp_path / "empty.npz")
    write_zip(p, {".npy": npy_header("<f4", (1,)) + b"\0" * 4})
    assert_refused(p, ["empty name"], good_npz, commands=("import", "ls"))


PATHLIKE = ["../../escape", "/etc/passwd", "a//b", "./x/./y", "..", "w/../../z"]


def test_path_like_names_become_checkpoint_keys_verbatim(tmp_path):
    """A checkpoint key is just a string: '..', leading '/', empty segments are
    written as they are, and no file appears anywhere but the output."""
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    arrays = {n: np.full((2,), i, np.float32) for i, n in enumerate(PATHLIKE)}
    p = str(work / "names.npz")
    np.savez(p, **arrays)
    before = tree(str(tmp_path))
    r = run_cli("import", "-q", p, str(work / "ck" / "model.ckpt"), cwd=str(work))
    assert r.returncode == 0, r.stderr
    new = tree(str(tmp_path)) - before
    assert all(n.startswith(os.path.join("deep", "work", "ck")) for n in new), new
    with ckptbridge.read(str(work / "ck" / "model.ckpt")) as ck:
        assert sorted(ck) == sorted(PATHLIKE)
        for n, a in arrays.items():
            assert ck[n].tobytes() == a.tobytes()
    # And the same names through HDF5, which escapes them out of the dataset paths.
    h = str(work / "names.h5")
    assert run_cli("export", "-q", str(work / "ck" / "model.ckpt"), h, cwd=str(work)).returncode == 0
    with ckptbridge.read(h) as r2:
        assert sorted(r2) == sorted(PATHLIKE)
    assert tree(str(tmp_path)) - before - new == {os.path.join("deep", "work", "names.h5")}


@pytest.mark.tf
def test_path_like_names_as_tensorflow_reads_them(tmp_path):
    tf = pytest.importorskip("tensorflow")
    p = str(tmp_path / "names.npz")
    np.savez(p, **{n: np.full((2,), i, np.float32) for i, n in enumerate(PATHLIKE)})
    assert run_cli("import", "-q", p, str(tmp_path / "ck" / "model.ckpt"), cwd=str(tmp_path), limit=False).returncode == 0
    reader = tf.train.load_checkpoint(str(tmp_path / "ck" / "model.ckpt"))
    assert sorted(reader.get_variable_to_shape_map()) == sorted(PATHLIKE)
    assert reader.get_tensor("../../escape").tobytes() == np.full((2,), 0, np.float32).tobytes()


# --- no code from data -----------------------------------------------------------------


def test_package_has_no_pickle_or_eval():
    import ckptbridge as pkg

    root = os.path.dirname(pkg.__file__)
    offenders = []
    for d, _, files in os.walk(root):
        for fn in files:
            if fn.endswith(".py"):
                text = open(os.path.join(d, fn), encoding="utf-8").read()
                for bad in ("import pickle", "pickle.load", "allow_pickle=True", "eval(", "exec(", "marshal", "shelve"):
                    for line in text.splitlines():
                        code = line.split("#")[0]
                        if bad in code and "literal_eval(" not in code:
                            offenders.append((fn, line.strip()))
    assert offenders == []


# --- writing ---------------------------------------------------------------------------


@pytest.fixture()
def small_ckpt(tmp_path, good_npz) -> str:
    prefix = str(tmp_path / "src" / "model.ckpt")
    r = run_cli("import", "-q", good_npz, prefix, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    return prefix


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_symlinked_output_is_replaced_not_written_through(tmp_path, small_ckpt, suffix):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / f"out{suffix}"
    out.symlink_to(victim)
    r = run_cli("export", small_ckpt, str(out), cwd=str(tmp_path))
    assert r.returncode == 2 and b"--force" in r.stderr
    assert out.is_symlink() and victim.read_bytes() == b"precious"
    r = run_cli("export", "-q", "--force", small_ckpt, str(out), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and stat.S_ISREG(os.lstat(out).st_mode)
    with ckptbridge.read(str(out)) as a:
        assert a["w"].tobytes() == np.arange(6, dtype=np.float32).tobytes()


def test_symlinked_checkpoint_files_are_replaced(tmp_path, good_npz):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "ck").mkdir()
    for ext in (".index", ".data-00000-of-00001"):
        (tmp_path / "ck" / f"model.ckpt{ext}").symlink_to(victim)
    prefix = str(tmp_path / "ck" / "model.ckpt")
    assert run_cli("import", good_npz, prefix, cwd=str(tmp_path)).returncode == 2
    assert run_cli("import", "-q", "--force", good_npz, prefix, cwd=str(tmp_path)).returncode == 0
    assert victim.read_bytes() == b"precious"
    for ext in (".index", ".data-00000-of-00001"):
        assert not os.path.islink(prefix + ext)
    with ckptbridge.read(prefix) as r:
        assert r["w"].tobytes() == np.arange(6, dtype=np.float32).tobytes()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, small_ckpt, good_npz, umask, mode):
    for suffix in (".npz", ".h5"):
        out = str(tmp_path / f"out{suffix}")
        assert run_cli("export", "-q", small_ckpt, out, cwd=str(tmp_path), umask=umask).returncode == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == mode, suffix
    prefix = str(tmp_path / "ck" / "model.ckpt")
    assert run_cli("import", "-q", good_npz, prefix, cwd=str(tmp_path), umask=umask).returncode == 0
    files = [f for f in os.listdir(tmp_path / "ck")]
    assert any(f.endswith(".index") for f in files)
    for f in files:
        assert stat.S_IMODE(os.stat(tmp_path / "ck" / f).st_mode) == mode, f


def test_temporary_files_are_exclusive_private_and_unpredictable(tmp_path, small_ckpt, monkeypatch):
    """Temporaries are created with O_CREAT|O_EXCL, mode 0600, under random names."""
    seen: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **k):
        if TMP_SUFFIX in os.fspath(path):
            seen.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    for _ in range(2):
        ckptbridge.export(small_ckpt, str(tmp_path / "o.npz"), force=True)
    created = [(p, fl, m) for p, fl, m in seen if fl & os.O_CREAT]
    assert len(created) == 2
    for _, flags, mode in created:
        assert flags & os.O_EXCL and mode == 0o600
    assert created[0][0] != created[1][0]
    assert not [n for n in os.listdir(tmp_path) if TMP_SUFFIX in n]


def test_refused_import_leaves_no_temporaries(tmp_path, secret, good_npz):
    p = str(tmp_path / "ext.h5")
    with h5py.File(p, "w") as f:
        f["ok"] = np.arange(3.0)
        f.create_dataset("w", shape=(4096,), dtype="u1", external=[(secret, 0, 4096)])
    with pytest.raises(UnsafeArchiveError):
        ckptbridge.rebuild(p, str(tmp_path / "out" / "m.ckpt"))
    assert not os.path.exists(tmp_path / "out")
    assert not leftovers(tmp_path)


def test_format_error_types():
    assert issubclass(UnsafeArchiveError, FormatError)


# --- .safetensors ----------------------------------------------------------------------


def _st(path: str, header: dict, data: bytes, hlen: int | None = None) -> str:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if hlen is None else hlen) + h + data)
    return path


_F4 = np.arange(4, dtype="<f4").tobytes()
#: the header record of a float32 tensor of 4 elements, the first 16 bytes of the data
_W4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


def _st_meta(tensors: dict) -> dict:
    return {"ckptbridge": json.dumps({"format": "ckptbridge", "format_version": 1, "tensors": tensors})}


@pytest.mark.parametrize("case,header,hlen,needles", [
    ("header_length_past_the_file", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 1 << 40, ["header too large"]),
    ("offsets_past_the_file", {"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}, None, ["not fully covered"]),
    ("shape_beyond_its_bytes", {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}, None,
     ["invalid shape, data type, or offset"]),
    ("overlapping_ranges", {"a": _W4, "b": _W4}, None, ["invalid offset for tensor"]),
    ("record_shape_none", {"__metadata__": _st_meta({"w": {"dtype": "float32", "shape": None, "crc32c": 1}}), "w": _W4}, None,
     ["'w'", "invalid shape"]),
    ("record_not_a_dict", {"__metadata__": _st_meta({"w": ["x"]}), "w": _W4}, None, ["'w'", "malformed"]),
    ("control_character_name", {"a\x1b[2J": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, ["control character"]),
    ("empty_name", {"": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, ["empty name"]),
])
def test_safetensors_crafted_headers_refused(tmp_path, good_npz, case, header, hlen, needles):
    pytest.importorskip("safetensors")
    p = _st(str(tmp_path / f"{case}.safetensors"), header, _F4, hlen)
    assert_refused(p, needles, good_npz, commands=("import", "ls"))


def test_safetensors_max_tensor_gb(tmp_path, good_npz):
    pytest.importorskip("safetensors")
    p = _st(str(tmp_path / "big.safetensors"), {"w": {"dtype": "U8", "shape": [1 << 20], "data_offsets": [0, 1 << 20]}}, b"\0" * (1 << 20))
    r = run_cli("ls", p, "--max-tensor-gb", "0.0005", cwd=str(tmp_path))
    assert r.returncode == 2 and b"'w'" in r.stderr and b"over the limit" in r.stderr, r.stderr
    assert run_cli("ls", p, cwd=str(tmp_path)).returncode == 0
