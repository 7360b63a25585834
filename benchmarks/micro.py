"""Micro-measurements behind the export pipe's design, on one file in the page cache.

    python benchmarks/micro.py [FILE]     (default: the vgg_16 + slots + EMA data file in benchmarks/work)

Prints seconds for: copy_file_range of the whole file (what cp and ckptbridge do),
pwrite of its mapped views (what a Python writer does), and one pass of each
checksum over the mapped file (crc32c, zlib's CRC-32, ISA-L's CRC-32).  Each is
the best of 3, with the output removed and synced in between.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
import zlib

import crc32c

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "work", "ckpt", "vgg_16_train", "model.ckpt.data-00000-of-00001")
BLOCK = 16 << 20


def best(fn, *args) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(3):
        os.sync()
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def copy(src: str, dst: str, kernel: bool) -> None:
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        n = os.fstat(fi).st_size
        m = mmap.mmap(fi, 0, access=mmap.ACCESS_READ) if n else None
        pos = 0
        while pos < n:
            k = min(BLOCK, n - pos)
            done = 0
            while done < k:
                if kernel:
                    done += os.copy_file_range(fi, fo, k - done, pos + done, pos + done)
                else:
                    assert m is not None
                    done += os.pwrite(fo, memoryview(m)[pos + done:pos + k], pos + done)
            pos += k
    finally:
        os.close(fi)
        os.close(fo)
        os.unlink(dst)


def checksum(src: str, fn) -> None:  # type: ignore[no-untyped-def]
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        c = 0
        for pos in range(0, len(m), BLOCK):
            c = fn(view[pos:pos + BLOCK], c)
        view.release()


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    dst = os.path.join(os.path.dirname(os.path.abspath(src)), ".micro-copy")
    size = os.path.getsize(src)
    with open(src, "rb") as f:  # into the page cache
        while f.read(BLOCK):
            pass
    rows = [("copy_file_range", best(copy, src, dst, True)), ("pwrite of mapped views", best(copy, src, dst, False)),
            ("crc32c", best(checksum, src, lambda v, c: crc32c.crc32c(v, c))), ("zlib.crc32", best(checksum, src, zlib.crc32))]
    try:
        from isal.isal_zlib import crc32 as isal_crc32

        rows.append(("isal crc32", best(checksum, src, isal_crc32)))
    except ImportError:
        rows.append(("isal crc32", float("nan")))
    print(f"{src}: {size / 1e9:.2f} GB")
    for name, s in rows:
        print(f"{name:<24} {s:6.2f} s  {size / 1e9 / s:6.2f} GB/s")


if __name__ == "__main__":
    main()
