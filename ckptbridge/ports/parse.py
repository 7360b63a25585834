"""Reading port maps: the built-in ones in ``maps/``, or a TOML file by path, checked and expanded.

:func:`parse` checks a map document against format 1 (``docs/porting.md``) and
expands its templates into one :class:`~.model.Rule` per tensor; every problem
is listed in one :class:`~ckptbridge.errors.FormatError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import FormatError, NotFoundError
from .model import _SHOWN, CAVEAT_KINDS, FORMAT, TRANSFORMS, Added, Caveat, PortMap, Rule

MAPS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "maps")


def builtin() -> dict[str, str]:
    """Built-in map name -> its file (``torchvision:vgg16`` is ``maps/torchvision__vgg16.toml``)."""
    try:
        files = sorted(f for f in os.listdir(MAPS_DIR) if f.endswith(".toml"))
    except FileNotFoundError:
        return {}
    return {f[: -len(".toml")].replace("__", ":"): os.path.join(MAPS_DIR, f) for f in files}


def load(spec: str | PortMap) -> PortMap:
    """A built-in map by name, or a map file by path."""
    if isinstance(spec, PortMap):
        return spec
    maps = builtin()
    if spec in maps:
        return parse_file(maps[spec])
    if os.path.isfile(spec):
        return parse_file(spec)
    if os.path.exists(spec):
        raise FormatError(f"port map {spec} is not a regular file; give a TOML file")
    raise NotFoundError(f"no port map named {spec!r}: the built-in maps are {', '.join(maps) or 'none'}, or give the path of a map file")


def parse_file(path: str) -> PortMap:
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20 + 1)
    except OSError as e:
        raise NotFoundError(f"cannot read port map {path}: {e.strerror}") from None
    if len(raw) > 1 << 20:
        raise FormatError(f"port map {path} is larger than 1 MiB; a map is a small text file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FormatError(f"port map {path} is not valid TOML ({e})") from None
    return parse(doc, path)


class _Problems:
    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, what: str) -> None:
        if what not in self.items:
            self.items.append(what)

    def raise_if_any(self) -> None:
        if self.items:
            shown = "; ".join(self.items[:_SHOWN]) + (f"; and {len(self.items) - _SHOWN} more" if len(self.items) > _SHOWN else "")
            raise FormatError(f"port map {self.where} is not valid: {shown}")


def _keys(p: _Problems, table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for k in table:
        if k not in allowed:
            p.add(f"{where}: unknown key {k!r} (known: {', '.join(sorted(allowed))})")


def _str(p: _Problems, table: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    v = table.get(key)
    if v is None:
        if required:
            p.add(f"{where}: {key!r} is missing")
        return None
    if not isinstance(v, str) or not v:
        p.add(f"{where}: {key!r} must be a non-empty string")
        return None
    return v


def _int(p: _Problems, table: Mapping[str, Any], key: str, where: str) -> int | None:
    v = table.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        p.add(f"{where}: {key!r} must be a positive integer")
        return None
    return v


def _template(p: _Problems, name: str, tpl: Any) -> tuple[list[tuple[str, str, str, bool]], list[Added]]:
    """One template, checked once whether or not a scope uses it: its rules (key, to, transform,
    classes) and its added tensors (names relative to the scope)."""
    rules: list[tuple[str, str, str, bool]] = []
    adds: list[Added] = []
    if not isinstance(tpl, dict):
        p.add(f"templates.{name} must be a table")
        return rules, adds
    for key, r in tpl.items():
        tw = f"templates.{name}.{key}"
        if key == "add":
            if not isinstance(r, dict):
                p.add(f"{tw} must be a table")
                continue
            for leaf, a in r.items():
                added = _added(p, leaf, a, f"templates.{name}.add.{leaf}")
                if added is not None:
                    adds.append(added)
            continue
        rule = _template_rule(p, key, r, tw)
        if rule is not None:
            rules.append(rule)
    return rules, adds


def _added(p: _Problems, leaf: str, a: Any, aw: str) -> Added | None:
    """One entry of a template's ``add`` table (``aw`` names it), or None after saying what is wrong."""
    if not isinstance(a, dict):
        p.add(f"{aw} must be a table")
        return None
    _keys(p, a, {"fill", "like", "dtype", "shape", "check"}, aw)
    fill = a.get("fill")
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        p.add(f"{aw}: 'fill' must be a number")
        return None
    like, dtype, shape = a.get("like"), a.get("dtype"), a.get("shape")
    like_only = isinstance(like, str) and dtype is None and shape is None
    if not (like_only or (like is None and dtype is not None and shape is not None)):
        p.add(f"{aw}: give either 'like' (a destination tensor of the same scope) or both 'dtype' and 'shape'")
        return None
    if shape is not None and not (isinstance(shape, list) and all(_is_count(d, 0) for d in shape)):
        p.add(f"{aw}: 'shape' must be a list of non-negative integers")
        return None
    if dtype is not None:
        from .. import _dtypes

        if not isinstance(dtype, str) or dtype not in _dtypes.BY_NAME or _dtypes.BY_NAME[dtype].memory is None or dtype == "string":
            p.add(f"{aw}: {dtype!r} is not a numeric dtype ckptbridge carries")
            return None
    check = a.get("check", True)
    if not isinstance(check, bool):
        p.add(f"{aw}: 'check' must be true or false")
        return None
    return Added(leaf, float(fill), like, dtype, tuple(shape) if shape is not None else None, check)


def _is_count(v: Any, least: int) -> bool:
    """``v`` is an integer (not a bool) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _template_rule(p: _Problems, key: str, r: Any, tw: str) -> tuple[str, str, str, bool] | None:
    """One rule of a template (``tw`` names it): (key, to, transform, classes), or None."""
    if not isinstance(r, dict):
        p.add(f"{tw} must be a table {{ to = ..., transform = ... }}")
        return None
    _keys(p, r, {"to", "transform", "classes"}, tw)
    to = _str(p, r, "to", tw)
    transform = r.get("transform", "none")
    if transform not in TRANSFORMS:
        p.add(f"{tw}: transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
        return None
    if not isinstance(r.get("classes", False), bool):
        p.add(f"{tw}: 'classes' must be true or false")
        return None
    if to is None:
        return None
    return key, to, transform, bool(r.get("classes", False))


_TOP_LEVEL = {"format", "name", "net", "destination", "description", "image_size", "classes", "skip", "caveats", "templates", "scopes"}


def parse(doc: Mapping[str, Any], where: str) -> PortMap:
    """Check a map document and expand its templates into rules; every problem is listed."""
    p = _Problems(where)
    _keys(p, doc, _TOP_LEVEL, "top level")
    if type(doc.get("format")) is not int or doc.get("format") != FORMAT:
        p.add(f"'format' must be {FORMAT} (this ckptbridge reads format {FORMAT}), got {doc.get('format')!r}")
        p.raise_if_any()
    name = _str(p, doc, "name", "top level")
    net = _str(p, doc, "net", "top level")
    destination = _str(p, doc, "destination", "top level")
    description = doc.get("description", "")
    if not isinstance(description, str):
        p.add("top level: 'description' must be a string")
        description = ""
    image_size = _int(p, doc, "image_size", "top level")
    src_classes, dst_classes = _classes(p, doc)
    skip = _skip(p, doc)
    caveats = _caveats(p, doc)
    templates = doc.get("templates", {})
    if not isinstance(templates, dict):
        p.add("'templates' must be a table of tables")
        templates = {}
    parsed = {name: _template(p, name, tpl) for name, tpl in templates.items()}
    rules, added = _scopes(p, doc, parsed)
    _duplicates(p, rules, added)
    p.raise_if_any()
    assert name and net and destination and image_size and src_classes and dst_classes  # checked above
    return PortMap(name, net, destination, description, image_size, src_classes, dst_classes, tuple(skip), tuple(caveats),
                   tuple(rules), tuple(added), where)


def _classes(p: _Problems, doc: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The ``classes`` table: (source, destination) class counts, None where a problem was said."""
    classes = doc.get("classes")
    if not isinstance(classes, dict):
        p.add("'classes' must be a table { source = N, destination = M }")
        return None, None
    _keys(p, classes, {"source", "destination"}, "classes")
    src_classes, dst_classes = _int(p, classes, "source", "classes"), _int(p, classes, "destination", "classes")
    if src_classes and dst_classes and src_classes not in (dst_classes, dst_classes + 1):
        p.add(f"classes: source {src_classes} must equal destination {dst_classes}, or be one more (TensorFlow's background class)")
    return src_classes, dst_classes


def _skip(p: _Problems, doc: Mapping[str, Any]) -> list[str]:
    """The ``skip`` list of regular expressions, each checked to compile."""
    skip = doc.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        p.add("'skip' must be a list of regular expressions")
        skip = []
    for s in skip:
        try:
            re.compile(s)
        except re.error as e:
            p.add(f"skip: {s!r} is not a valid regular expression ({e})")
    return skip


def _caveats(p: _Problems, doc: Mapping[str, Any]) -> list[Caveat]:
    """The ``caveats`` array: the well-formed ones (the others are problems)."""
    caveats = []
    for i, c in enumerate(doc.get("caveats", [])):
        w = f"caveats[{i}]"
        if not isinstance(c, dict):
            p.add(f"{w} must be a table")
            continue
        _keys(p, c, {"kind", "text", "fix"}, w)
        kind, text, fix = _str(p, c, "kind", w), _str(p, c, "text", w), _str(p, c, "fix", w, required=False)
        if kind is not None and kind not in CAVEAT_KINDS:
            p.add(f"{w}: kind {kind!r} is not one of {', '.join(CAVEAT_KINDS)}")
        if kind and text:
            caveats.append(Caveat(kind, text, fix))
    return caveats


_Template = tuple[list[tuple[str, str, str, bool]], list[Added]]


def _scopes(p: _Problems, doc: Mapping[str, Any], parsed: dict[str, _Template]) -> tuple[list[Rule], list[Added]]:
    """The ``scopes`` array, each scope's template expanded: every rule and added tensor, with full names."""
    rules: list[Rule] = []
    added: list[Added] = []
    scopes = doc.get("scopes", [])
    if not isinstance(scopes, list) or not scopes:
        p.add("'scopes' must be a non-empty array of tables")
        scopes = []
    for i, s in enumerate(scopes):
        w = f"scopes[{i}]"
        if not isinstance(s, dict):
            p.add(f"{w} must be a table")
            continue
        _keys(p, s, {"from", "to", "template", "kernel", "repeat", "counters"}, w)
        src, dst, tname = _str(p, s, "from", w), s.get("to"), _str(p, s, "template", w)
        if not isinstance(dst, str):
            p.add(f"{w}: 'to' must be a string (empty for the top level)")
            continue
        kernel = s.get("kernel", [1, 1])
        if not (isinstance(kernel, list) and len(kernel) == 2 and all(_is_count(k, 1) for k in kernel)):
            p.add(f"{w}: 'kernel' must be [H, W], two positive integers")
            kernel = [1, 1]
        counts = _repeat(p, s, w, [x for x in (src, dst) if x is not None])
        counters = _counters(p, s, w)
        if src is None or tname is None or counts is None or counters is None:
            continue
        if tname not in parsed:
            p.add(f"{w}: no template named {tname!r}")
            continue
        _unused_counters(p, w, tname, parsed[tname], counters)
        for n in counts:
            r, a = _expand(parsed[tname], _counted(src, n), _counted(dst, n), (kernel[0], kernel[1]))
            values = {name: start + step * (n - counts[0] if n is not None and counts[0] is not None else 0)
                      for name, (start, step) in counters.items()}
            if n is not None:
                values["i"] = n
            rules += [dataclasses.replace(x, dest=_numbered(p, w, tname, x.dest, values)) for x in r]
            added += [dataclasses.replace(x, dest=_numbered(p, w, tname, x.dest, values),
                                          like=_numbered(p, w, tname, x.like, values) if x.like is not None else None) for x in a]
    return rules, added


#: ``{name}``, ``{name+K}``, ``{name-K}`` in a template's destination names: a scope's counter (or ``i``)
_NUMBERED = re.compile(r"\{([a-z][a-z0-9_]*)(?:([+-])(\d+))?\}")


def _counters(p: _Problems, s: Mapping[str, Any], w: str) -> dict[str, tuple[int, int]] | None:
    """A scope's ``counters = { name = [first, step] }`` (or ``name = N``: the same on every pass), which
    number its template's destination names: ``{name}`` is ``first`` on the first pass and grows by ``step``
    on each further one.  Keras numbers its layers per class in model order (``conv2d_15``), so a unit
    repeated across a stage needs numbers that grow by the unit's layer count, from where the stage starts."""
    raw = s.get("counters", {})
    if not isinstance(raw, dict):
        p.add(f"{w}: 'counters' must be a table {{ name = [first, step] }}")
        return None
    out: dict[str, tuple[int, int]] = {}
    for name, v in raw.items():
        if name == "i" or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            p.add(f"{w}: counter {name!r} must be a lower-case name other than 'i' (the repeat's own count)")
        elif _is_count(v, 0):
            out[name] = (v, 0)
        elif isinstance(v, list) and len(v) == 2 and all(_is_count(k, 0) for k in v):
            out[name] = (v[0], v[1])
        else:
            p.add(f"{w}: counter {name!r} must be [first, step], two non-negative integers, or one")
    return out if len(out) == len(raw) else None


def _unused_counters(p: _Problems, w: str, tname: str, tpl: _Template, counters: Mapping[str, tuple[int, int]]) -> None:
    """A counter the template never names is a typo or a stale line: say so."""
    used = {m.group(1) for _, to, _, _ in tpl[0] for m in _NUMBERED.finditer(to)}
    used |= {m.group(1) for a in tpl[1] for t in (a.dest, a.like or "") for m in _NUMBERED.finditer(t)}
    for name in sorted(set(counters) - used):
        p.add(f"{w}: counter {name!r} is not named by template {tname!r}")


def _numbered(p: _Problems, w: str, tname: str, text: str, values: Mapping[str, int]) -> str:
    """``text`` with each ``{name}`` (``{name+K}``, ``{name-K}``) replaced by the counter's value this pass."""

    def one(m: re.Match[str]) -> str:
        name, sign, k = m.group(1), m.group(2), int(m.group(3) or 0)
        if name not in values:
            p.add(f"{w}: template {tname!r} names {{{name}}}, which this scope does not count "
                  f"(give counters = {{ {name} = [first, step] }}{', or repeat' if name == 'i' else ''})")
            return m.group(0)
        n = values[name] - k if sign == "-" else values[name] + k
        if n < 0:
            p.add(f"{w}: {text!r} counts below 0 ({name} = {values[name]})")
        return str(n)

    return _NUMBERED.sub(one, text)


#: ``{i}``, ``{i+K}``, ``{i-K}`` in a repeated scope's ``from`` and ``to``
_COUNTER = re.compile(r"\{i(?:([+-])(\d+))?\}")


def _counted(text: str, n: int | None) -> str:
    """``text`` with each ``{i}`` (``{i+K}``, ``{i-K}``) replaced by ``n`` (plus or minus K); as it is for a scope that does not repeat."""
    if n is None:
        return text
    return _COUNTER.sub(lambda m: str(n + (int(m.group(2)) if m.group(1) == "+" else -int(m.group(2)) if m.group(1) else 0)), text)


def _repeat(p: _Problems, s: Mapping[str, Any], w: str, texts: list[str]) -> list[int | None] | None:
    """The counts a scope is expanded for: ``repeat = [first, last]`` (both included), or one pass
    (``[None]``) for a scope without it; None after saying what is wrong."""
    placeholders = any(_COUNTER.search(t) for t in texts)
    if "repeat" not in s:
        if placeholders:
            p.add(f"{w}: '{{i}}' in 'from' or 'to' needs 'repeat = [first, last]'")
            return None
        return [None]
    rep = s["repeat"]
    if not (isinstance(rep, list) and len(rep) == 2 and all(_is_count(k, 0) for k in rep) and rep[0] <= rep[1]):
        p.add(f"{w}: 'repeat' must be [first, last], two non-negative integers, first <= last")
        return None
    if not placeholders:
        p.add(f"{w}: 'repeat' needs '{{i}}' in 'from' or 'to' (else every pass gives the same names)")
        return None
    for t in texts:
        if "{i" in _COUNTER.sub("", t):
            p.add(f"{w}: {t!r} has a placeholder other than {{i}}, {{i+K}}, {{i-K}}")
            return None
        if any(m.group(1) == "-" and rep[0] < int(m.group(2)) for m in _COUNTER.finditer(t)):
            p.add(f"{w}: {t!r} would count below 0 from i = {rep[0]}")
            return None
    return list(range(rep[0], rep[1] + 1))


def _expand(tpl: _Template, src: str, dst: str, kernel: tuple[int, int]) -> tuple[list[Rule], list[Added]]:
    """One template applied to one slim scope ``src`` and destination prefix ``dst``."""

    def join(leaf: str) -> str:
        return f"{dst}.{leaf}" if dst else leaf

    tpl_rules, tpl_adds = tpl
    rules = [Rule(f"{src}/{key}", join(to), transform, classes, kernel) for key, to, transform, classes in tpl_rules]
    added = [dataclasses.replace(a, dest=join(a.dest), like=join(a.like) if a.like is not None else None) for a in tpl_adds]
    return rules, added


def _duplicates(p: _Problems, rules: list[Rule], added: list[Added]) -> None:
    """Each source tensor used once, each destination tensor produced once, each ``like`` produced by a rule."""
    seen_src: dict[str, int] = {}
    seen_dst: dict[str, int] = {}
    for r in rules:
        seen_src[r.source] = seen_src.get(r.source, 0) + 1
        seen_dst[r.dest] = seen_dst.get(r.dest, 0) + 1
    for a in added:
        seen_dst[a.dest] = seen_dst.get(a.dest, 0) + 1
        if a.like is not None and a.like not in {r.dest for r in rules}:
            p.add(f"added {a.dest}: 'like' names {a.like}, which no rule produces")
    for n, k in seen_src.items():
        if k > 1:
            p.add(f"source tensor {n} is used by {k} rules")
    for n, k in seen_dst.items():
        if k > 1:
            p.add(f"destination tensor {n} is produced {k} times")

