"""Finding a V1 checkpoint's files: the one file, or every shard of a sharded one, checked complete.

A V1 checkpoint at ``PREFIX`` is the file ``PREFIX``, or the shards
``PREFIX-SSSSS-of-NNNNN`` of one (the names are :mod:`ckptbridge.io.ckptfiles`'s).
The same rules hold for a local path and for a name inside a
:class:`~ckptbridge.io.ranged.Place` (a tar or zip of checkpoints, a remote
prefix), where the shards are found by listing the checkpoint's directory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from ..errors import CorruptError, NotFoundError
from ..io import ckptfiles as _ckptfiles
from ..io.ranged import Place, where

#: the most shards a V1 checkpoint may claim
MAX_FILES = 1 << 16


def v1_files(prefix: str, place: Place | None = None) -> list[str]:
    """The files of the V1 checkpoint at ``prefix``: the file itself, or every shard of a sharded one
    (``prefix`` may also name one of the shards).  NotFoundError / CorruptError when none or some are missing.

    With ``place``, ``prefix`` and the files returned are names inside it; a place that cannot
    list (plain https) reads single-file V1 checkpoints only."""
    exists: Callable[[str], bool]
    label: Callable[[str], str]
    if place is None:
        exists, label = os.path.isfile, str

        def shards(base: str) -> tuple[list[str], Callable[[str], bool]]:
            return _ckptfiles.v1_shards(base), os.path.isfile
    else:
        exists, label = place.exists, functools.partial(where, place)

        def shards(base: str) -> tuple[list[str], Callable[[str], bool]]:
            head, _, tail = base.rpartition("/")
            directory = base[: len(base) - len(tail)]
            found = sorted(directory + n for n in place.listdir(head) or [] if _ckptfiles.is_v1_shard_of(n, tail))
            return found, set(found).__contains__

    is_file = exists(prefix)
    sharded = _ckptfiles.v1_shard_base(prefix)
    if is_file and sharded is None:
        return [prefix]
    base = sharded if sharded is not None and is_file else prefix
    found, present = shards(base)
    if not found:
        raise NotFoundError(f"no checkpoint at {label(prefix)}: no such file, and no shards {label(base)}-NNNNN-of-NNNNN; check the path")
    counts = {n for n in map(_ckptfiles.v1_shard_count, found) if n is not None}
    if len(counts) != 1:
        raise CorruptError(f"the V1 checkpoint {label(base)} has shards of different counts ({sorted(counts)}); "
                           "remove the files of the other checkpoint, or name one shard file")
    total = counts.pop()
    if not 1 <= total <= MAX_FILES:
        raise CorruptError(f"the V1 checkpoint {label(base)} claims {total} shards")
    want = [_ckptfiles.v1_shard_path(base, i, total) for i in range(total)]
    missing = [p for p in want if not present(p)]
    if missing:
        raise CorruptError(f"shard {label(missing[0])} of the V1 checkpoint {label(base)} is missing ({len(missing)} of {total}); "
                           "the checkpoint is incomplete; copy all its shard files")
    return want
