"""From a path the user typed to a source or sink: the one format registry.

Archives are chosen by suffix, and an unknown suffix is an error that lists the
accepted ones; anything without an archive suffix is a checkpoint, resolved
to its prefix (a directory's latest complete checkpoint, ``.index``/``.data``/
``.meta`` files, or a V1 single file).
"""

from __future__ import annotations

import glob
import os
import re
import stat
from typing import Any

from . import _state
from ._source import Sink, Source
from .errors import CkptBridgeError, FormatError, MissingDependencyError, NotFoundError

ARCHIVE_SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".safetensors": "safetensors"}
ENGINES = ("auto", "native", "tf")
_DATA_RE = re.compile(r"\.data-\d{5}-of-(\d{5})$")


def archive_kind(path: str) -> str | None:
    """"npz", "hdf5" or "safetensors" by suffix; None for anything else."""
    return ARCHIVE_SUFFIXES.get(os.path.splitext(path)[1].lower())


def require_archive_kind(path: str) -> str:
    kind = archive_kind(path)
    if kind is None:
        accepted = ", ".join(sorted(ARCHIVE_SUFFIXES))
        raise FormatError(f"cannot tell the archive format of {path}: its suffix must be one of {accepted}")
    return kind


def _complete_v2(prefix: str) -> bool:
    """True when the prefix has an index and every data shard it implies."""
    if not os.path.isfile(prefix + ".index"):
        return False
    shards = glob.glob(glob.escape(prefix) + ".data-?????-of-?????")
    if not shards:
        return False
    m = _DATA_RE.search(shards[0])
    return m is not None and len(shards) == int(m.group(1))


def _state_prefix(directory: str) -> str | None:
    state = _state.read_state(directory)  # a malformed or non-regular state file is an error, never a guess
    if state is None or not state.model_checkpoint_path:
        return None
    p = state.model_checkpoint_path
    return p if os.path.isabs(p) else os.path.join(directory, p)


def _require_regular(path: str, what: str) -> None:
    """Refuse anything but a regular file before it is opened (a FIFO would block the open forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own check or open reports it
    if not stat.S_ISREG(mode):
        kind = _state.describe_mode(mode)
        raise FormatError(f"{what} {path} is {kind}, not a regular file; ckptbridge reads only regular files, copy it to one first")


def latest_in_directory(directory: str) -> str:
    """The latest complete checkpoint in a directory.

    The ``checkpoint`` state file is trusted only when the prefix it names is
    whole (a training job may be writing the next one); otherwise the newest
    complete prefix by modification time wins.
    """
    named = _state_prefix(directory)
    if named and (_complete_v2(named) or os.path.isfile(named)):
        return named
    candidates = []
    for index in glob.glob(os.path.join(glob.escape(directory), "*.index")):
        prefix = index[: -len(".index")]
        if _complete_v2(prefix):
            candidates.append((os.path.getmtime(index), prefix))
    if candidates:
        return max(candidates)[1]
    for pattern in ("*.ckpt", "*.ckpt-*"):
        files = [p for p in glob.glob(os.path.join(glob.escape(directory), pattern)) if os.path.isfile(p) and not os.path.splitext(p)[1] in (".meta", ".index")]
        if files:
            return max(files, key=os.path.getmtime)
    from ._atomic import previous_kept_in

    kept = previous_kept_in(directory)
    if kept:
        raise NotFoundError(f"no complete checkpoint in directory {directory}: a forced replace was killed midway, and the previous "
                            f"checkpoint is whole in {os.path.dirname(kept[-1])}; move its files back into {directory}")
    raise NotFoundError(f"no checkpoint found in directory {directory} (no 'checkpoint' file and no *.index); pass the checkpoint prefix instead")


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(prefix, version) for a checkpoint path: version is "v2" or "v1"."""
    if os.path.isdir(path):
        path = latest_in_directory(path)
    for suffix in (".index", ".meta"):
        if path.endswith(suffix) and os.path.isfile(path):
            path = path[: -len(suffix)]
    m = _DATA_RE.search(path)
    if m:
        path = path[: m.start()]
    if os.path.lexists(path + ".index"):
        _require_regular(path + ".index", "checkpoint index")
    if os.path.isfile(path + ".index"):
        for shard in glob.glob(glob.escape(path) + ".data-?????-of-?????"):
            _require_regular(shard, "checkpoint data file")
        return path, "v2"
    if os.path.exists(path) and not os.path.isdir(path):
        _require_regular(path, "checkpoint file")
        return path, "v1"
    shards = glob.glob(glob.escape(path) + "-?????-of-?????")
    if shards:
        for shard in shards:
            _require_regular(shard, "checkpoint file")
        return path, "v1"  # a sharded V1 checkpoint
    from ._atomic import previous_kept

    kept = previous_kept(path)
    if kept is not None:
        raise NotFoundError(f"no checkpoint at {path}: a forced replace of it was killed midway, and the previous checkpoint "
                            f"is whole in {os.path.dirname(kept)}; move its files back into {os.path.dirname(os.path.abspath(path))}")
    raise NotFoundError(f"no checkpoint at {path} (looked for {os.path.basename(path)}.index and a V1 file); check the path")


def open_source(path: str, *, engine: str = "auto", verify: bool = True, max_tensor_bytes: int | None = None) -> Source:
    """A lazy source for a checkpoint or an archive."""
    if engine not in ENGINES:
        raise FormatError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    kind = archive_kind(path)
    if kind is not None:
        if not os.path.exists(path):
            raise NotFoundError(f"no such file: {path}; check the path")
        if os.path.isdir(path):
            raise FormatError(f"{path} is a directory, not an archive file; name the archive file")
        _require_regular(path, "archive")
        if not os.access(path, os.R_OK):
            raise CkptBridgeError(f"permission denied: cannot read {path}; check its permissions")
        if kind == "npz":
            from .formats.npz import NpzSource

            return NpzSource(path, verify=verify, max_tensor_bytes=max_tensor_bytes)
        if kind == "hdf5":
            from .formats.hdf5 import Hdf5Source

            return Hdf5Source(path, verify=verify, max_tensor_bytes=max_tensor_bytes)
        from .formats.safetensors import SafetensorsSource  # type: ignore[import-not-found]

        return SafetensorsSource(path, verify=verify, max_tensor_bytes=max_tensor_bytes)
    if not os.path.exists(path) and not glob.glob(glob.escape(path) + ".*") and not glob.glob(glob.escape(path) + "-?????-of-?????"):
        raise NotFoundError(f"no such file or checkpoint: {path}; check the path")
    prefix, version = resolve_checkpoint(path)
    if engine != "tf" and version == "v2":
        try:
            from .bundle import BundleReader
        except ImportError:
            BundleReader = None  # type: ignore[assignment,misc]
        if BundleReader is not None:
            return BundleReader(prefix, verify=verify)
        if engine == "native":
            raise MissingDependencyError("the native engine is not available in this build")
    if engine == "native":
        raise FormatError(f"{prefix} is a V1 checkpoint, which the native engine does not read; use --engine tf (needs pip install 'ckptbridge[tf]')")
    try:
        from .tf.engine import TfCheckpointSource
    except MissingDependencyError:
        raise
    try:
        return TfCheckpointSource(prefix)
    except MissingDependencyError as e:
        what = "a V1 checkpoint" if version == "v1" else "this checkpoint with --engine tf"
        raise MissingDependencyError(f"reading {what} ({prefix}) needs TensorFlow; install it with: pip install 'ckptbridge[tf]'") from e


def open_archive_sink(path: str, *, compress: bool = False, force: bool = False, source: str | None = None) -> Sink:
    kind = require_archive_kind(path)
    if kind == "npz":
        from .formats.npz import NpzSink

        return NpzSink(path, compress=compress, force=force, source=source)
    if kind == "hdf5":
        from .formats.hdf5 import Hdf5Sink

        return Hdf5Sink(path, compress=compress, force=force, source=source)
    from .formats.safetensors import SafetensorsSink  # type: ignore[import-not-found]

    return SafetensorsSink(path, force=force, source=source)


def open_checkpoint_sink(prefix: str, *, engine: str = "auto", force: bool = False, max_shard_bytes: int | None = None, **kw: Any) -> Sink:
    """A graph-free checkpoint writer: native where available, else TensorFlow."""
    if engine not in ENGINES:
        raise FormatError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if archive_kind(prefix) is not None:
        raise FormatError(f"output {prefix} looks like an archive; import writes a checkpoint prefix such as out/model.ckpt")
    if engine in ("auto", "native"):
        try:
            from .bundle.sink import NativeCheckpointSink
        except ImportError:
            if engine == "native":
                raise MissingDependencyError("the native engine is not available in this build") from None
        else:
            return NativeCheckpointSink(prefix, force=force, max_shard_bytes=max_shard_bytes, **kw)
    from .tf.engine import TfCheckpointSink

    return TfCheckpointSink(prefix, force=force, max_shard_bytes=max_shard_bytes, **kw)
