"""The names of a TensorFlow checkpoint's files, in one place.

A V2 checkpoint at ``PREFIX`` is ``PREFIX.index`` (the table of entries) and
``PREFIX.data-NNNNN-of-MMMMM`` (shard N of M, both five digits), often with
``PREFIX.meta`` (the graph a ``Saver`` exports).  A V1 checkpoint is the one file
``PREFIX`` (or ``PREFIX-NNNNN-of-MMMMM`` when sharded).  The directory's
``checkpoint`` state file names the latest prefix (read and written by ``_state``).

A leaf: it imports nothing from ckptbridge.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable

INDEX = ".index"
META = ".meta"
#: the directory's state file (``tf.train.latest_checkpoint``)
STATE_NAME = "checkpoint"

#: a glob pattern (after ``glob.escape(prefix)``) for a V2 checkpoint's data shards
DATA_GLOB = ".data-?????-of-?????"
#: a glob pattern for a sharded V1 checkpoint's files
V1_SHARD_GLOB = "-?????-of-?????"
#: the regular expression of a data shard's suffix (``.data-00002-of-00003``); its group is the shard count
DATA_SUFFIX = r"\.data-\d{5}-of-(\d{5})"
#: a data shard's name at the end of a path; group 1 is the shard count
DATA_RE = re.compile(DATA_SUFFIX + "$")
#: a sharded V1 checkpoint's file at the end of a path (``model.ckpt-00001-of-00003``); groups: the shard, the count
V1_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})$")
#: the pattern a sharded V1 checkpoint's ``Saver.save`` returns, and its state file names
#: (``model.ckpt-?????-of-00003``), at the end of a path
V1_PATTERN_RE = re.compile(r"-\?{5}-of-\d{5}$")


def index_path(prefix: str) -> str:
    return prefix + INDEX


def meta_path(prefix: str) -> str:
    return prefix + META


def data_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def v1_shard_path(prefix: str, shard: int, num_shards: int) -> str:
    """Shard ``shard`` of a V1 checkpoint of ``num_shards`` files at ``prefix``."""
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}"


def v1_pattern(prefix: str, num_shards: int) -> str:
    """The pattern that names every shard of a sharded V1 checkpoint (what its ``Saver.save`` returns);
    ``prefix`` as given (``glob.escape`` it first for a reader that globs)."""
    return f"{prefix}-?????-of-{num_shards:05d}"


def v1_shard_count(path: str) -> int | None:
    """The shard count a V1 shard's name ends with; None for a name that is not one."""
    m = V1_SHARD_RE.search(path)
    return int(m.group(2)) if m else None


def v1_shard_base(path: str) -> str | None:
    """The prefix of the sharded V1 checkpoint a shard's name belongs to; None for a name that is not a shard's."""
    m = V1_SHARD_RE.search(path)
    return path[: m.start()] if m else None


def is_v1_shard_of(name: str, prefix: str) -> bool:
    """Whether ``name`` is a shard's name of the sharded V1 checkpoint at ``prefix``."""
    return name.startswith(prefix) and V1_SHARD_RE.fullmatch(name[len(prefix):]) is not None


def state_path(directory: str) -> str:
    return os.path.join(directory, STATE_NAME)


def is_index(path: str) -> bool:
    return path.endswith(INDEX)


def data_shards(prefix: str) -> list[str]:
    """The data shards at ``prefix`` that exist (dangling symlinks included), sorted."""
    return sorted(glob.glob(glob.escape(prefix) + DATA_GLOB))


def v1_shards(prefix: str) -> list[str]:
    """The files of a sharded V1 checkpoint at ``prefix`` that exist (dangling symlinks included), sorted."""
    return sorted(p for p in glob.glob(glob.escape(prefix) + V1_SHARD_GLOB) if V1_SHARD_RE.search(p))  # digits where the glob has ?


def v1_pattern_prefix(path: str) -> str | None:
    """The prefix of a sharded V1 checkpoint that ``path``, its shards' pattern, names; None for any other path."""
    m = V1_PATTERN_RE.search(path)
    return path[: m.start()] if m else None


def version_of(prefix: str) -> str:
    """"v2" when ``prefix.index`` exists (a V2 checkpoint), else "v1" (one table file, or its shards)."""
    return "v2" if os.path.isfile(index_path(prefix)) else "v1"


def prefix_of(path: str) -> str:
    """The checkpoint prefix a file of it names (``.index``, ``.meta``, a ``.data`` shard); other paths unchanged.

    ``.index`` and ``.meta`` are stripped only from files that exist, so a prefix that
    itself ends in ``.meta`` stays whole.
    """
    for suffix in (INDEX, META):
        if path.endswith(suffix) and os.path.isfile(path):
            path = path[: -len(suffix)]
    m = DATA_RE.search(path)
    return path[: m.start()] if m else path


def complete_v2(prefix: str) -> bool:
    """True when the prefix has an index and every data shard it implies."""
    if not os.path.isfile(index_path(prefix)):
        return False
    shards = data_shards(prefix)
    if not shards:
        return False
    m = DATA_RE.search(shards[0])
    return m is not None and len(shards) == int(m.group(1))


def checkpoint_files(prefix: str) -> list[str]:
    """The files that make up the checkpoint at ``prefix`` (index, meta, a V1 file, data shards)."""
    found = [p for p in (index_path(prefix), meta_path(prefix), prefix) if os.path.isfile(p)]
    return found + data_shards(prefix)


def taken_names(prefix: str) -> list[str]:
    """Every name of a checkpoint at ``prefix`` that something occupies: a file, a FIFO, a dangling symlink."""
    found = [p for p in (index_path(prefix), meta_path(prefix)) if os.path.lexists(p)]
    if os.path.lexists(prefix) and not (os.path.isdir(prefix) and not os.path.islink(prefix)):
        found.append(prefix)
    return found + data_shards(prefix)  # glob lists dangling symlinks too


def strip_file_suffix(name: str) -> str:
    """The prefix a checkpoint file's name implies (``.index``, ``.meta``, a ``.data`` shard stripped), by name alone."""
    for suffix in (INDEX, META):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    m = DATA_RE.search(name)
    return name[: m.start()] if m else name


def checkpoints_among(names: list[str], is_table: Callable[[str], bool]) -> list[tuple[str, str]]:
    """The checkpoints a list of file names holds, as sorted (prefix, version) pairs.

    A V2 checkpoint is a ``.index`` with at least one data shard beside it; a
    V1 checkpoint is any other file for which ``is_table(name)`` holds (it ends
    with the table magic number), a sharded one named by its prefix.  For the
    files of an archive or a directory listing, where there are no paths to glob."""
    have = set(names)
    found: dict[str, str] = {}
    v2_files = set()
    for n in names:
        if n.endswith(INDEX):
            prefix = n[: -len(INDEX)]
            shards = [m for m in names if m.startswith(prefix + ".data-") and DATA_RE.search(m)]
            if shards:
                found[prefix] = "v2"
                v2_files.update([n, *shards])
                if prefix + META in have:
                    v2_files.add(prefix + META)
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if n in v2_files or n.endswith((INDEX, META)) or DATA_RE.search(n) or base == STATE_NAME or base.startswith("."):
            continue
        if is_table(n):
            sharded = v1_shard_base(n)
            found.setdefault(n if sharded is None else sharded, "v1")
    return sorted(found.items())
