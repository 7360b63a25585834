"""The TensorFlow side of ``assign`` and ``init_fn``: what a target's variables are called, how a
planned source is matched to them (strictly), and the feeds that fill them.

A target is a ``tf.compat.v1.Session`` (its graph's global variables, or ``var_list``), the
default graph (``init_fn``), a TF2 ``tf.Module`` (tf_keras models are modules too), a Keras 3
model on the TensorFlow backend, or an iterable of ``tf.Variable``\\s.  Graph variables are named
by their op name (a partitioned variable by its full name, filled part by part); TF2 variables by
their name without ``:0``, and Keras 3 variables by their path (``block1_conv1/kernel``) and by the
path Keras 3's ``save_weights`` gives them (``layers/conv2d/vars/0``, what the ``keras:`` port maps name).

The match never reshapes or casts: a value of another shape or dtype is an error that names every
such variable with both sides, whatever its size.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import CkptBridgeError, FormatError, MismatchError, option
from ..pipe.names import Plan
from ..spec import TensorSpec
from .compat import import_tensorflow
from .engine import tf_dtype_name
from .feeds import EagerFeeds, Feeds, GraphFeeds, VarPart


@dataclasses.dataclass
class Target:
    """A target's variables by name: parts (graph variables) or one eager variable each."""

    label: str
    #: name -> (dtype name, full shape)
    specs: dict[str, tuple[str, tuple[int, ...]]]
    #: graph mode: name -> parts; eager: name -> [VarPart(variable)]
    parts: dict[str, list[VarPart]]
    #: another name a variable answers to -> its name (Keras 3's save_weights paths)
    aliases: dict[str, str]
    graph: Any = None
    session: Any = None

    @property
    def eager(self) -> bool:
        return self.graph is None


def _describe(dtype: str, shape: Sequence[int]) -> str:
    return f"{dtype}{list(shape)}"


def _shown(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- finding the variables -------------------------------------------------------------------------

def graph_target(graph: Any, var_list: Iterable[Any] | None, label: str, session: Any = None) -> Target:
    """The global variables of ``graph`` (or ``var_list``), by op name; partitioned ones by their full name."""
    tf = import_tensorflow()
    variables = list(var_list) if var_list is not None else graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
    parts: dict[str, list[VarPart]] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for v in variables:
        if not hasattr(v, "op") or v.graph is not graph:
            raise FormatError(f"var_list holds {type(v).__name__} {getattr(v, 'name', v)!r}, not a variable of the {label}'s graph")
        dtype = tf_dtype_name(v.dtype.base_dtype)
        shape = tuple(int(x) for x in v.shape)
        info = getattr(v, "_save_slice_info", None)
        if info is not None:  # one part of a partitioned variable: the checkpoint holds the whole under its full name
            name = info.full_name
            parts.setdefault(name, []).append(VarPart(v, tuple(int(x) for x in info.var_offset), shape))
            specs[name] = (dtype, tuple(int(x) for x in info.full_shape))
            continue
        name = v.op.name
        if name in parts:
            raise FormatError(f"var_list names the variable {name!r} twice")
        parts[name] = [VarPart(v, (0,) * len(shape), shape)]
        specs[name] = (dtype, shape)
    for p in parts.values():
        p.sort(key=lambda part: part.offset)
    if not parts:
        raise CkptBridgeError(f"the {label} has no variables to assign; build the model in its graph first, or pass var_list")
    return Target(label, specs, parts, {}, graph=graph, session=session)


def find_target(target: Any, var_list: Iterable[Any] | None) -> Target:
    """What ``assign`` was given, as a :class:`Target` (see the module docstring)."""
    tf = import_tensorflow()
    if isinstance(target, tf.compat.v1.Session):
        if target._closed:
            raise CkptBridgeError("the session is closed; assign into an open session")
        return graph_target(target.graph, var_list, "session", target)
    if var_list is not None:
        raise CkptBridgeError(f"{option('var_list')} chooses among a session's graph variables; for a {type(target).__name__}, "
                              "pass the variables themselves as the target")
    if not tf.executing_eagerly():
        raise CkptBridgeError(f"a {type(target).__name__} is assigned eagerly, and TensorFlow is in graph mode here; "
                              "pass the session (its graph's variables) instead")
    keras3 = _keras3_model(target)
    if keras3 is not None:
        return _keras3_target(tf, target, keras3)
    if isinstance(target, tf.Module):
        return _eager_target(tf, list(target.variables), f"{type(target).__name__} {target.name!r}")
    if isinstance(target, (str, bytes, Mapping)) or not isinstance(target, Iterable):
        raise FormatError(f"a target is a tf.compat.v1.Session, a tf.Module, a Keras model or an iterable of tf.Variables, "
                          f"got {type(target).__name__}")
    return _eager_target(tf, list(target), "variables")


def _eager_target(tf: Any, variables: list[Any], label: str) -> Target:
    parts: dict[str, list[VarPart]] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for v in variables:
        if not isinstance(v, tf.Variable):
            raise FormatError(f"the target holds a {type(v).__name__}, not a tf.Variable")
        name = v.name[:-2] if v.name.endswith(":0") else v.name
        _add_eager(parts, specs, name, v, label)
    if not parts:
        raise CkptBridgeError(f"the {label} has no variables to assign; build it (call it once) first")
    return Target(label, specs, parts, {})


def _add_eager(parts: dict[str, list[VarPart]], specs: dict[str, tuple[str, tuple[int, ...]]], name: str, var: Any, label: str) -> None:
    if name in parts:
        raise FormatError(f"two variables of the {label} are named {name!r}; give them distinct names to assign them by name")
    if not hasattr(var, "handle"):
        raise FormatError(f"variable {name!r} is not resource-backed; ckptbridge assigns TF2 (resource) variables eagerly")
    shape = tuple(int(x) for x in var.shape)
    parts[name] = [VarPart(var, (0,) * len(shape), shape)]
    specs[name] = (tf_dtype_name(var.dtype), shape)


def _keras3_model(target: Any) -> Any:
    """Keras 3's Layer class when ``target`` is one of its layers (a model), else None; imports nothing."""
    keras = sys.modules.get("keras")
    layer = getattr(getattr(keras, "layers", None), "Layer", None)
    if layer is None or not isinstance(target, layer):
        return None
    return layer


def _to_snake_case(name: str) -> str:
    """Keras 3's ``naming.to_snake_case``: how ``save_weights`` names a layer after its class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras3_target(tf: Any, model: Any, layer_class: Any) -> Target:
    """A Keras 3 model's variables by path, answering to their ``save_weights`` paths too."""
    label = f"Keras model {model.name!r}"
    parts: dict[str, list[VarPart]] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for w in model.weights:
        value = getattr(w, "value", None)
        if not isinstance(value, tf.Variable):
            raise CkptBridgeError(f"{label}: variable {w.path!r} is not a TensorFlow variable; ckptbridge assigns Keras 3 "
                                  "models on the TensorFlow backend (KERAS_BACKEND=tensorflow)")
        _add_eager(parts, specs, w.path, value, label)
    aliases: dict[str, str] = {}
    used: dict[str, int] = {}
    for layer in getattr(model, "layers", []):
        key = _to_snake_case(type(layer).__name__)  # counted per class in model order, as save_weights does
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        # the order of Layer.save_own_variables: trainable, then non-trainable
        own = list(getattr(layer, "_trainable_variables", [])) + list(getattr(layer, "_non_trainable_variables", []))
        for i, w in enumerate(own):
            if w.path in parts:
                aliases[f"layers/{key}/vars/{i}"] = w.path
    if not parts:
        raise CkptBridgeError(f"the {label} has no variables to assign; build it (call it once) first")
    return Target(label, specs, parts, aliases)


# --- matching ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Match:
    """A planned source matched to a target: what the pipe moves and what the report adds."""

    plan: Plan
    #: output name -> the target's parts it fills
    parts: dict[str, list[VarPart]]
    dropped: dict[str, str]
    missing: list[str]
    excluded: list[str]


def _excluded(name: str, scopes: Sequence[str]) -> bool:
    return any(name.startswith(s) for s in scopes)


def match(target: Target, plan: Plan, specs: Mapping[str, TensorSpec], where: str, *, exclude: Sequence[str] = (),
          allow_missing: bool = False, strict: bool = False) -> Match:
    """Match every planned tensor to a target variable, strictly (see the module docstring).

    ``exclude`` are scopes (name prefixes, as tf-slim's ``get_variables_to_restore``): the target's
    variables under them are left as they are, and the source's values for them are not read.
    """
    fed: dict[str, str] = {}  # target name -> output name
    unexpected: list[str] = []
    dropped: dict[str, str] = {}
    for out in plan.mapping:
        name = target.aliases.get(out, out)
        if name not in target.specs:
            unexpected.append(out)
        elif _excluded(name, exclude) or _excluded(out, exclude):
            dropped[out] = "its variable is excluded (exclude=)"
        else:
            fed[name] = out
    excluded = sorted(n for n in target.specs if _excluded(n, exclude))
    missing = sorted(n for n in target.specs if n not in fed and n not in excluded)
    if missing and not allow_missing:
        raise MismatchError(f"{len(missing)} variables of the {target.label} have no value in {where}: {_shown(missing)}; "
                            f"check the names (ckptbridge ls), or pass {option('allow_missing', True)} to leave them as they are")
    if unexpected and strict:
        raise MismatchError(f"{len(unexpected)} entries of {where} are not variables of the {target.label}: {_shown(unexpected)} "
                            f"({option('strict', True)})")
    bad = []
    for name, out in sorted(fed.items()):
        spec = specs[plan.mapping[out]]
        if (spec.dtype, spec.shape) != target.specs[name]:
            bad.append(f"{name}: variable {_describe(*target.specs[name])} vs {where} {_describe(spec.dtype, spec.shape)}")
    if bad:
        raise MismatchError(f"{len(bad)} variables of the {target.label} do not match {where} (nothing was assigned; "
                            "values are never reshaped or cast): " + "; ".join(bad))
    if not fed:
        raise MismatchError(f"no entry of {where} is a variable of the {target.label} (nothing was assigned): its names are like "
                            f"{_shown(sorted(plan.mapping), 3)}, the variables' like {_shown(sorted(target.specs), 3)}; "
                            f"check the names, or give {option('naming')} a Rename or a Port")
    for out in unexpected:
        dropped[out] = f"not a variable of the {target.label}"
    mapping = {out: plan.mapping[out] for out in sorted(fed.values())}
    swaps = {n: s for n, s in plan.ema_swaps.items() if n in mapping}
    parts = {out: target.parts[target.aliases.get(out, out)] for out in mapping}
    return Match(Plan(mapping, {**plan.dropped, **dropped}, swaps), parts, {**plan.dropped, **dropped}, missing, excluded)


def feeds_for(target: Target, m: Match, chunk_bytes: int) -> Feeds:
    """The feeds that fill ``m``'s variables: ops built in the target's graph now, or eager ones."""
    tf = import_tensorflow()
    if target.eager:
        return EagerFeeds(tf, {n: p[0].var for n, p in m.parts.items()}, chunk_bytes)
    if target.graph.finalized:
        raise CkptBridgeError(f"the {target.label}'s graph is finalized, so no feed can be added to it (a MonitoredTrainingSession's "
                              "is): make ckptbridge.init_fn(...) before it is finalized, and give it to the Scaffold")
    feeds = GraphFeeds(tf, target.graph, m.parts, chunk_bytes)
    feeds.session = target.session
    return feeds


def session_of(args: tuple[Any, ...], graph: Any) -> Any:
    """The session of ``fn(session)`` or ``fn(scaffold, session)``, checked to run ``graph``."""
    if len(args) not in (1, 2):
        raise CkptBridgeError(f"an init_fn is called as fn(session) or fn(scaffold, session), got {len(args)} arguments")
    session = args[-1]
    if not callable(getattr(session, "run", None)):
        raise FormatError(f"an init_fn is given a session, got {type(session).__name__}")
    if getattr(session, "graph", None) is not graph:
        raise CkptBridgeError("this init_fn was made in another graph than the session's; make it in the graph the session runs")
    return session

