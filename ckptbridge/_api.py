"""The public verbs.  They raise; they never print or exit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._options import DEFAULT_MAX_TENSOR_BYTES, Graph, Layout, Naming, Port, ReadOptions, Rename, Select
from ._resolve import archive_kind, open_archive_sink, open_checkpoint_sink, open_source, require_archive_format, source_label
from ._source import Source
from .errors import CkptBridgeError, FormatError, NotFoundError, option
from .io.durability import durability
from .io.remote import is_url, redact
from .pipe.compare import diff_sources, verify_source
from .pipe.names import make_plan
from .pipe.transfer import require_some, transfer
from .reports import DiffReport, Report, VerifyReport
from .spec import TensorSpec

if TYPE_CHECKING:
    from .ports import PortMap

__all__ = ["DEFAULT_MAX_TENSOR_BYTES", "Graph", "Layout", "Naming", "Port", "ReadOptions", "Reader", "Rename", "Select",
           "diff", "export", "load", "port_map", "port_maps", "read", "rebuild", "save", "verify"]


class Reader(Mapping[str, np.ndarray]):
    """A lazy, read-only mapping name -> array over a checkpoint or an archive.

    Nothing is read until a tensor is indexed; ``specs`` gives names, shapes and
    dtypes without reading values.  Close it (or use ``with``) to release files.
    """

    def __init__(self, source: Source, options: ReadOptions | None = None) -> None:
        self._source = source
        self._options = options if options is not None else ReadOptions()

    @property
    def options(self) -> ReadOptions:
        """The reading options it was opened with (what :func:`read` was given)."""
        return self._options

    @property
    def specs(self) -> Mapping[str, TensorSpec]:
        return self._source.specs()

    @property
    def path(self) -> str:
        return self._source.path

    @property
    def kind(self) -> str:
        return self._source.kind

    @property
    def uncarried(self) -> Mapping[str, TensorSpec]:
        """Tensors of a dtype ckptbridge cannot carry (``variant``...): listed, never read as arrays.

        They are not keys of the mapping; :meth:`read_raw` gives their stored bytes
        where the engine can (the native one).
        """
        return self._source.uncarried()

    def read_raw(self, name: str) -> bytes | None:
        """The stored bytes of a tensor in :attr:`uncarried`, checksum-verified; None where the engine cannot."""
        return self._source.read_raw(name)

    def metadata(self) -> dict[str, Any]:
        """The archive's provenance and per-tensor records (empty for checkpoints)."""
        return self._source.metadata()

    @property
    def notes(self) -> list[str]:
        """What finding the source decided that you should know (a directory's ``checkpoint``
        file naming a path outside the directory, which was not followed); usually empty."""
        return list(self._source.notes)

    def extras(self) -> dict[str, bytes]:
        """Non-tensor payloads carried along, e.g. ``{"object_graph": ...}`` of a TF2 checkpoint."""
        return self._source.extras()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._source.specs():
            raise KeyError(name)
        return self._source.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.specs())

    def __len__(self) -> int:
        return len(self._source.specs())

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_READ = ReadOptions()  # the one set of reading defaults: read()'s, and every verb's for a path


def read(path: str | os.PathLike[str], *, engine: str = _READ.engine, verify: bool = _READ.verify,
         max_tensor_bytes: int | None = _READ.max_tensor_bytes, names: str = _READ.names, member: str | None = _READ.member) -> Reader:
    """Open a checkpoint (prefix, file, or directory) or an archive for lazy reading.

    Every reading option lives here (and in :class:`ReadOptions`, the same set as one
    value): the other verbs take a path, read with these defaults or their ``read=``, or
    the :class:`Reader` this returns.  Arrays come with their true dtypes: bfloat16 as
    ``ml_dtypes.bfloat16``, strings as object arrays of ``bytes``, 0-d tensors as 0-d arrays.

    Args:
        path: a checkpoint prefix, one of its files, its directory, an archive, an
            archive of checkpoints (``.tar``, ``.tar.gz``/``.tgz``, ``.zip``) or a URL.
        engine: ``"auto"``, ``"native"`` (no TensorFlow) or ``"tf"``.
        verify: check each tensor's checksum as it is read.
        max_tensor_bytes: an archive tensor claiming more is refused when the
            archive is opened (None: no limit).
        names: a checkpoint's names: ``"auto"`` (readable for a SavedModel or
            Hub directory, keys for a checkpoint), ``"readable"`` (also a TF2
            checkpoint's, from its object graph) or ``"keys"``; a renamed
            tensor's key is in ``metadata()["original_names"]``.
        member: the checkpoint to read inside an archive of checkpoints that holds
            several (its prefix there, e.g. ``"run/model.ckpt-100"``).

    Returns:
        A :class:`Reader`: a read-only mapping name -> array that reads nothing
        until indexed; close it, or use it in a ``with`` block.

    Example::

        with ckptbridge.read("vgg_16.ckpt") as r:
            r.specs["vgg_16/fc8/weights"].shape      # (1, 1, 4096, 1000), nothing read
            w = r["vgg_16/fc8/weights"]              # this tensor read, checked
    """
    return _open(path, ReadOptions(engine=engine, verify=verify, max_tensor_bytes=max_tensor_bytes, names=names, member=member))


def _path(source: str | os.PathLike[str]) -> str:
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise FormatError(f"a source is a path (a str or os.PathLike), a URL or an open Reader (ckptbridge.read), "
                          f"got {type(source).__name__}")
    return path


def _open(source: str | os.PathLike[str], options: ReadOptions, *, scratch_dir: str | None = None, progress: bool | None = False,
          member_key: str = "member", checkpoint_names: bool = False) -> Reader:
    """:func:`read` with ``options``, plus what a verb adds: where a compressed archive of checkpoints is
    unpacked, a bar of the bytes fetched from a URL, the option messages name for ``member``.
    ``checkpoint_names``: the names option applies where the source is a checkpoint (an archive's are its own)."""
    path = _path(source)
    names = "auto" if checkpoint_names and archive_kind(path) is not None else options.names
    src = open_source(path, engine=options.engine, verify=options.verify, max_tensor_bytes=options.max_tensor_bytes, names=names,
                      member=options.member, member_key=member_key, scratch_dir=scratch_dir, progress=progress)
    return Reader(src, options)


@contextlib.contextmanager
def _opened(source: str | os.PathLike[str] | Reader, options: ReadOptions | None, *, key: str = "read",
            **how: Any) -> Iterator[Reader]:
    """The Reader behind a verb's ``source``: an open one as given (left open: its caller owns it), or
    a path's, opened with ``options`` (by default :func:`read`'s) and closed afterwards."""
    if isinstance(source, Reader):
        if options is not None:
            raise CkptBridgeError(f"{source.path} is an open Reader, read with the options read() was given; {option(key)} applies "
                                  "to a source given by its path: leave it out, or pass the path")
        yield source
        return
    if options is not None and not isinstance(options, ReadOptions):
        raise FormatError(f"{option(key)} is a ReadOptions, got {type(options).__name__}")
    with _open(source, options or _READ, **how) as reader:
        yield reader


def _where(source: str | os.PathLike[str] | Reader) -> str:
    """The source as messages name it: the path given, or an open Reader's."""
    return source.path if isinstance(source, Reader) else _path(source)


def load(source: str | os.PathLike[str] | Reader, *, read: ReadOptions | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint or an archive, read whole: ``{name: array}``.

    The eager twin of :func:`read` (safetensors' ``load_file``), for models that fit in
    memory.  Arrays come with their true dtypes, as :func:`read` gives them.  A path is
    read with ``read`` (by default :func:`read`'s defaults, its tensor size guard too).

    Args:
        source: a checkpoint (prefix, file, or directory), an archive, or an open :class:`Reader`.
        read: how a path is read (:class:`ReadOptions`).

    Returns:
        A new dict of arrays the caller owns.

    Raises:
        UncarriedDtypeError: the checkpoint holds a tensor ckptbridge cannot carry
            (a ``variant``), named in the error; use :func:`read` to take the rest.

    Example::

        weights = ckptbridge.load("model.npz")
        weights["vgg_16/fc8/weights"].shape
    """
    from ._dtypes import uncarried_error

    with _opened(source, read) as reader:
        src = reader._source
        opaque = src.uncarried()
        if opaque:
            raise uncarried_error(src.path, {n: s.dtype for n, s in opaque.items()})
        return {name: np.array(src.read(name), copy=True) for name in src.specs()}


def save(
    tensors: Mapping[str, np.ndarray],
    path: str,
    *,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    compress: bool = False,
    fsync: bool = True,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Write ``{name: array}`` exactly, to an archive or a TensorFlow checkpoint, without TensorFlow.

    ``path``'s suffix picks the archive format (``.npz``, ``.h5``/``.hdf5``,
    ``.safetensors``); any other path is a V2 checkpoint prefix (``out/model.ckpt``),
    written by the native engine.  ``metadata`` (strings to strings) is kept in an
    archive's metadata under ``"user"``; a checkpoint has no place for it.  The output
    is read back and compared before it is renamed into place, as every write is.
    An archive may go to a URL (``s3://bucket/w.safetensors``), as for :func:`export`.

    Args:
        tensors: name -> array (bfloat16 and float8 as ``ml_dtypes``, strings as
            object arrays of ``bytes``).
        path: the output; its suffix picks the format.
        metadata: strings kept in an archive (not a checkpoint).
        force: overwrite an existing output.
        compress: deflate (``.npz``) or gzip (HDF5) the archive.
        fsync: make the output durable before it is renamed into place.
        scratch_dir: where the local copy of an archive bound for a URL is written
            (None: the system temp, ``TMPDIR``).

    Returns:
        A :class:`Report` of what was written (``checksum`` and ``size`` of an
        archive at a URL).

    Example::

        ckptbridge.save({"w": np.ones((3, 4), np.float32)}, "out/model.ckpt")
        ckptbridge.load("out/model.ckpt")["w"]
    """
    from ._resolve import archive_kind
    from ._source import ArraySource

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("metadata must map strings to strings")
    src = ArraySource(tensors)
    if not src.specs():
        raise FormatError(f"nothing to save to {path}: the mapping of tensors is empty")
    plan = make_plan(list(src.specs()))
    with durability(fsync):
        if archive_kind(path) is not None:
            sink = open_archive_sink(path, compress=compress, force=force, source=None, scratch_dir=_dir_or_none(scratch_dir))
            doc: dict[str, Any] = {"engine": "arrays"}
            if metadata:
                doc["user"] = dict(metadata)
            report = transfer(src, sink, plan, metadata=doc, desc="save")
            _output_facts(report, sink)
            return report
        if is_url(path):
            raise FormatError(f"{redact(path)}: save writes a checkpoint to a local prefix; a URL takes an archive "
                              "(.npz, .h5, .safetensors)")
        if metadata:
            raise FormatError(f"{path} is a checkpoint prefix, and a TensorFlow checkpoint has no place for metadata; "
                              "save to .npz, .h5 or .safetensors to keep it")
        if compress:
            raise FormatError(f"{path} is a checkpoint prefix; compression applies to .npz and .h5 archives only")
        sink = open_checkpoint_sink(path, engine="native", force=force)
        return transfer(src, sink, plan, desc="save")


def export(
    source: str | os.PathLike[str] | Reader,
    output: str | os.PathLike[str],
    naming: Naming | Port | None = None,
    *,
    read: ReadOptions | None = None,
    compress: bool = False,
    force: bool = False,
    progress: bool | None = False,
    dry_run: bool = False,
    fsync: bool = True,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Write every (selected) tensor of a checkpoint to ``.npz``, HDF5 or ``.safetensors``, exactly.

    The output's suffix picks the format.  It is written beside ``output`` under
    a temporary name, read back and compared, then renamed into place.  An
    ``output`` at a URL (``s3://bucket/run/model.h5``, ``gs://...``, any fsspec
    protocol that writes; the ``[remote]`` extra) is written and read back so in
    ``scratch_dir`` (by default the system temp), then uploaded, checked against
    what the store holds, and only then published there: see the README's "Writing to URLs".

    ``naming`` is a :class:`Naming`: a :class:`Select`\\ion (include, exclude,
    weights_only, use_ema), :class:`Rename`\\s after it (exact names, then
    ``(regex, replacement)`` rules), and a :class:`Layout` change (``to="torch"``
    stores kernels in PyTorch's layout, deciding which are conv/depthwise/dense from
    its ``model``'s graph if given, else from names and ranks).  The archive records
    original names and layout changes, so ``rebuild`` can undo them.

    Or ``naming`` is a :class:`Port` (a built-in map's name such as ``"torchvision:vgg16"``,
    a map file, or a :class:`PortMap`), which writes the destination model's ``state_dict``
    instead: its names, layouts and classes, EMA values where the checkpoint has them,
    no optimizer state.  Every tensor must be accounted for, or nothing is written.

    ``dry_run`` plans everything, writes nothing, and returns the report.
    ``fsync=False`` skips making the output durable before the rename (see the
    README's Limits).

    Args:
        source: a checkpoint prefix, its directory, any archive, an archive of
            checkpoints or a URL, read with ``read``; or an open :class:`Reader`
            (``ckptbridge.read(path, names="keys")``).  A compressed archive of
            checkpoints given by its path is unpacked into temporary space beside
            ``output``, removed afterwards.  A SavedModel's readable names (``names``
            of :func:`read`) are the ones the filters and renames see, and the archive
            records each one's checkpoint key (``original_names``).
        output: the archive to write; its suffix picks the format.
        naming: the names written (:class:`Naming`, by default every tensor as it is
            named), or a port map (:class:`Port`).
        read: how a path is read (:class:`ReadOptions`; by default :func:`read`'s).
        scratch_dir: local temporary space: where an output bound for a URL is
            written and read back before its upload, and a compressed archive of
            checkpoints is unpacked (None: beside a local output, else the system temp).

    Returns:
        A :class:`Report` of every tensor written, dropped, swapped or renamed; for an
        output at a URL also its ``checksum`` (``"crc32c:<8 hex digits>"`` of the
        object's bytes), ``size`` and ``etag``.

    Example::

        ckptbridge.export("vgg_16.ckpt", "vgg_16.npz")                                        # TensorFlow's names
        ckptbridge.export("vgg_16.ckpt", "vgg16.safetensors", ckptbridge.Port("torchvision:vgg16"))  # a state_dict
    """
    from .pipe.plans import prepare_export

    output = _path(output)
    fmt = require_archive_format(output)  # resolved once: the dry run and the sink use it
    naming = _naming(naming)
    if isinstance(naming, Port) and naming.num_classes is not None:
        raise CkptBridgeError("Port.num_classes applies to an import (rebuild), where the slim net may have TensorFlow's background "
                              "class; leave it out on export")
    if isinstance(naming, Naming) and naming.rename.original_names:
        raise CkptBridgeError("Rename.original_names restores the names an archive recorded at export; it applies to an import "
                              "(rebuild): leave it out on export")
    scratch = _dir_or_none(scratch_dir)
    with durability(fsync), _opened(source, read, scratch_dir=scratch or _scratch_beside(output), progress=progress) as reader:
        src = reader._source
        prep: Any
        if isinstance(naming, Port):
            from . import ports as _ports

            prep = _ports.plan_export(src, _ports.load(naming.map))
        else:
            sel, ren, lay = naming.select, naming.rename, naming.layout
            prep = prepare_export(
                src, include=sel.include, exclude=sel.exclude, weights_only=sel.weights_only, use_ema=sel.use_ema,
                rename=_rules(ren), rename_map=ren.exact, layout=None if lay is None else lay.to,
                model=None if lay is None else lay.model, num_classes=None if lay is None else lay.num_classes,
            )
        require_some(prep.plan, _where(source))
        if dry_run:
            _check_dry_run_output(output, force, fmt.name, prep.source)
            return _dry_report(output, prep, naming, src)
        metadata = {"engine": source_label(src), **prep.metadata}
        sink = open_archive_sink(output, fmt=fmt, compress=compress, force=force, source=src.path,  # transfer aborts it on any failure
                                 scratch_dir=scratch, progress=progress)
        report = transfer(prep.source, sink, prep.plan, progress=progress, desc="export", metadata=metadata,
                          carry_extras=not isinstance(naming, Port))
        _output_facts(report, sink)
        _annotate(report, prep, naming, src)
        return report


def _dir_or_none(scratch_dir: str | os.PathLike[str] | None) -> str | None:
    """``scratch_dir`` as a path, refused unless it is a directory (None stays None)."""
    if scratch_dir is None:
        return None
    path = _path(scratch_dir)
    if not os.path.isdir(path):
        raise NotFoundError(f"scratch directory {path} does not exist; create it, or leave {option('scratch_dir')} out "
                            "to use the system temp")
    return path


def _output_facts(report: Report, sink: Any) -> None:
    """What the sink knows of the file it published: a URL's upload (checksum, size, ETag)."""
    uploaded = getattr(sink, "uploaded", None)
    if uploaded is not None:
        report.output, report.checksum, report.size, report.etag = uploaded.url, uploaded.checksum, uploaded.size, uploaded.etag


def _naming(naming: Naming | Port | None) -> Naming | Port:
    if naming is None:
        return Naming()
    if not isinstance(naming, (Naming, Port)):
        hint = f"; for a port map, Port({naming!r})" if isinstance(naming, str) else ""
        raise FormatError(f"naming is a Naming or a Port, got {type(naming).__name__}{hint}")
    return naming


def _rules(rename: Rename) -> list[Any]:
    """The ``(regex, replacement)`` pairs, compiled (a bad regex is an error naming its rule)."""
    from .pipe.names import compile_rename

    return [compile_rename(rx, repl) for rx, repl in rename.rules]


def _scratch_beside(output: str) -> str | None:
    """Where a compressed archive of checkpoints is unpacked for a command writing ``output``: its
    directory (the space the user chose for the result), or the system temp if it does not exist yet
    or ``output`` is a URL."""
    if is_url(output):
        return None
    directory = os.path.dirname(os.path.abspath(output))
    return directory if os.path.isdir(directory) else None


def _annotate(report: Report, prep: Any, naming: Naming | Port, src: Source) -> None:
    report.renamed, report.layout = prep.renamed, prep.layout
    report.notes = list(src.notes)
    if isinstance(naming, Port):
        report.added, report.caveats = prep.added, prep.caveats
        report.port = naming.map if isinstance(naming.map, str) else naming.map.name


def _check_dry_run_output(output: str, force: bool, kind: str, source: Source) -> None:
    """What opening the sink would refuse, checked without creating anything."""
    from .errors import OutputExistsError

    if not is_url(output) and os.path.lexists(output) and not force:
        raise OutputExistsError(f"output {output} already exists; pass {option('force', True)} to overwrite it")
    from .formats import FORMATS

    FORMATS[kind].check_specs(source.specs().values(), output)


def _dry_report(output: str, prep: Any, naming: Naming | Port, src: Source) -> Report:
    specs = prep.source.specs()
    nbytes = sum(specs[n].nbytes for n in prep.plan.mapping)
    report = Report(output, list(prep.plan.mapping), dict(prep.plan.dropped), dict(prep.plan.ema_swaps), nbytes, dry_run=True)
    _annotate(report, prep, naming, src)
    return report


def rebuild(
    source: str | os.PathLike[str] | Reader,
    output_prefix: str | os.PathLike[str],
    naming: Naming | Port | None = None,
    *,
    graph: Graph | None = None,
    read: ReadOptions | None = None,
    engine: str = "auto",
    max_shard_bytes: int | None = None,
    force: bool = False,
    progress: bool | None = False,
    dry_run: bool = False,
    fsync: bool = True,
) -> Report:
    """Turn an archive (or any source) back into a TensorFlow checkpoint.

    With ``graph`` (a :class:`Graph`: a tf-slim net name or ``package.module:function``,
    or ``meta=``, a MetaGraphDef file such as a training job's ``.meta``, imported as it is)
    the graph is built or imported and its variables are matched by name, shape and dtype;
    the native writer streams the checkpoint beside the graph's ``.meta``, or with
    ``engine="tf"`` the variables are fed through placeholders (in slices of
    ``graph.chunk_bytes`` for large ones) and a ``Saver`` writes it.  Without a graph,
    the checkpoint holds exactly the source's tensors, written by ``engine``.

    A layout change recorded in the archive (an export with a :class:`Layout`) is
    undone.  A readable name an export gave (a SavedModel's) goes back to its
    checkpoint key, unless a rename changed it, as the ``names`` the source is read
    with says: ``"auto"`` does this graph-free (so TensorFlow restores the checkpoint
    by object) and not through a graph (whose variables are matched by name);
    ``"keys"`` always, ``"readable"`` never.  For a path, that is ``read.names`` (which
    also picks a checkpoint's names, as for :func:`read`; an archive's are its own).

    ``naming`` is a :class:`Naming`: a :class:`Select`\\ion, then :class:`Rename`\\s
    (``Rename(original_names=True)`` restores every name recorded at export, undoing
    its renames too).  Or a :class:`Port`: a destination model's ``state_dict``
    (written by ``safetensors.torch.save_file``, or a ``.npz`` of it) read through a
    port map, back to the tf-slim names and layouts; a slim net with one class more
    than the destination (``Port.num_classes`` or ``Graph.num_classes``, by default the
    map's) gets TensorFlow's background class back as a row of zeros.

    ``dry_run`` plans the names, writes nothing (and does not build the graph).
    ``fsync=False`` skips making the output durable before the rename.

    Args:
        source: an archive, or any source ckptbridge reads, given by its path (read
            with ``read``) or as an open :class:`Reader`.
        output_prefix: the checkpoint prefix to write (``dir/model.ckpt``).
        naming: the names written (:class:`Naming`), or a port map (:class:`Port`).
        graph: the graph to import through (:class:`Graph`: a tf-slim net or a ``.meta``; TensorFlow needed).
        read: how a path is read (:class:`ReadOptions`; by default :func:`read`'s).
        engine: the engine that writes the checkpoint (``"auto"``, ``"native"``, ``"tf"``).
        max_shard_bytes: split the checkpoint into ``.data`` shards of at most this many bytes.

    Returns:
        A :class:`Report`; ``missing`` lists graph variables the source lacked.

    Example::

        ckptbridge.rebuild("vgg_16.npz", "out/model.ckpt", graph=ckptbridge.Graph("vgg_16"))
        ckptbridge.rebuild("model.npz", "out/model.ckpt", graph=ckptbridge.Graph(meta="train/model.ckpt-1000.meta"))
        ckptbridge.rebuild("vgg16.safetensors", "out/model.ckpt", ckptbridge.Port("torchvision:vgg16"),
                           graph=ckptbridge.Graph("vgg_16"))
    """
    from . import _engines

    output_prefix = _path(output_prefix)
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CkptBridgeError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    _engines.check(engine)
    naming = _naming(naming)
    if isinstance(naming, Naming) and naming.layout is not None:
        raise CkptBridgeError("a Layout applies to an export; an import undoes the layout an archive records by itself: leave it out")
    classes = graph.num_classes if graph is not None else None  # the slim net's classes, told by either
    if isinstance(naming, Port) and naming.num_classes is not None:
        if classes is not None and classes != naming.num_classes:
            raise CkptBridgeError(f"Port.num_classes ({naming.num_classes}) and Graph.num_classes ({classes}) both give the slim "
                                  "net's classes, and differ; give one of them")
        classes = naming.num_classes
    with durability(fsync), _opened(source, read, scratch_dir=_scratch_beside(output_prefix), progress=progress,
                                    checkpoint_names=True) as reader:
        from .pipe.plans import prepare_import

        src = reader._source
        # One view of the archive (filters, EMA, original names, renames, layout undone; or a port map), then one sink.
        prep: Any
        if isinstance(naming, Port):
            from . import ports as _ports

            prep = _ports.plan_import(src, _ports.load(naming.map), num_classes=classes)
        else:
            sel, ren = naming.select, naming.rename
            prep = prepare_import(src, include=sel.include, exclude=sel.exclude, weights_only=sel.weights_only, use_ema=sel.use_ema,
                                  rename=_rules(ren), rename_map=ren.exact, original_names=ren.original_names,
                                  names=reader.options.names, by_graph=graph is not None)
        require_some(prep.plan, _where(source))
        if dry_run:
            return _dry_report(output_prefix, prep, naming, src)
        if graph is not None:
            from .tf.slim import plan_graph_import

            g = plan_graph_import(
                prep.source, output_prefix, model=graph.model, meta=None if graph.meta is None else os.fspath(graph.meta), plan=prep.plan,
                num_classes=classes, allow_missing=graph.allow_missing, strict=graph.strict, chunk_bytes=graph.chunk_bytes,
                max_shard_bytes=max_shard_bytes, engine=engine, force=force, image_size=graph.image_size,
            )
            # The graph's checkpoint is name-based: a TF2 object graph of the archive has nothing to describe there.
            report = transfer(g.source, g.sink, g.plan, progress=progress, desc="import", carry_extras=False, chunk_bytes=g.chunk_bytes)
            report.written = [n for n in report.written if n not in g.missing]
            report.dropped, report.ema_swaps, report.missing = {**prep.plan.dropped, **g.dropped}, g.ema_swaps, g.missing
            _annotate(report, prep, naming, src)
            report.notes += g.notes
            return report
        sink = open_checkpoint_sink(output_prefix, engine=engine, force=force, max_shard_bytes=max_shard_bytes)
        report = transfer(prep.source, sink, prep.plan, progress=progress, desc="import")
        _annotate(report, prep, naming, src)
        return report


def port_maps() -> dict[str, PortMap]:
    """The built-in port maps, by name (``"torchvision:vgg16"``...).

    Example::

        for name, m in ckptbridge.port_maps().items():
            print(name, m.net, [c.text for c in m.caveats])
    """
    from . import ports as _ports

    return {name: _ports.load(name) for name in _ports.builtin()}


def port_map(name_or_path: str) -> PortMap:
    """One port map: a built-in one by name, or your own map file (checked; every problem listed)."""
    from . import ports as _ports

    return _ports.load(name_or_path)


def diff(
    a: str | os.PathLike[str] | Reader, b: str | os.PathLike[str] | Reader, *, atol: float = 0.0, rtol: float = 0.0,
    read: ReadOptions | None = None, read_b: ReadOptions | None = None, progress: bool | None = False, graphs: bool = True,
) -> DiffReport:
    """Compare two checkpoints or archives name by name; exact unless atol/rtol.

    Each side is a path or an open :class:`Reader` (``ckptbridge.read(path, names="keys")``).
    A path is read with ``read`` (by default :func:`read`'s defaults), ``b`` with ``read_b``
    where it is given (``member`` differs per side, for archives of checkpoints).  ``names``
    applies to each side that is a checkpoint (an archive's names are its own).  Tensors of
    a dtype ckptbridge does not carry are compared by their stored bytes (native engine),
    never skipped.  With ``graphs`` (the default) the TF2 object graphs are compared
    too, by what ``tf.train.Checkpoint`` restore uses (object paths, children, attribute
    names and keys, slot links), not by their bytes; a graph on one side only is a
    difference.  ``graphs=False`` compares tensors only.

    Returns:
        A :class:`DiffReport`; ``identical`` is True when names, dtypes, shapes and
        every bit agree (or agree within ``atol + rtol * |b|``), and the object
        graphs agree (``graph_diffs`` says how they do not).

    Example::

        d = ckptbridge.diff("model.ckpt", "model.npz")
        assert d.identical, (d.only_a, d.only_b, d.value_diffs)
    """
    # read is a's, and b's unless read_b is given; a Reader b keeps its own (read was then meant for a)
    opts_b = read_b if read_b is not None else None if isinstance(b, Reader) else read
    with _opened(a, read, member_key="member_a", checkpoint_names=True, progress=progress) as ra, \
            _opened(b, opts_b, key="read_b" if read_b is not None else "read", member_key="member_b", checkpoint_names=True,
                    progress=progress) as rb:
        return diff_sources(ra._source, rb._source, atol=atol, rtol=rtol, progress=progress, graphs=graphs)


def verify(source: str | os.PathLike[str] | Reader, *, read: ReadOptions | None = None, progress: bool | None = False) -> VerifyReport:
    """Check every tensor's checksum (archive crc32c records, or the checkpoint's crc32c).

    ``source`` is a path, read with ``read`` (by default :func:`read`'s defaults), or an
    open :class:`Reader` (one that checks checksums: not opened with ``verify=False``).
    A SavedModel or Hub directory is checked through its ``variables/`` checkpoint; a bad
    tensor is reported under the names it is read with.

    Returns:
        A :class:`VerifyReport`; ``ok`` is False with the first bad tensor named
        in ``bad`` and ``message``.

    Example::

        report = ckptbridge.verify("archive.h5")
        assert report.ok, report.message
    """
    given = source.options if isinstance(source, Reader) else read
    if given is not None and not given.verify:
        raise CkptBridgeError(f"{_where(source)} would be read with verify=False, which reads without checking checksums; "
                              "verify reads with verify=True: leave it at its default")
    with _opened(source, read, progress=progress) as reader:
        return verify_source(reader._source, progress=progress)
