"""tf-slim nets: a registry, and rebuilding a checkpoint through the slim graph.

The graph is built with the net's own arg_scope (so batch norm, biases and
names are those of the model zoo), its global variables are matched to the
archive by name, shape and dtype, and then one of the sinks of
``tf/graph_sinks.py`` is driven by ``_pipe.transfer`` like any other sink:

* ``engine`` "auto"/"native": the bundle is streamed from the archive by
  ckptbridge's own writer, and TensorFlow builds the graph, writes its
  ``.meta`` and checks the bundle's index;
* ``engine`` "tf": each variable is filled through a placeholder — in slices
  of at most ``chunk_bytes`` for large ones, never as a graph constant — and
  ``tf.compat.v1.train.Saver`` writes the checkpoint.

Either way the result is read back and compared before it is published.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._source import Sink, Source, SourceView
from ..errors import CkptBridgeError, FormatError, MismatchError, option
from ..pipe.names import Plan
from ..spec import TensorSpec, dtype_name, numpy_dtype
from .compat import import_slim, import_tensorflow
from .engine import tf_dtype_name

if TYPE_CHECKING:
    from .graph_sinks import Part


@dataclasses.dataclass(frozen=True)
class NetInfo:
    module: str
    function: str
    arg_scope: str
    image_size: int
    num_classes: int


_V1 = "tf_slim.nets.resnet_v1"
_V2 = "tf_slim.nets.resnet_v2"
_INC = "tf_slim.nets.inception"
NETS: dict[str, NetInfo] = {
    "vgg_a": NetInfo("tf_slim.nets.vgg", "vgg_a", "vgg_arg_scope", 224, 1000),
    "vgg_16": NetInfo("tf_slim.nets.vgg", "vgg_16", "vgg_arg_scope", 224, 1000),
    "vgg_19": NetInfo("tf_slim.nets.vgg", "vgg_19", "vgg_arg_scope", 224, 1000),
    **{f"resnet_v1_{d}": NetInfo(_V1, f"resnet_v1_{d}", "resnet_arg_scope", 224, 1000) for d in (50, 101, 152, 200)},
    **{f"resnet_v2_{d}": NetInfo(_V2, f"resnet_v2_{d}", "resnet_arg_scope", 224, 1001) for d in (50, 101, 152, 200)},
    "inception_v1": NetInfo(_INC, "inception_v1", "inception_v1_arg_scope", 224, 1001),
    "inception_v2": NetInfo(_INC, "inception_v2", "inception_v2_arg_scope", 224, 1001),
    "inception_v3": NetInfo(_INC, "inception_v3", "inception_v3_arg_scope", 299, 1001),
    "alexnet_v2": NetInfo("tf_slim.nets.alexnet", "alexnet_v2", "alexnet_v2_arg_scope", 224, 1000),
    "overfeat": NetInfo("tf_slim.nets.overfeat", "overfeat", "overfeat_arg_scope", 231, 1000),
}

# The final classification layer of each family, to read num_classes from an archive.
_LOGITS_RE = re.compile(r"(^|/)(fc8|logits|Logits/Conv2d_0c_1x1|Logits/Conv2d_1c_1x1)/weights$")


def infer_num_classes(specs: dict[str, TensorSpec], default: int) -> int:
    """The number of classes the archive's logits layer was trained for (else ``default``)."""
    for name, spec in specs.items():
        if _LOGITS_RE.search(name) and spec.shape:
            return int(spec.shape[-1])
    return default


def build_net(model: str, num_classes: int | None, specs: dict[str, TensorSpec] | None = None, *,
              image_size: int | None = None) -> tuple[Any, Any, Any]:
    """Build ``model`` in a fresh graph: (graph, input placeholder or None, output).

    ``image_size`` matters for a few nets whose layer names depend on the input
    (inception_v3's AuxLogits kernel is named after it); default: the net's own.
    """
    tf = import_tensorflow()
    slim = import_slim()
    graph = tf.Graph()
    with graph.as_default():
        if model in NETS:
            info = NETS[model]
            mod = importlib.import_module(info.module)
            fn = getattr(mod, info.function)
            scope = getattr(mod, info.arg_scope)
            n = num_classes if num_classes is not None else infer_num_classes(specs or {}, info.num_classes)
            size = image_size or info.image_size
            images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name="images")
            with slim.arg_scope(scope()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf-keras' legacy layers warn about their own deprecation
                out = fn(images, num_classes=n, is_training=False)
            logits = out[0] if isinstance(out, tuple) else out
            return graph, images, logits
        fn = _load_user_function(model)
        try:
            out = fn(num_classes=num_classes) if num_classes is not None else fn()
        except CkptBridgeError:
            raise
        except Exception as e:
            raise CkptBridgeError(f"model function {model} failed while building the graph: {type(e).__name__}: {e}") from None
        return graph, None, out


def _load_user_function(spec: str) -> Callable[..., Any]:
    names = ", ".join(sorted(NETS))
    if ":" not in spec:
        raise FormatError(f"unknown model {spec!r}; choose one of {names}, or give package.module:function")
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise FormatError(f"cannot import {mod_name!r} for {option('model', spec)} ({e}); check that it is on PYTHONPATH") from None
    fn: object = getattr(mod, fn_name, None)
    if not callable(fn):
        raise FormatError(f"{mod_name} has no function {fn_name!r} ({option('model', spec)})")
    return fn


def _describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype}{list(shape)}"


@dataclasses.dataclass
class GraphImport:
    """A graph rebuild, planned: what ``_pipe.transfer`` moves (``source`` through ``plan`` into
    ``sink``), and what the report adds (``dropped``, ``ema_swaps``, ``missing``, ``notes``)."""

    source: Source
    sink: Sink
    plan: Plan
    dropped: dict[str, str]
    ema_swaps: dict[str, str]
    missing: list[str]
    #: the block size the sink wants (rows for the Saver's placeholders), None for the default
    chunk_bytes: int | None
    #: what building or importing the graph had to do that the user should know
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Target:
    """The graph to write a checkpoint for: what its Saver saves, and how to name it in messages."""

    graph: Any
    saver: Any
    whole: dict[str, Any]  # checkpoint name -> variable
    parts: dict[str, list[Part]]  # checkpoint name -> the parts of a partitioned variable
    expected: dict[str, tuple[str, tuple[int, ...]]]  # checkpoint name -> (dtype, full shape)
    label: str  # "vgg_16", "the graph in train.meta"
    hint: str  # what to check when its variables and the archive's differ
    notes: list[str]


def plan_graph_import(
    src: Source,
    output_prefix: str,
    *,
    model: str | None = None,
    meta: str | None = None,
    plan: Plan,
    num_classes: int | None = None,
    allow_missing: bool = False,
    strict: bool = False,
    chunk_bytes: int | None = None,
    max_shard_bytes: int | None = None,
    engine: str = "auto",
    force: bool = False,
    image_size: int | None = None,
) -> GraphImport:
    """Build the graph (``model``) or import it (``meta``, a MetaGraphDef file), match it to ``src``
    through ``plan`` and choose its sink (see module docstring).

    ``plan`` says which of ``src``'s tensors feed which variable names (the filters,
    EMA and renames already applied).  ``engine`` "auto"/"native": the native writer
    beside the graph's ``.meta``; "tf": a session fed through placeholders and the
    Saver (``chunk_bytes`` applies to it alone; ``max_shard_bytes`` to the native writer alone).
    """
    tf = import_tensorflow()
    saver_path = engine == "tf"
    if chunk_bytes is not None and not saver_path:
        raise CkptBridgeError(f"{option('chunk_bytes')} sizes the slices fed to TensorFlow's Saver, which writes only with {option('engine', 'tf')}; "
                              "the native writer streams every tensor in bounded memory by itself")
    if max_shard_bytes is not None and saver_path:
        raise CkptBridgeError(f"{option('max_shard_bytes')} splits the native writer's output; TensorFlow's Saver writes one shard "
                              f"(leave out {option('engine', 'tf')} to use the native writer)")
    chunk = (64 << 20) if chunk_bytes is None else chunk_bytes
    if chunk <= 0:
        raise CkptBridgeError(f"{option('chunk_bytes')} must be positive, got {chunk} bytes")
    specs = dict(src.specs())
    if meta is not None:
        target = _imported_target(tf, meta)
    elif model is not None:
        target = _built_target(tf, model, num_classes, {dst: specs[s] for dst, s in plan.mapping.items()}, image_size)
    else:
        raise CkptBridgeError(f"a rebuild through a graph needs {option('model')} or {option('meta')}")
    return _plan_sink(tf, target, src, specs, output_prefix, plan=plan, allow_missing=allow_missing, strict=strict, chunk=chunk,
                      saver_path=saver_path, max_shard_bytes=max_shard_bytes, force=force)


def _built_target(tf: Any, model: str, num_classes: int | None, specs: dict[str, TensorSpec], image_size: int | None) -> _Target:
    graph, _, _ = build_net(model, num_classes, specs, image_size=image_size)
    with graph.as_default():
        variables = tf.compat.v1.global_variables()
        if not variables:
            raise CkptBridgeError(f"model {model} created no variables; a model function must build its variables in the default graph")
        saver = tf.compat.v1.train.Saver(var_list=variables, write_version=tf.compat.v1.train.SaverDef.V2)
    whole = {v.op.name: v for v in variables}
    expected = {n: (tf_dtype_name(v.dtype.base_dtype), tuple(int(x) for x in v.shape)) for n, v in whole.items()}
    return _Target(graph, saver, whole, {}, expected, model,
                   f"check {option('model')}/{option('num_classes')}", [])


def _imported_target(tf: Any, meta: str) -> _Target:
    from .metagraph import import_meta

    g = import_meta(tf, meta)
    return _Target(g.graph, g.saver, g.whole, g.parts, g.expected, f"the graph in {meta}",
                   "check that the archive holds a checkpoint of that graph", g.notes)


def _plan_sink(tf: Any, target: _Target, src: Source, specs: dict[str, TensorSpec], output_prefix: str, *, plan: Plan,
               allow_missing: bool, strict: bool, chunk: int, saver_path: bool, max_shard_bytes: int | None,
               force: bool) -> GraphImport:
    """Match ``target``'s variables to ``plan`` (strictly, every difference named) and choose its sink."""
    from .graph_sinks import NativeGraphSink, SaverSink

    expected, label = target.expected, target.label
    missing = sorted(n for n in expected if n not in plan.mapping)
    unexpected = sorted(n for n in plan.mapping if n not in expected)
    if missing and not allow_missing:
        raise MismatchError(
            f"{len(missing)} variables of {label} are not in {src.path}: {_shown(missing)}; "
            f"{target.hint}, or pass {option('allow_missing', True)} to leave them at their initializer"
        )
    if unexpected and strict:
        raise MismatchError(f"{len(unexpected)} entries of {src.path} are not variables of {label}: {_shown(unexpected)} ({option('strict', True)})")
    bad = []
    for name in sorted(expected):
        if name not in plan.mapping:
            continue
        spec = specs[plan.mapping[name]]
        if (spec.dtype, spec.shape) != expected[name]:
            bad.append(f"{name}: graph {_describe(*expected[name])} vs archive {_describe(spec.dtype, spec.shape)}")
    if bad:
        more = "" if len(bad) <= 10 else f"; and {len(bad) - 10} more"
        raise MismatchError(f"{len(bad)} variables do not match {src.path}: " + "; ".join(bad[:10]) + more)
    dropped = dict(plan.dropped)
    for n in unexpected:
        dropped[n] = f"not a variable of {label}"
    mapping = {n: plan.mapping[n] for n in sorted(expected) if n in plan.mapping}
    swaps = {n: s for n, s in plan.ema_swaps.items() if n in mapping}
    missing_vars = [v for n in missing for v in ([target.whole[n]] if n in target.whole else [p[0] for p in target.parts[n]])]
    source = src
    sink: Sink
    if saver_path:
        sink = SaverSink(tf, target.graph, target.saver, {n: target.whole[n] for n in mapping if n in target.whole}, missing_vars,
                         output_prefix, force=force, chunk_bytes=chunk, parts={n: target.parts[n] for n in mapping if n in target.parts})
    else:
        if missing:
            # Variables the archive lacks keep their initial values: computed once, written like the rest.
            source = _WithInitial(src, _initial_values(tf, target, missing, missing_vars))
            mapping = dict(sorted({**mapping, **{n: _INITIAL + n for n in missing}}.items()))
        sink = NativeGraphSink(tf, target.graph, target.saver, expected, output_prefix, force=force, max_shard_bytes=max_shard_bytes)
    return GraphImport(source, sink, Plan(mapping, {}, {}), dropped, swaps, missing, chunk if saver_path else None, list(target.notes))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _initial_values(tf: Any, target: _Target, missing: list[str], variables: list[Any]) -> dict[str, np.ndarray]:
    """The initial values of the variables ``missing`` names (a partitioned one assembled from its parts)."""
    from .graph_sinks import session_config

    with target.graph.as_default(), tf.compat.v1.Session(graph=target.graph, config=session_config(tf)) as sess:
        sess.run(tf.compat.v1.variables_initializer(variables))
        initial: dict[str, np.ndarray] = {}
        for n in missing:
            if n in target.whole:
                initial[n] = np.asarray(sess.run(target.whole[n]))
                continue
            dtype, shape = target.expected[n]
            full = np.empty(shape, dtype=numpy_dtype(dtype))
            for var, offset in target.parts[n]:
                value = np.asarray(sess.run(var))
                full[tuple(slice(o, o + k) for o, k in zip(offset, value.shape))] = value
            initial[n] = full
    return initial


#: where :class:`_WithInitial` keeps the initial values of variables the archive lacks (no archive name starts with NUL)
_INITIAL = "\x00initial/"


class _WithInitial(SourceView):
    """``inner`` plus the initial values of the graph's variables it lacks, under :data:`_INITIAL` names."""

    def __init__(self, inner: Source, initial: dict[str, np.ndarray]) -> None:
        super().__init__(inner)
        self._initial = {_INITIAL + n: np.asarray(v) for n, v in initial.items()}
        self._specs = {**inner.specs(), **{n: TensorSpec(n, dtype_name(v.dtype), tuple(v.shape)) for n, v in self._initial.items()}}

    def specs(self) -> Mapping[str, TensorSpec]:
        return self._specs

    def read(self, name: str) -> np.ndarray:
        return self._initial[name] if name in self._initial else self._inner.read(name)

    def read_blocks(self, name: str, chunk_bytes: int) -> Any:
        return None if name in self._initial else self._inner.read_blocks(name, chunk_bytes)

    def checksum(self, name: str) -> int | None:
        return None if name in self._initial else self._inner.checksum(name)
