"""Arrays into the model you already have: :func:`assign` and :func:`init_fn`.

Both match a source (anything ckptbridge reads, an open :class:`~ckptbridge.Reader`, or a
mapping of arrays) to a target's variables by name, strictly (exact shapes and dtypes, never a
reshape), and move the values through the one pipe (``pipe.transfer``) into a
:class:`~ckptbridge.tf.feeds.VariableSink`: placeholders, never graph constants; large variables
in row slices; a progress bar in bytes; every variable read back and compared.  They raise; they
never print.  TensorFlow is imported when they are called, not when ckptbridge is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._api import Reader, _annotate, _naming, _opened, _rules, _where
from ._options import Naming, Port, ReadOptions
from ._source import ArraySource, Source
from .errors import CkptBridgeError, FormatError, MismatchError, option
from .pipe.plans import Prepared
from .pipe.transfer import require_some, transfer
from .reports import Report

if TYPE_CHECKING:
    from .tf.assign import Match, Target
    from .tf.feeds import Feeds, GraphFeeds

__all__ = ["assign", "init_fn"]

#: the most fed to TensorFlow in one slice of a large variable, or in one run of small ones
DEFAULT_CHUNK_BYTES = 64 << 20


@contextlib.contextmanager
def _source(source: str | os.PathLike[str] | Reader | Mapping[str, np.ndarray], read: ReadOptions | None,
            progress: bool | None) -> Iterator[tuple[Source, str, str]]:
    """(source, how messages name it, the names it is read with) for a path, an open Reader or a mapping."""
    if isinstance(source, Mapping) and not isinstance(source, Reader):
        if read is not None:
            raise CkptBridgeError(f"{option('read')} applies to a source given by its path; the arrays are already in memory: leave it out")
        yield ArraySource(source, "the arrays"), "the arrays", "auto"
        return
    with _opened(source, read, progress=progress, checkpoint_names=True) as reader:
        yield reader._source, _where(source), reader.options.names


def _prepare(src: Source, naming: Naming | Port, names: str) -> Prepared:
    """The source under the names the target's variables go by: a :class:`Naming` (an archive's
    recorded layout undone), or a :class:`Port` in whichever direction fits the source."""
    if isinstance(naming, Port):
        from . import ports as _ports

        pmap = _ports.load(naming.map)
        specs = src.specs()
        if any(r.source in specs for r in pmap.rules):  # a tf-slim checkpoint, into the map's destination model
            if naming.num_classes is not None:
                raise CkptBridgeError("Port.num_classes is the slim net's class count, for a destination's weights going into the slim "
                                      "net; this source is the slim checkpoint: leave it out")
            return _ports.plan_export(src, pmap)
        return _ports.plan_import(src, pmap, num_classes=naming.num_classes)
    if naming.layout is not None:
        raise CkptBridgeError("a Layout applies to an export; assign undoes the layout an archive records by itself: leave it out")
    from .pipe.plans import prepare_import

    sel, ren = naming.select, naming.rename
    return prepare_import(src, include=sel.include, exclude=sel.exclude, weights_only=sel.weights_only, use_ema=sel.use_ema,
                          rename=_rules(ren), rename_map=ren.exact, original_names=ren.original_names, names=names, by_graph=True)


def _chunk(chunk_bytes: int | None) -> int:
    chunk = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if not isinstance(chunk, int) or chunk <= 0:
        raise CkptBridgeError(f"{option('chunk_bytes')} must be a positive number of bytes, got {chunk!r}")
    return chunk


def _scopes(exclude: Sequence[str]) -> tuple[str, ...]:
    if isinstance(exclude, str) or not all(isinstance(s, str) and s for s in exclude):
        raise FormatError(f"{option('exclude')} is a sequence of variable scopes (non-empty strings), got {exclude!r}; "
                          "wrap one scope in a list")
    return tuple(exclude)


def _plan(target: Target, src: Source, naming: Naming | Port, names: str, where: str, exclude: Sequence[str],
          allow_missing: bool, strict: bool) -> tuple[Prepared, Match]:
    from .tf.assign import match

    prep = _prepare(src, naming, names)
    require_some(prep.plan, where)
    m = match(target, prep.plan, prep.source.specs(), where, exclude=exclude, allow_missing=allow_missing, strict=strict)
    return prep, m


def _run(prep: Prepared, m: Match, feeds: Feeds, label: str, naming: Naming | Port, src: Source, chunk: int,
         progress: bool | None) -> Report:
    from .tf.feeds import VariableSink

    sink = VariableSink(feeds, label, chunk_bytes=chunk)
    report = transfer(prep.source, sink, m.plan, progress=progress, desc="assign", carry_extras=False, chunk_bytes=chunk)
    report.dropped, report.missing = m.dropped, sorted([*m.missing, *m.excluded])
    _annotate(report, prep, naming, src)
    return report


def assign(
    target: Any,
    source: str | os.PathLike[str] | Reader | Mapping[str, np.ndarray],
    naming: Naming | Port | None = None,
    *,
    var_list: Iterable[Any] | None = None,
    exclude: Sequence[str] = (),
    read: ReadOptions | None = None,
    allow_missing: bool = False,
    strict: bool = False,
    chunk_bytes: int | None = None,
    progress: bool | None = False,
) -> Report:
    """Set the variables of a model you already have from a checkpoint, an archive or arrays, exactly.

    ``target`` is a ``tf.compat.v1.Session`` (its graph's global variables, or ``var_list``), a
    TF2 ``tf.Module`` (a tf_keras model too), a Keras 3 model on the TensorFlow backend, or an
    iterable of ``tf.Variable``\\s (assigned eagerly).  A graph variable is named by its op name
    (``vgg_16/fc6/weights``), a partitioned one by its full name (filled part by part), a TF2
    variable by its name without ``:0``, a Keras 3 one by its path (``block1_conv1/kernel``) or its
    ``save_weights`` path (``layers/conv2d/vars/0``).

    Strict: every value must have its variable's exact shape and dtype (nothing is reshaped or
    cast: a ``[25088, 4096]`` fc6 for ``[7, 7, 512, 4096]`` is refused by name); one error lists
    every mismatch with both sides, and nothing is assigned.  A variable without a value is an
    error unless ``allow_missing``; source entries the target lacks are listed in the report's
    ``dropped``, an error with ``strict``.  ``exclude`` are scopes (name prefixes, as tf-slim's
    ``get_variables_to_restore(exclude=...)``) left as they are: a fine-tuned head.

    Values go through placeholders, never into the graph as constants; a variable over
    ``chunk_bytes`` goes in row slices (bounded memory, any size), smaller ones go together in a
    few ``session.run`` calls.  Every variable is read back and compared.  A session's graph gets
    the feed ops of each call (a few per variable): to load again, make one :func:`init_fn`.

    Args:
        target: the model (see above).
        source: a checkpoint, an archive, a SavedModel, a URL (read with ``read``), an open
            :class:`Reader`, or a mapping of name to array.
        naming: the names the variables take (:class:`Naming`: selection, EMA, renames), or a
            :class:`Port` (a built-in map or a map file): a torchvision state_dict into a tf-slim
            graph, or a tf-slim checkpoint into a Keras model, with the map's layouts.
        var_list: a session's variables to fill (default: its graph's global variables).
        exclude: variable scopes to leave as they are.
        read: how a path is read (:class:`ReadOptions`).
        allow_missing: leave variables without a value as they are (listed in ``missing``).
        strict: source entries that are not variables of the target are an error.
        chunk_bytes: feed variables larger than this in row slices (default 64 MiB).
        progress: a progress bar in bytes on stderr (None: when stderr is a terminal).

    Returns:
        A :class:`Report`: ``written`` the variables assigned, ``missing`` those left as they
        were, ``dropped`` the source entries not used, and why.

    Example::

        with tf.compat.v1.Session() as sess:
            ckptbridge.assign(sess, "vgg16.safetensors", ckptbridge.Port("torchvision:vgg16"))
    """
    from .tf.assign import feeds_for, find_target

    naming, chunk, scopes = _naming(naming), _chunk(chunk_bytes), _scopes(exclude)
    target_ = find_target(target, var_list)
    with _source(source, read, progress) as (src, where, names):
        prep, m = _plan(target_, src, naming, names, where, scopes, allow_missing, strict)
        feeds = feeds_for(target_, m, chunk)
        return _run(prep, m, feeds, target_.label, naming, src, chunk, progress)


class InitFn:
    """What :func:`init_fn` returns: ``fn(session)`` or ``fn(scaffold, session)`` assigns the source
    through feed ops built when it was made.  It returns the :class:`Report`."""

    def __init__(self, source: Any, read: ReadOptions | None, naming: Naming | Port, target: Target, match: Match,
                 feeds: GraphFeeds, options: tuple[Sequence[str], bool, bool, int, bool | None]) -> None:
        self._source, self._read, self._naming = source, read, naming
        self._target, self._match, self._feeds = target, match, feeds
        self._options = options

    def __call__(self, *args: Any) -> Report:
        from .tf.assign import session_of

        session = session_of(args, self._target.graph)
        exclude, allow_missing, strict, chunk, progress = self._options
        with _source(self._source, self._read, progress) as (src, where, names):
            prep, m = _plan(self._target, src, self._naming, names, where, exclude, allow_missing, strict)
            if m.plan.mapping.keys() != self._match.plan.mapping.keys():
                raise MismatchError(f"{where} has changed since this init_fn was made: it no longer gives the same variables; "
                                    "make the init_fn again")
            self._feeds.session = session
            try:
                return _run(prep, m, self._feeds, "session", self._naming, src, chunk, progress)
            finally:
                self._feeds.session = None


def init_fn(
    source: str | os.PathLike[str] | Reader | Mapping[str, np.ndarray],
    naming: Naming | Port | None = None,
    *,
    var_list: Iterable[Any] | None = None,
    exclude: Sequence[str] = (),
    read: ReadOptions | None = None,
    allow_missing: bool = False,
    strict: bool = False,
    chunk_bytes: int | None = None,
    progress: bool | None = False,
) -> Callable[..., Report]:
    """A function that assigns ``source`` to the default graph's variables in the session it is given.

    Made before the graph is finalized (its feed ops are built now, in the default graph), called
    later with the session: it fits ``tf_slim.learning.train(init_fn=...)``,
    ``tf.compat.v1.train.Scaffold(init_fn=...)`` (which calls ``init_fn(scaffold, session)`` after
    its ``init_op``, in a graph it has finalized) and a plain ``fn(session)``.  The names, shapes
    and dtypes are checked now, as :func:`assign` checks them; the values are read when it runs,
    so the source is not held in memory in between.  The options are :func:`assign`'s:
    ``exclude=["vgg_16/fc8"]`` is the fine-tuning recipe (a new head at its initializer).

    Returns:
        ``fn(session)`` / ``fn(scaffold, session)``, returning the :class:`Report`.

    Example::

        fn = ckptbridge.init_fn("vgg_16.npz", exclude=["vgg_16/fc8"])
        tf_slim.learning.train(train_op, logdir, init_fn=fn)
    """
    from .tf.assign import feeds_for, graph_target
    from .tf.compat import import_tensorflow
    from .tf.feeds import GraphFeeds

    tf = import_tensorflow()
    if tf.executing_eagerly():
        raise CkptBridgeError("init_fn builds its feed ops in the default graph, and TensorFlow is executing eagerly here: make it "
                              "inside `with graph.as_default():`, or assign an eager model with ckptbridge.assign")
    naming, chunk, scopes = _naming(naming), _chunk(chunk_bytes), _scopes(exclude)
    if isinstance(source, Reader) and read is not None:
        raise CkptBridgeError(f"{source.path} is an open Reader, read with the options read() was given; {option('read')} applies "
                              "to a source given by its path: leave it out, or pass the path")
    target = graph_target(tf.compat.v1.get_default_graph(), var_list, "graph")
    with _source(source, read, False) as (src, where, names):
        _, m = _plan(target, src, naming, names, where, scopes, allow_missing, strict)
    feeds = feeds_for(target, m, chunk)
    if not isinstance(feeds, GraphFeeds):
        raise CkptBridgeError("internal error: init_fn's feeds are not a graph's")
    return InitFn(source, read, naming, target, m, feeds, (scopes, allow_missing, strict, chunk, progress))
