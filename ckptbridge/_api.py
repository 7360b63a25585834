"""The public verbs.  They raise; they never print or exit."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._resolve import open_archive_sink, open_checkpoint_sink, open_source, require_archive_kind, source_label
from ._source import Source
from .errors import CkptBridgeError, FormatError, option
from .io.durability import durability
from .pipe.compare import diff_sources, verify_source
from .pipe.names import make_plan
from .pipe.transfer import require_some, transfer
from .reports import DiffReport, Report, VerifyReport
from .spec import TensorSpec

if TYPE_CHECKING:
    from .ports import PortMap

#: what one archive tensor may claim before it is refused as a likely memory bomb (64 GiB)
DEFAULT_MAX_TENSOR_BYTES = 64 << 30


class Reader(Mapping[str, np.ndarray]):
    """A lazy, read-only mapping name -> array over a checkpoint or an archive.

    Nothing is read until a tensor is indexed; ``specs`` gives names, shapes and
    dtypes without reading values.  Close it (or use ``with``) to release files.
    """

    def __init__(self, source: Source) -> None:
        self._source = source

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


def read(path: str, *, engine: str = "auto", verify: bool = True, max_tensor_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES,
         names: str = "auto", member: str | None = None) -> Reader:
    """Open a checkpoint (prefix, file, or directory) or an archive for lazy reading.

    Arrays come with their true dtypes: bfloat16 as ``ml_dtypes.bfloat16``,
    strings as object arrays of ``bytes``, 0-d tensors as 0-d arrays.

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
    return Reader(open_source(path, engine=engine, verify=verify, max_tensor_bytes=max_tensor_bytes, names=names, member=member))


def load(path: str, *, engine: str = "auto", verify: bool = True, names: str = "auto", member: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint or an archive, read whole: ``{name: array}``.

    The eager twin of :func:`read` (safetensors' ``load_file``), for models that fit in
    memory.  Arrays come with their true dtypes, as :func:`read` gives them.

    Args:
        path: a checkpoint (prefix, file, or directory) or an archive.
        engine: ``"auto"``, ``"native"`` or ``"tf"``.
        verify: check each tensor's checksum.
        names: a checkpoint's names, as for :func:`read`.
        member: the checkpoint inside an archive of checkpoints, as :func:`read` takes it.

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

    with open_source(path, engine=engine, verify=verify, max_tensor_bytes=None, names=names, member=member) as src:
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
) -> Report:
    """Write ``{name: array}`` exactly, to an archive or a TensorFlow checkpoint, without TensorFlow.

    ``path``'s suffix picks the archive format (``.npz``, ``.h5``/``.hdf5``,
    ``.safetensors``); any other path is a V2 checkpoint prefix (``out/model.ckpt``),
    written by the native engine.  ``metadata`` (strings to strings) is kept in an
    archive's metadata under ``"user"``; a checkpoint has no place for it.  The output
    is read back and compared before it is renamed into place, as every write is.

    Args:
        tensors: name -> array (bfloat16 and float8 as ``ml_dtypes``, strings as
            object arrays of ``bytes``).
        path: the output; its suffix picks the format.
        metadata: strings kept in an archive (not a checkpoint).
        force: overwrite an existing output.
        compress: deflate (``.npz``) or gzip (HDF5) the archive.
        fsync: make the output durable before it is renamed into place.

    Returns:
        A :class:`Report` of what was written.

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
            sink = open_archive_sink(path, compress=compress, force=force, source=None)
            doc: dict[str, Any] = {"engine": "arrays"}
            if metadata:
                doc["user"] = dict(metadata)
            return transfer(src, sink, plan, metadata=doc, desc="save")
        if metadata:
            raise FormatError(f"{path} is a checkpoint prefix, and a TensorFlow checkpoint has no place for metadata; "
                              "save to .npz, .h5 or .safetensors to keep it")
        if compress:
            raise FormatError(f"{path} is a checkpoint prefix; compression applies to .npz and .h5 archives only")
        sink = open_checkpoint_sink(path, engine="native", force=force)
        return transfer(src, sink, plan, desc="save")


def export(
    checkpoint: str,
    output: str,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    weights_only: bool = False,
    use_ema: bool = False,
    compress: bool = False,
    force: bool = False,
    engine: str = "auto",
    progress: bool | None = False,
    rename: Sequence[str] = (),
    rename_map: Mapping[str, str] | None = None,
    layout: str | None = None,
    model: str | None = None,
    num_classes: int | None = None,
    dry_run: bool = False,
    fsync: bool = True,
    port: str | PortMap | None = None,
    names: str = "auto",
    member: str | None = None,
) -> Report:
    """Write every (selected) tensor of a checkpoint to ``.npz``, HDF5 or ``.safetensors``, exactly.

    The output's suffix picks the format.  It is written beside ``output`` under
    a temporary name, read back and compared, then renamed into place.
    ``rename`` (``REGEX=REPLACEMENT`` rules) and ``rename_map`` (exact names, old ->
    new) rename tensors after the filters; ``layout="torch"`` stores kernels in
    PyTorch's layout, deciding which are conv/depthwise/dense from ``model``'s
    graph if given, else from names and ranks.  The archive records original
    names and layout changes, so ``rebuild`` can undo them.  ``dry_run``
    plans everything, writes nothing, and returns the report.  ``fsync=False``
    skips making the output durable before the rename (see the README's Limits).

    ``port`` (a built-in map's name such as ``"torchvision:vgg16"``, a map file,
    or a :class:`PortMap`) writes the destination model's ``state_dict`` instead:
    its names, layouts and classes, EMA values where the checkpoint has them, no
    optimizer state.  The map decides every name, so it excludes the name
    options.  Every tensor must be accounted for, or nothing is written.

    ``names`` picks a checkpoint's names as for :func:`read`: a SavedModel's
    readable names by default; the filters and renames see them, and the
    archive records each one's checkpoint key (``original_names``).

    Args:
        checkpoint: a checkpoint prefix, its directory, any archive, an archive of
            checkpoints or a URL.  A compressed archive of checkpoints is unpacked
            into temporary space beside ``output``, removed afterwards.
        output: the archive to write; its suffix picks the format.
        member: the checkpoint inside an archive of checkpoints, as :func:`read` takes it.

    Returns:
        A :class:`Report` of every tensor written, dropped, swapped or renamed.

    Example::

        ckptbridge.export("vgg_16.ckpt", "vgg_16.npz")                                  # TensorFlow's names
        ckptbridge.export("vgg_16.ckpt", "vgg16.safetensors", port="torchvision:vgg16")  # a state_dict
    """
    from .pipe.plans import prepare_export

    kind = require_archive_kind(output)
    if port is not None:
        _refuse_with_port(rename=rename, rename_map=rename_map, layout=layout, model=model, num_classes=num_classes,
                          include=include, exclude=exclude, weights_only=weights_only, use_ema=use_ema)
    with durability(fsync), open_source(checkpoint, engine=engine, names=names, member=member, scratch_dir=_scratch_beside(output),
                                            progress=progress) as src:
        prep: Any
        if port is not None:
            from . import ports as _ports

            prep = _ports.plan_export(src, _ports.load(port))
        else:
            prep = prepare_export(
                src, include=include, exclude=exclude, weights_only=weights_only, use_ema=use_ema,
                rename=rename, rename_map=rename_map, layout=layout, model=model, num_classes=num_classes,
            )
        require_some(prep.plan, checkpoint)
        if dry_run:
            _check_dry_run_output(output, force, kind, prep.source)
            return _dry_report(output, prep, port, src)
        metadata = {"engine": source_label(src), **prep.metadata}
        sink = open_archive_sink(output, compress=compress, force=force, source=src.path)  # transfer aborts it on any failure
        report = transfer(prep.source, sink, prep.plan, progress=progress, desc="export", metadata=metadata,
                          carry_extras=port is None)
        _annotate(report, prep, port, src)
        return report


def _scratch_beside(output: str) -> str | None:
    """Where a compressed archive of checkpoints is unpacked for a command writing ``output``: its
    directory (the space the user chose for the result), or the system temp if it does not exist yet."""
    directory = os.path.dirname(os.path.abspath(output))
    return directory if os.path.isdir(directory) else None


def _refuse_with_port(**options: Any) -> None:
    """Options that a port map decides by itself are errors beside it, never ignored."""
    given = [option(k) for k, v in options.items() if v]
    if given:
        raise CkptBridgeError(f"{', '.join(given)} cannot be combined with {option('port')}: the port map decides every name, "
                              "layout and class; leave them out, or write your own map")


def _annotate(report: Report, prep: Any, port: Any, src: Source) -> None:
    report.renamed, report.layout = prep.renamed, prep.layout
    report.notes = list(src.notes)
    if port is not None:
        report.added, report.caveats = prep.added, prep.caveats
        report.port = port if isinstance(port, str) else port.name


def _check_dry_run_output(output: str, force: bool, kind: str, source: Source) -> None:
    """What opening the sink would refuse, checked without creating anything."""
    import os

    from .errors import OutputExistsError

    if os.path.lexists(output) and not force:
        raise OutputExistsError(f"output {output} already exists; pass {option('force', True)} to overwrite it")
    from .formats import FORMATS

    FORMATS[kind].check_specs(source.specs().values(), output)


def _dry_report(output: str, prep: Any, port: Any, src: Source) -> Report:
    specs = prep.source.specs()
    nbytes = sum(specs[n].nbytes for n in prep.plan.mapping)
    report = Report(output, list(prep.plan.mapping), dict(prep.plan.dropped), dict(prep.plan.ema_swaps), nbytes, dry_run=True)
    _annotate(report, prep, port, src)
    return report


def rebuild(
    archive: str,
    output_prefix: str,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    use_ema: bool = False,
    allow_missing: bool = False,
    strict: bool = False,
    chunk_bytes: int | None = None,
    max_shard_bytes: int | None = None,
    engine: str = "auto",
    force: bool = False,
    max_tensor_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES,
    progress: bool | None = False,
    rename: Sequence[str] = (),
    rename_map: Mapping[str, str] | None = None,
    original_names: bool = False,
    dry_run: bool = False,
    image_size: int | None = None,
    fsync: bool = True,
    port: str | PortMap | None = None,
    names: str = "auto",
    member: str | None = None,
) -> Report:
    """Turn an archive (or any source) back into a TensorFlow checkpoint.

    With ``model`` (a tf-slim net name or ``package.module:function``) the slim
    graph is built and its variables are matched by name, shape and dtype; the
    native writer streams the checkpoint beside the graph's ``.meta``, or with
    ``engine="tf"`` the variables are fed through placeholders (in slices of
    ``chunk_bytes`` for large ones) and a ``Saver`` writes it.  Without ``model``,
    the checkpoint holds exactly the archive's tensors.  An option that does
    not apply to the path taken is an error, never ignored.

    A layout change recorded in the archive (``export(layout="torch")``) is
    undone.  A readable name an export gave (a SavedModel's, ``names=``) goes
    back to its checkpoint key, unless a rename changed it: ``names="auto"``
    does this graph-free (so TensorFlow restores the checkpoint by object)
    and not with ``model`` (whose variables are matched by name); ``"keys"``
    always, ``"readable"`` never.  ``original_names`` restores every name
    recorded at export, undoing its renames too; ``rename``/``rename_map``
    rename after the filters.  ``dry_run`` plans
    the names, writes nothing (and does not build the graph).  ``fsync=False``
    skips making the output durable before the rename.  ``names`` also picks the
    names when ``archive`` is a checkpoint or a SavedModel directory, as for
    :func:`read`.

    ``port`` reads a destination model's ``state_dict`` (written by
    ``safetensors.torch.save_file``, or a ``.npz`` of it) through a port map,
    back to the tf-slim names and layouts; with ``model`` the slim graph is
    built and checked as for any archive.  A slim net with one class more than
    the destination (``num_classes``, by default the map's) gets TensorFlow's
    background class back as a row of zeros.

    Args:
        archive: an archive, or any source ckptbridge reads.
        output_prefix: the checkpoint prefix to write (``dir/model.ckpt``).

    Returns:
        A :class:`Report`; ``missing`` lists graph variables the archive lacked.

    Example::

        ckptbridge.rebuild("vgg_16.npz", "out/model.ckpt", model="vgg_16")
        ckptbridge.rebuild("vgg16.safetensors", "out/model.ckpt", model="vgg_16", port="torchvision:vgg16")
    """
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise CkptBridgeError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    if model is None:
        # With a port map, num_classes also says whether the checkpoint gets TensorFlow's background class back.
        given = [option(opt) for opt, value in (("chunk_bytes", chunk_bytes), ("num_classes", num_classes if port is None else None), ("image_size", image_size),
                                                ("allow_missing", allow_missing), ("strict", strict)) if value]
        if given:
            raise CkptBridgeError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to a rebuild through a graph; "
                                  f"add {option('model')}, or leave them out")
    if port is not None:
        _refuse_with_port(rename=rename, rename_map=rename_map, original_names=original_names, include=include,
                          exclude=exclude, use_ema=use_ema)
    from ._resolve import archive_kind

    # names reads a checkpoint as for read(); an archive's are its own, and prepare_import decides which are written
    with durability(fsync), open_source(archive, engine=engine, max_tensor_bytes=max_tensor_bytes, member=member,
                                        names=names if archive_kind(archive) is None else "auto",
                                        scratch_dir=_scratch_beside(output_prefix), progress=progress) as src:
        from .pipe.plans import prepare_import

        # One view of the archive (filters, EMA, original names, renames, layout undone; or a port map), then one sink.
        prep: Any
        if port is not None:
            from . import ports as _ports

            prep = _ports.plan_import(src, _ports.load(port), num_classes=num_classes)
        else:
            prep = prepare_import(src, include=include, exclude=exclude, use_ema=use_ema, rename=rename,
                                  rename_map=rename_map, original_names=original_names, names=names, by_graph=model is not None)
        require_some(prep.plan, archive)
        if dry_run:
            return _dry_report(output_prefix, prep, port, src)
        if model is not None:
            from .tf.slim import plan_graph_import

            g = plan_graph_import(
                prep.source, output_prefix, model=model, plan=prep.plan, num_classes=num_classes, allow_missing=allow_missing,
                strict=strict, chunk_bytes=chunk_bytes, max_shard_bytes=max_shard_bytes, engine=engine, force=force, image_size=image_size,
            )
            # The graph's checkpoint is name-based: a TF2 object graph of the archive has nothing to describe there.
            report = transfer(g.source, g.sink, g.plan, progress=progress, desc="import", carry_extras=False, chunk_bytes=g.chunk_bytes)
            report.written = [n for n in report.written if n not in g.missing]
            report.dropped, report.ema_swaps, report.missing = {**prep.plan.dropped, **g.dropped}, g.ema_swaps, g.missing
        else:
            sink = open_checkpoint_sink(output_prefix, engine=engine, force=force, max_shard_bytes=max_shard_bytes)
            report = transfer(prep.source, sink, prep.plan, progress=progress, desc="import")
        _annotate(report, prep, port, src)
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
    a: str, b: str, *, atol: float = 0.0, rtol: float = 0.0, engine: str = "auto", progress: bool | None = False,
    max_tensor_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES, names: str = "auto", member_a: str | None = None,
    member_b: str | None = None, graphs: bool = True,
) -> DiffReport:
    """Compare two checkpoints or archives name by name; exact unless atol/rtol.

    Tensors of a dtype ckptbridge does not carry are compared by their stored
    bytes (native engine), never skipped.  ``names`` picks the names of each side
    that is a checkpoint, as for :func:`read` (an archive's names are its own).
    ``member_a``/``member_b`` choose the checkpoint inside ``a``/``b`` where either
    is an archive of checkpoints.  With ``graphs`` (the default) the TF2 object
    graphs are compared too, by what ``tf.train.Checkpoint`` restore uses (object
    paths, children, attribute names and keys, slot links), not by their bytes;
    a graph on one side only is a difference.  ``graphs=False`` compares tensors only.

    Returns:
        A :class:`DiffReport`; ``identical`` is True when names, dtypes, shapes and
        every bit agree (or agree within ``atol + rtol * |b|``), and the object
        graphs agree (``graph_diffs`` says how they do not).

    Example::

        d = ckptbridge.diff("model.ckpt", "model.npz")
        assert d.identical, (d.only_a, d.only_b, d.value_diffs)
    """
    limit = max_tensor_bytes
    from ._resolve import archive_kind

    # names applies to the checkpoint side(s); an archive's names are its own
    na, nb = (names if archive_kind(p) is None else "auto" for p in (a, b))
    with open_source(a, engine=engine, max_tensor_bytes=limit, names=na, member=member_a, member_key="member_a",
                     progress=progress) as sa, \
            open_source(b, engine=engine, max_tensor_bytes=limit, names=nb, member=member_b, member_key="member_b",
                         progress=progress) as sb:
        return diff_sources(sa, sb, atol=atol, rtol=rtol, progress=progress, graphs=graphs)


def verify(path: str, *, engine: str = "auto", progress: bool | None = False, max_tensor_bytes: int | None = DEFAULT_MAX_TENSOR_BYTES,
           names: str = "auto", member: str | None = None) -> VerifyReport:
    """Check every tensor's checksum (archive crc32c records, or the checkpoint's crc32c).

    A SavedModel or Hub directory is checked through its ``variables/`` checkpoint;
    ``names`` picks the names a bad tensor is reported under, as for :func:`read`.

    Returns:
        A :class:`VerifyReport`; ``ok`` is False with the first bad tensor named
        in ``bad`` and ``message``.

    Example::

        report = ckptbridge.verify("archive.h5")
        assert report.ok, report.message
    """
    with open_source(path, engine=engine, verify=True, max_tensor_bytes=max_tensor_bytes, names=names, member=member,
                     progress=progress) as src:
        return verify_source(src, progress=progress)
