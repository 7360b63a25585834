"""The command line.  The only place that prints or exits."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import CkptBridgeError, FormatError, NotFoundError
from .io.signals import Terminated

PROG = "ckptbridge"
#: Exit status when stdout or stderr is a pipe whose reader has gone (``ckptbridge ls X | head -1``):
#: 128 + SIGPIPE, what a shell reports for ``cat``, ``ls`` and ``yes`` in the same pipe.
EXIT_BROKEN_PIPE = 141


class _Deferred:
    """A module imported on first use.

    ``_api`` brings in NumPy, h5py and the rest (0.7 s).  :func:`main` installs
    its signal handlers first and touches ``_api`` only then, so a Ctrl-C during
    that import ends as any other does: one line and exit 130, not a traceback.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name, __package__), attr)


if TYPE_CHECKING:
    from . import _api
else:
    _api = _Deferred("._api")


# SIGTERM's exception, and the handler, live in _signals (the standard library only): ``python -m ckptbridge``
# installs the handler before this module is imported.
_Terminated = Terminated


def _err(msg: str) -> None:
    print(f"{PROG}: error: {' '.join(msg.split())}", file=sys.stderr)


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.quiet else None  # None: only when stderr is a terminal


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _report_plan(args: argparse.Namespace, report: Any) -> None:
    for name, why in report.dropped.items():
        _say(args, f"dropped {name}: {why}")
    for name, src in report.ema_swaps.items():
        _say(args, f"ema: {name} <- {src}")
    for name in getattr(report, "missing", []):
        _say(args, f"missing from archive, left at its initializer: {name}")
    for old, new in getattr(report, "renamed", {}).items():
        _say(args, f"renamed {old} -> {new}")
    for name, what in getattr(report, "layout", {}).items():
        _say(args, f"layout {name}: {what}")
    if getattr(report, "object_graph", None):
        _say(args, f"TF2 object graph {report.object_graph}")
    for name, what in getattr(report, "added", {}).items():
        _say(args, f"added {name}: {what}")
    for line in getattr(report, "notes", []):
        _say(args, f"note: {_shown(line)}")
    for line in getattr(report, "caveats", []):
        if not args.quiet:  # shown by default, not only in the report: no weight fixes them
            print(f"{PROG}: caveat of port map {report.port}: {line}", file=sys.stderr)


def _print_dry_run(report: Any, where: str) -> None:
    """--dry-run: the whole plan on stdout (even with --quiet), nothing written."""
    renamed = report.renamed
    back = {new: old for old, new in renamed.items()}
    for name in report.written:
        if name not in report.added:  # shown on their "add" line: no source tensor became them
            print(f"{back.get(name, name)} -> {name}")
    for name, why in report.dropped.items():
        print(f"drop {name}: {why}")
    for name, src in report.ema_swaps.items():
        print(f"ema: {name} <- {src}")
    for name, what in report.layout.items():
        print(f"layout {name}: {what}")
    for name, what in report.added.items():
        print(f"add {name}: {what}")
    for line in report.caveats:
        print(f"caveat: {line}")
    for line in report.notes:
        print(f"note: {_shown(line)}")
    print(f"dry run: would write {len(report.written)} tensors ({_human(report.nbytes)}) to {where}; nothing was written")


def _load_rename_file(path: str) -> dict[str, str]:
    """Read a ``--rename-file``: a JSON object mapping exact old names to new ones."""
    import json
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            raise FormatError(f"--rename-file {path} is not a regular file; give a JSON file")
    except FileNotFoundError:
        pass  # reported by the open below
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise NotFoundError(f"--rename-file {path}: no such file") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"--rename-file {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise FormatError(f"--rename-file {path} must hold one JSON object of strings, old name -> new name")
    return doc


def _bytes(value: float | None, unit: int, option: str) -> int | None:
    """An option given in MB or GB, as the byte count the library takes (positive); None: not given."""
    return None if value is None else _positive_bytes(value, unit, option)


def _positive_bytes(value: float, unit: int, option: str) -> int:
    if not value > 0:
        raise CkptBridgeError(f"{option} must be positive, got {value}")
    return int(value * unit)


def _max_tensor(args: argparse.Namespace) -> int:
    return _positive_bytes(args.max_tensor_gb, 1 << 30, "--max-tensor-gb")  # its default is set on every command that reads


def _shown(name: str) -> str:
    """A name as it may be printed: control characters escaped, so a crafted name cannot rewrite the terminal."""
    def ok(c: str) -> bool:
        o = ord(c)
        return 0x20 <= o < 0x7F or (o >= 0xA0 and not 0xD800 <= o < 0xE000)  # surrogates: bytes that were not UTF-8

    if name.isascii() and name.isprintable():  # the usual name, at once: for ASCII the same test as ok()
        return name
    if all(ok(c) for c in name):
        return name
    return "".join(c if ok(c) else f"\\x{ord(c) & 0xFF:02x}" if ord(c) < 0x100 or 0xDC80 <= ord(c) < 0xDD00 else f"\\u{ord(c):04x}"
                   for c in name)


def cmd_ls(args: argparse.Namespace) -> int:
    with _api.read(args.path, engine=args.engine, names=args.names, max_tensor_bytes=_max_tensor(args), member=args.member) as r:
        carried = r.specs
        opaque = r.uncarried
        specs = sorted([*carried.values(), *opaque.values()], key=lambda s: s.name.encode("utf-8", "surrogateescape"))
        keys = _original_names(r.metadata())  # readable name -> the checkpoint key (or the name it was exported from)
        sizes = [s.size_on_disk for s in specs]
        known = sum(n for n in sizes if n is not None)
        if args.json:
            doc = {
                "path": r.path,
                "kind": r.kind,
                "tensors": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bytes": n, "carried": s.name not in opaque,
                             **({"original_name": keys[s.name]} if s.name in keys else {})}
                            for s, n in zip(specs, sizes)],
                "total_tensors": len(specs),
                "total_bytes": known,
            }
            if opaque:
                doc["uncarried"] = sorted(opaque)
            if r.notes:
                doc["notes"] = r.notes
            print(json.dumps(doc, indent=2))
            return 0
        names = [_shown(s.name) for s in specs]
        width = max((len(n) for n in names), default=4)
        dwidth = max([10, *(len(s.dtype) for s in specs)])
        rows = []
        for s, name, n in zip(specs, names, sizes):
            note = "  (not carried)" if s.name in opaque else ""
            if s.name in keys:
                note += f"  <- {_shown(keys[s.name])}"
            rows.append(f"{name:<{width}}  {s.dtype:<{dwidth}} {str(list(s.shape)):<22} {'?' if n is None else n:>12}{note}\n")
        sys.stdout.write("".join(rows))  # one write, not one per tensor (stdout may be unbuffered)
        line = f"{len(specs)} tensors, {known} bytes ({_human(known)})"
        unknown = sum(1 for n in sizes if n is None)
        if unknown:
            line += f"; {unknown} string tensor(s) of unknown size not counted (the native engine knows their size)"
        if opaque:
            line += (f"; {len(opaque)} of a dtype ckptbridge cannot carry ({', '.join(sorted({s.dtype for s in opaque.values()}))}): "
                     "export refuses them unless excluded")
        print(f"{line} [read as {r.kind}]")
        names_note = r.metadata().get("names_note")
        if isinstance(names_note, str):
            print(f"names: {_shown(names_note)}")
        for line in r.notes:
            print(f"note: {_shown(line)}")
    return 0


def _original_names(doc: dict[str, Any]) -> dict[str, str]:
    """A source's record of each renamed tensor's original name, where it is readable (``ls`` only shows it)."""
    rec = doc.get("original_names")
    if not isinstance(rec, dict):
        return {}
    return {k: v for k, v in rec.items() if isinstance(k, str) and isinstance(v, str)}


def _read(args: argparse.Namespace, member: str | None) -> _api.ReadOptions:
    """The reading options of a command's source."""
    return _api.ReadOptions(engine=args.engine, names=args.names, member=member, max_tensor_bytes=_max_tensor(args))


def _select(args: argparse.Namespace) -> _api.Select:
    return _api.Select(include=args.include, exclude=args.exclude, weights_only=getattr(args, "weights_only", False), use_ema=args.use_ema)


def _rename(args: argparse.Namespace, exact: dict[str, str] | None) -> _api.Rename:
    from .pipe.names import parse_rename

    rules = [parse_rename(r) for r in args.rename]  # REGEX=REPLACEMENT, split at the last '=': its messages name the rule
    return _api.Rename(rules=[(r.pattern.pattern, r.replacement) for r in rules], exact=exact,
                       original_names=getattr(args, "original_names", False))


def _refuse_with_port(**options: Any) -> None:
    """Options that a port map decides by itself are errors beside it, never ignored."""
    from .errors import option

    given = [option(k) for k, v in options.items() if v]
    if given:
        raise CkptBridgeError(f"{', '.join(given)} cannot be combined with {option('port')}: the port map decides every name, "
                              "layout and class; leave them out, or write your own map")


def _export_naming(args: argparse.Namespace) -> _api.Naming | _api.Port:
    """The names an export writes, from its options (``export``'s and ``archive``'s, which are the same)."""
    from .errors import option

    exact = _load_rename_file(args.rename_file) if args.rename_file else None
    port = _port(args)
    if port is not None:
        _refuse_with_port(rename=args.rename, rename_map=exact, layout=args.layout, model=args.model, num_classes=args.num_classes,
                          include=args.include, exclude=args.exclude, weights_only=args.weights_only, use_ema=args.use_ema)
        return _api.Port(port)
    if args.model is not None and args.layout is None:
        raise FormatError(f"{option('model')} on export only tells {option('layout')} which tensors are conv, depthwise or dense; "
                          f"add {option('layout', 'torch')}")
    layout = None if args.layout is None else _api.Layout(args.layout, model=args.model, num_classes=args.num_classes)
    return _api.Naming(_select(args), _rename(args, exact), layout)


def cmd_export(args: argparse.Namespace) -> int:
    naming = _export_naming(args)
    report = _api.export(
        args.checkpoint, args.output, naming, read=_read(args, args.member), compress=args.compress, force=args.force,
        progress=_progress(args), dry_run=args.dry_run, fsync=args.fsync, scratch_dir=args.scratch_dir,
    )
    if report.dry_run:
        _print_dry_run(report, report.output)
        return 0
    _report_plan(args, report)
    uploaded = f" ({_human(report.size or 0)} uploaded and checked, {report.checksum})" if report.checksum else ""
    _say(args, f"wrote {len(report.written)} tensors ({_human(report.nbytes)}) to {report.output}{uploaded}")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise CkptBridgeError(f"--jobs must be at least 1, got {args.jobs}; give a number of processes")
    from . import _archive
    from ._options import Workers

    sources, dest = args.sources, args.dest
    counts = {"done": 0}

    def said(entry: Any) -> None:
        if entry.status == "failed":
            print(f"{PROG}: failed: {_shown(entry.source)}: {_shown(entry.error or '')}", file=sys.stderr)
        elif entry.status == "incomplete":
            _say(args, f"incomplete, skipped: {_shown(entry.source)}: {_shown(entry.error or '')}")
        elif entry.status == "done":
            counts["done"] += 1
            _say(args, f"wrote {_shown(entry.output)} ({entry.tensors} tensors, {_human(entry.nbytes)})")

    try:
        report = _archive.archive(sources, dest, _export_naming(args), format=args.format, read=_read(args, None), compress=args.compress,
                              force=args.force, workers=Workers(jobs=args.jobs, scheduler=args.scheduler), progress=_progress(args),
                              fsync=args.fsync, dry_run=args.dry_run, on_entry=said)
    except (KeyboardInterrupt, _Terminated) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated by SIGTERM"
        _err(f"{what} after {counts['done']} checkpoint(s) archived; every output at {dest} is whole and the manifest "
             "lists those done: run the command again to finish")
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    if args.dry_run:
        for entry in report.todo:
            print(f"{entry.source} -> {entry.output}")
        print(f"dry run: would archive {len(report.todo)}, {len(report.skipped)} up to date, {len(report.incomplete)} incomplete; "
              "nothing was written")
        return 0
    line = (f"archived {len(report.done)}, skipped {len(report.skipped)} up to date, {len(report.incomplete)} incomplete, "
            f"{len(report.failed)} failed; manifest {report.manifest}")
    if report.failed:
        print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    _say(args, line)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .errors import option

    exact = _load_rename_file(args.rename_file) if args.rename_file else None
    chunk_bytes = _bytes(args.chunk_mb, 1 << 20, "--chunk-mb")
    max_shard_bytes = _bytes(args.max_shard_mb, 1 << 20, "--max-shard-mb")
    read = _read(args, args.member)
    port = _port(args)
    if args.model is None and args.graph is None:
        # With a port map, --num-classes also says whether the checkpoint gets TensorFlow's background class back.
        given = [option(opt) for opt, value in (("chunk_bytes", chunk_bytes), ("num_classes", args.num_classes if port is None else None),
                                                ("image_size", args.image_size), ("allow_missing", args.allow_missing),
                                                ("strict", args.strict)) if value]
        if given:
            raise CkptBridgeError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to a rebuild through a graph; "
                                  f"add {option('model')} or {option('meta')}, or leave them out")
    naming: _api.Naming | _api.Port
    if port is not None:
        _refuse_with_port(rename=args.rename, rename_map=exact, original_names=args.original_names, include=args.include,
                          exclude=args.exclude, use_ema=args.use_ema)
        naming = _api.Port(port, num_classes=args.num_classes)
    else:
        naming = _api.Naming(_select(args), _rename(args, exact))
    graph = None
    if args.model is not None or args.graph is not None:
        # With --graph and --from, --num-classes is the port's alone: the graph in a .meta is built already.
        classes = None if args.graph is not None and port is not None else args.num_classes
        graph = _api.Graph(args.model, num_classes=classes, image_size=args.image_size, allow_missing=args.allow_missing,
                           strict=args.strict, chunk_bytes=chunk_bytes, meta=args.graph)
    report = _api.rebuild(
        args.archive, args.output_prefix, naming, graph=graph, read=read, engine=args.engine, max_shard_bytes=max_shard_bytes,
        force=args.force, progress=_progress(args), dry_run=args.dry_run, fsync=args.fsync,
    )
    if report.dry_run:
        _print_dry_run(report, f"checkpoint {report.output}")
        return 0
    _report_plan(args, report)
    _say(args, f"wrote {len(report.written)} tensors ({_human(report.nbytes)}) to checkpoint {report.output}")
    return 0


def _port(args: argparse.Namespace) -> str | None:
    if args.port is not None and args.map_file is not None:
        flag = "--to" if args.command in ("export", "archive") else "--from"
        raise CkptBridgeError(f"give either {flag} or --map, not both (--map FILE is {flag} with your own map)")
    if args.map_file is not None and not os.path.isfile(args.map_file):
        raise NotFoundError(f"port map {args.map_file}: no such file")
    port: str | None = args.map_file if args.map_file is not None else args.port
    return port


def cmd_maps(args: argparse.Namespace) -> int:
    maps = _api.port_maps()
    if args.json:
        print(json.dumps([{"name": m.name, "net": m.net, "destination": m.destination, "description": m.description,
                           "image_size": m.image_size, "classes": {"source": m.source_classes, "destination": m.dest_classes},
                           "caveats": [{"kind": c.kind, "text": c.text, "fix": c.fix} for c in m.caveats]}
                          for m in maps.values()], indent=2))
        return 0
    for m in maps.values():
        classes = (f"{m.source_classes} -> {m.dest_classes} classes (background class dropped)"
                   if m.source_classes != m.dest_classes else f"{m.dest_classes} classes")
        print(f"{m.name}\n  net:         {m.net} (tf-slim)\n  destination: {m.destination}\n  {classes}, {m.image_size}x{m.image_size} input")
        for c in m.caveats:
            print(f"  caveat ({c.kind}): {c.text}")
        if not m.caveats:
            print("  no architecture differences: the destination computes what the tf-slim net computes")
    print(f"{len(maps)} built-in maps; pass your own with --map FILE (docs/porting.md)")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    d = _api.diff(args.a, args.b, atol=args.atol, rtol=args.rtol, read=_read(args, args.member_a), read_b=_read(args, args.member_b),
                  progress=_progress(args), graphs=not args.tensors_only)
    for n in d.only_a:
        print(f"only in A: {n}")
    for n in d.only_b:
        print(f"only in B: {n}")
    for n, (sa, sb) in d.spec_diffs.items():
        print(f"differs: {n}: {sa.describe()} vs {sb.describe()}")
    for n, (count, mx) in d.value_diffs.items():
        extra = "" if mx is None else f", max abs diff {mx:.6g}"
        print(f"values differ: {n}: {count} elements{extra}")
    for n, dtype in d.raw_diffs.items():
        print(f"stored bytes differ: {n} ({dtype}, compared as stored bytes)")
    for line in d.graph_diffs:
        print(line)
    raw = f", {d.compared_raw} of a dtype ckptbridge does not carry, as stored bytes" if d.compared_raw else ""
    graph = "" if d.graph_objects is None else f" and the TF2 object graph ({d.graph_objects} objects)"
    if d.identical:
        print(f"identical: {d.compared} tensors" + (f" ({raw[2:]})" if raw else "") + graph)
        return 0
    print(f"different: {len(d.only_a)} only in A, {len(d.only_b)} only in B, {len(d.spec_diffs)} shape/dtype, "
          f"{len(d.value_diffs) + len(d.raw_diffs)} values ({d.compared} compared{raw})"
          + (f", {len(d.graph_diffs)} in the object graph" if d.graph_diffs else ""))
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    v = _api.verify(args.path, read=_read(args, args.member), progress=_progress(args))
    if not v.ok:
        print(f"BAD: {v.bad}: {v.message}")
        return 1
    note = "" if v.has_checksums else " (plain archive: no checksums recorded, only readability checked)"
    if v.checked_raw:
        note += f" ({v.checked_raw} of a dtype ckptbridge does not carry, checked as stored bytes)"
    print(f"ok: {v.checked} tensors{note}")
    return 0


def _add_max_tensor_gb(s: argparse.ArgumentParser) -> None:
    """The guard against memory bombs, the same option on every command that reads an archive."""
    s.add_argument("--max-tensor-gb", type=float, default=_api.DEFAULT_MAX_TENSOR_BYTES / (1 << 30),
                   help="refuse archive tensors claiming more than this (default 64)")


def _parser() -> argparse.ArgumentParser:
    from . import __version__, _engines, formats
    from .sources import _readable

    # Every format, suffix and engine named below comes from the two registries.
    sufs = formats.suffixes()
    shown = " / ".join(sufs)
    listed = ", ".join(sufs[:-1]) + f" or {sufs[-1]}" if len(sufs) > 1 else sufs[0]
    kinds = "\n".join(f"  {', '.join(f.suffixes):<22} {f.description}" for f in formats.FORMATS.values())
    compressing = " / ".join(f"{f.compression} ({', '.join(f.suffixes)})" for f in formats.FORMATS.values() if f.compression)
    p = argparse.ArgumentParser(prog=PROG, description=f"Convert TensorFlow (TF-Slim) checkpoints to {shown} archives and back, exactly.",
                                epilog=f"archive formats, chosen by suffix:\n{kinds}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", choices=_engines.choices(), default=_engines.AUTO, help=_engines.help_text())
    common.add_argument("--names", choices=_readable.CHOICES, default=_readable.AUTO,
                        help="a checkpoint's tensor names: auto (default): readable names for a SavedModel or TF-Hub directory, "
                             "the checkpoint's keys otherwise; readable: also a TF2 checkpoint's, from its object graph "
                             "(dense/kernel for model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE); keys: always the keys. "
                             "A renamed tensor's key is kept (ls shows it, an archive records it). On import: auto (default) writes each key "
                             "back, except for names a --rename changed and through --model; keys: always; readable: keeps the readable names")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no report")
    common.add_argument("--debug", action="store_true", help="show a traceback on errors")
    member = argparse.ArgumentParser(add_help=False)
    member.add_argument("--member", metavar="NAME", default=None,
                        help="the checkpoint inside a .tar/.tar.gz/.tgz/.zip that holds several (its prefix there, e.g. run/model.ckpt-100)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ls", parents=[common, member], help=f"list the tensors of a checkpoint or archive ({shown})")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _add_max_tensor_gb(s)
    s.set_defaults(func=cmd_ls)

    filt = argparse.ArgumentParser(add_help=False)
    filt.add_argument("--include", action="append", default=[], metavar="REGEX", help="keep only names matching (repeatable)")
    filt.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="drop names matching (repeatable)")
    filt.add_argument("--use-ema", action="store_true", help="give X the value of X/ExponentialMovingAverage")
    filt.add_argument("--force", action="store_true", help="overwrite an existing output")
    filt.add_argument("--rename", action="append", default=[], metavar="REGEX=REPLACEMENT",
                      help="rename tensors with re.sub, split at the last '=' (repeatable, applied in order, after the filters)")
    filt.add_argument("--rename-file", metavar="FILE", help="JSON object of exact names, old -> new (applied before --rename)")
    filt.add_argument("--dry-run", action="store_true", help="print old -> new names, what is dropped and the layout changes; write nothing")
    filt.add_argument("--no-fsync", dest="fsync", action="store_false",
                      help="skip the fsync before the output is renamed into place: as fast as the page cache, but a power "
                           "loss in the next half minute can leave it incomplete (the source is untouched)")

    exporting = argparse.ArgumentParser(add_help=False)  # export's own options; archive runs one export per checkpoint with them
    exporting.add_argument("--weights-only", action="store_true",
                           help="model weights only: drop optimizer slots, metric state, global_step and save_counter")
    exporting.add_argument("--compress", action="store_true", help=compressing)
    exporting.add_argument("--layout", choices=("torch",), default=None,
                           help="store conv/depthwise/dense kernels in PyTorch's layout (undone on import)")
    exporting.add_argument("--model", default=None, help="with --layout: the tf-slim net whose graph tells conv, depthwise and dense kernels apart")
    exporting.add_argument("--num-classes", type=int, default=None, help="with --model: classes of the net's logits")
    exporting.add_argument("--to", dest="port", metavar="MAP", default=None,
                           help="write the state_dict of another framework's model through a port map: a built-in map "
                                "(torchvision:vgg16, ...; see `ckptbridge maps`) or a map file")
    exporting.add_argument("--map", dest="map_file", metavar="FILE", default=None, help="your own port map file (instead of --to)")
    _add_max_tensor_gb(exporting)

    s = sub.add_parser("export", parents=[common, filt, member, exporting], help=f"checkpoint -> {shown}")
    s.add_argument("checkpoint", help="prefix, .index/.data file, directory, V1 .ckpt file, a .tar/.tar.gz/.tgz/.zip of one, or a URL")
    s.add_argument("output", help=f"output archive, its format chosen by suffix: {listed}")
    s.add_argument("--scratch-dir", metavar="DIR", default=None,
                   help="local temporary space: where an output at a URL is written and read back before its upload "
                        "(default: the system temp, TMPDIR)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("archive", parents=[common, filt, exporting],
                       help="many checkpoints -> archives below DEST, resumable (a manifest at DEST says what is done)",
                       description="Export every checkpoint under each SOURCE to DEST, mirroring their paths "
                                   "(runs/a/model.ckpt-1000 -> DEST/runs/a/model.ckpt-1000.h5). DEST/manifest.jsonl records each one; "
                                   "a re-run skips what is up to date and redoes what failed or changed. Exit 0: all archived "
                                   "or up to date; 1: some failed (each named); 2: bad arguments.")
    s.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="checkpoints, directories (walked: every model.ckpt-N, V1 file, SavedModel), globs or URL prefixes "
                        "(s3://bucket/runs/)")
    s.add_argument("dest", metavar="DEST", help="a local directory (created if missing) or a URL prefix")
    s.add_argument("--format", choices=[x[1:] for x in sufs], default="h5", help="the archives' format (default h5)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("-j", "--jobs", type=int, default=None, metavar="N", help="local processes (default: one per core)")
    where.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="run one task per checkpoint on the Dask cluster at ADDRESS (tcp://host:8786; needs ckptbridge[dask]); "
                            "give URLs for SOURCE and DEST unless every worker sees the same disk")
    s.set_defaults(func=cmd_archive)

    s = sub.add_parser("import", parents=[common, filt, member], help=f"archive ({shown}) -> checkpoint (through a tf-slim graph, or graph-free)")
    s.add_argument("archive", help=f"input archive: {listed}")
    s.add_argument("output_prefix", help="checkpoint prefix to write, e.g. out/model.ckpt")
    s.add_argument("--model", help="tf-slim net (vgg_16, resnet_v1_50, inception_v3, ...) or package.module:function")
    s.add_argument("--graph", metavar="GRAPH.meta", default=None,
                   help="instead of --model: a MetaGraphDef you have (a training job's .meta), imported as it is; the checkpoint "
                        "holds what its Saver saves, and OUTPUT_PREFIX.meta is that graph")
    s.add_argument("--num-classes", type=int, default=None,
                   help="classes of the net's logits (default: the archive's logits width, else the net's own); with --from, "
                        "the destination's count leaves out TensorFlow's background class, one more puts it back as zeros (the map's default)")
    s.add_argument("--image-size", type=int, default=None,
                   help="input size the net is built for (default: the net's own); inception_v3 names a layer after it")
    s.add_argument("--allow-missing", action="store_true", help="leave graph variables absent from the archive at their initializer")
    s.add_argument("--strict", action="store_true", help="archive entries the graph lacks are an error")
    s.add_argument("--original-names", action="store_true",
                   help="restore every tensor name recorded at export, undoing its --rename too (without it, only "
                        "the readable names --names gave go back to their checkpoint keys)")
    s.add_argument("--chunk-mb", type=float, default=None,
                   help="with --model or --graph, and --engine tf: feed variables larger than this to the Saver in row slices (default 64)")
    s.add_argument("--max-shard-mb", type=float, default=None, help="split the checkpoint into .data shards of at most this size")
    _add_max_tensor_gb(s)
    s.add_argument("--from", dest="port", metavar="MAP", default=None,
                   help="the archive is another framework's state_dict: read it back to tf-slim names through a port map "
                        "(torchvision:vgg16, ...; see `ckptbridge maps`) or a map file")
    s.add_argument("--map", dest="map_file", metavar="FILE", default=None, help="your own port map file (instead of --from)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("maps", help="list the built-in port maps: source net, destination model, caveats")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--debug", action="store_true", help="show a traceback on errors")
    s.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_maps)

    s = sub.add_parser("diff", parents=[common], help="compare two checkpoints or archives (exit 0 same, 1 different)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--atol", type=float, default=0.0)
    s.add_argument("--rtol", type=float, default=0.0)
    s.add_argument("--member-a", default=None, metavar="NAME", help="the checkpoint inside A where A is an archive of checkpoints holding several")
    s.add_argument("--member-b", default=None, metavar="NAME", help="the same for B")
    s.add_argument("--tensors-only", action="store_true", help="compare tensors only, not the TF2 object graphs")
    _add_max_tensor_gb(s)
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("verify", parents=[common, member], help="check every tensor's checksum (exit 0 good, 1 bad)")
    s.add_argument("path")
    _add_max_tensor_gb(s)
    s.set_defaults(func=cmd_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure becomes one ``ckptbridge: error:`` line and a status.

    Exit status: 0 success, 1 ``diff``/``verify`` found a difference or a bad
    tensor, 2 an error (the message says whether anything was written), 130
    SIGINT, 143 SIGTERM, and 141 without a message when the pipe it writes to
    was closed by its reader (``ckptbridge ls X | head -1``), as for ``cat``.
    """
    from .io import signals as _signals  # the standard library only: the handlers go in before NumPy & co. are imported

    old = _signals.install_cli_handlers() if _main_thread() else {}
    published_before = 0
    rc = 2
    try:
        # A signal from here to the command's body is recorded and raised as the body starts;
        # one after the body is reported below (see _signals.interruptible).
        from .io import atomic as _atomic

        published_before = len(_atomic.published_outputs())
        rc = _run(argv, published_before, len(_atomic.state_notes()))
    except BrokenPipeError:
        # The reader of our stdout (or stderr) has gone: stop quietly, as Unix tools do.
        # Outputs are whole or discarded as on any other exit (the sinks have unwound).
        _quiet_closed_pipes()
        rc = EXIT_BROKEN_PIPE
    finally:
        late = _signals.unreported()  # came outside the command's body: never raised through it
        # First free what a signal's traceback holds of the command (a sink it caught before
        # the converter could abort it, with an open HDF5 file), while its files are still
        # open; left to the interpreter's teardown, that prints "Error in sys.excepthook:"
        # after our one line (see _signals.release).
        _signals.release()
        try:
            from .io import atomic as _atomic

            _atomic.discard_pending()  # temporaries of a sink whose constructor was interrupted
        except BaseException:  # noqa: BLE001 - a signal recorded during the sweep: we are leaving anyway
            pass
        # This command's signal was its own: the next command of this process starts clean.
        _signals.reset()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if late is not None and rc != EXIT_BROKEN_PIPE:
        interrupted = isinstance(late, KeyboardInterrupt)
        _err(_stopped("interrupted" if interrupted else "terminated by SIGTERM", None, published_before))
        return 130 if interrupted else 143
    return rc


def _run(argv: Sequence[str] | None, published_before: int, notes_before: int) -> int:
    from .io.atomic import published_outputs, stale_notes, state_notes
    from .io.remote import is_url, redact
    from .io.signals import interruptible

    stale_before = len(stale_notes())

    args: argparse.Namespace | None = None
    dest: str | None = None

    def written() -> str:
        done = published_outputs()[published_before:]
        return f"{done[-1]} was written and is complete" if done else "nothing was written"

    try:
        with interruptible():  # a signal raises only in here; an error it caused is reported as the signal
            args = _parser().parse_args(argv)  # the first use of _api: a Ctrl-C in its import waits for it to end
            if "tensorflow" not in sys.modules:
                # This process's TensorFlow serves tf-slim's graph-mode layers, which come from tf-keras:
                # with tf.keras pointing there, importing TensorFlow skips loading Keras 3 (and the
                # matplotlib it pulls in where installed), 1-1.7 s of a rebuild on the benchmark VM.
                # An explicit TF_USE_LEGACY_KERAS in the environment wins.
                os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
            dest = getattr(args, "output", None) or getattr(args, "output_prefix", None)
            if dest is not None and is_url(dest):
                dest = redact(dest)  # what messages may show of it
            rc = int(args.func(args))
            _report_state(args, state_notes()[notes_before:])
            _report_stale(args, stale_notes()[stale_before:])
        return rc
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        _err(_stopped("interrupted", dest, published_before))
        return 130
    except _Terminated:
        _err(_stopped("terminated by SIGTERM", dest, published_before))
        return 143
    except CkptBridgeError as e:
        _debug(args)
        _err(e.render(lambda k, v: _flag(k, v, args)) + _how_to_fix(e, args))
        return 2
    except OSError as e:
        _debug(args)
        _err(_os_message(e, dest, written()))
        return 2
    except MemoryError:
        _debug(args)
        _err(f"out of memory{_writing(dest)}; {written()}, close other programs or use a machine with more memory")
        return 2
    except RecursionError as e:
        _debug(args)
        _err(f"internal error: {e}; {written()}, please report this with the output of --debug")
        return 2
    except Exception as e:  # noqa: BLE001 - the last resort: a bug, never a traceback unless asked
        _debug(args)
        _err(f"internal error: {type(e).__name__}: {e}; {written()}, please report this with the output of --debug")
        return 2


def _quiet_closed_pipes() -> None:
    """Point a stdout/stderr whose pipe has no reader at /dev/null (the Python docs'
    recipe), so the flush at exit cannot fail again and print a second error."""
    import select

    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not any(ev & select.POLLERR for _, ev in poller.poll(0)):
                continue
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except (AttributeError, ValueError, OSError):
            continue  # not a real file (redirected in-process): nothing will flush to a pipe


def _report_state(args: argparse.Namespace, notes: Sequence[Any]) -> None:
    """Say what a checkpoint import did with its directory's ``checkpoint`` state file."""
    for n in notes:
        base = os.path.basename(n.prefix) or n.prefix  # out/: a checkpoint with an empty base name
        if n.action == "created":
            _say(args, f"checkpoint state file {n.path} created: TensorFlow restores {base} from its directory")
        elif n.action == "updated":
            was = f" instead of {n.latest}" if n.latest else ""
            _say(args, f"checkpoint state file {n.path} updated: TensorFlow restores {base}{was}; "
                       f"{n.kept} earlier checkpoint(s) still listed")
        elif n.action == "left":
            now = f"TensorFlow still restores {n.latest}" if n.latest else "its content was not read"
            _say(args, f"checkpoint state file {n.path} left as it was ({now}); pass --force to make {base} the latest")


def _report_stale(args: argparse.Namespace, notes: Sequence[Any]) -> None:
    """Say which temporaries of earlier, killed runs were removed beside the output, and which were left and why."""
    removed = [n for n in notes if n.action == "removed"]
    if removed:
        many = len(removed) > 1
        names = ", ".join(_shown(os.path.basename(n.path)) for n in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        whose = "their processes are" if many else f"pid {removed[0].pid} is"
        what = "temporaries of earlier runs that were" if many else "temporary of an earlier run that was"
        _say(args, f"removed {len(removed)} {what} killed beside "
                   f"{_shown(removed[0].dest)} ({_human(sum(n.nbytes for n in removed))}; {whose} gone): {names}")
    for n in notes:
        if n.action == "left":
            _say(args, f"left {_shown(n.path)} ({_human(n.nbytes)}), a temporary of an earlier run beside {_shown(n.dest)}: {n.why}; "
                       "delete it once no ckptbridge is writing there")


# The flag for each option the library's messages name (errors.option), where it is not
# the keyword with dashes; sizes are given in other units on the command line.
_FLAGS = {"max_tensor_bytes": "--max-tensor-gb", "chunk_bytes": "--chunk-mb", "max_shard_bytes": "--max-shard-mb",
          "rename_map": "--rename-file", "meta": "--graph"}


def _flag(key: str, value: str | None, args: argparse.Namespace | None = None) -> str:
    """How the command line names an option: ``--force``, ``--engine tf``, ``--max-tensor-gb``."""
    if key == "port":
        if getattr(args, "map_file", None) is not None:
            return "--map"
        return {"export": "--to", "archive": "--to", "import": "--from"}.get(getattr(args, "command", None) or "", "--to/--from")
    flag = _FLAGS.get(key, "--" + key.replace("_", "-"))
    return flag if value in (None, "True") else f"{flag} {value}"


def _how_to_fix(e: CkptBridgeError, args: argparse.Namespace | None) -> str:
    """The option that gets past an error, where the library's message cannot name it."""
    import re
    import shlex

    from .errors import UncarriedDtypeError

    if isinstance(e, UncarriedDtypeError):
        command = getattr(args, "command", None)  # None: the error came while the command line was parsed
        if command in ("export", "import"):
            pats = " ".join(f"--exclude {shlex.quote('^' + re.escape(n) + '$')}" for n in list(e.tensors)[:3])
            return f" with {pats}" + (" ..." if len(e.tensors) > 3 else "")
        if command in ("diff", "verify"):
            return "; the native engine reads their stored bytes (V2 checkpoints: --engine native)"
    return ""


def _debug(args: argparse.Namespace | None) -> None:
    if getattr(args, "debug", False):
        traceback.print_exc()


def _stopped(what: str, dest: str | None, published_before: int = 0) -> str:
    from .io.atomic import published_outputs

    done = published_outputs()[published_before:]
    if done:
        # The signal came during or after the final rename: the output is whole.
        return f"{what} after {done[-1]} was written; it is complete"
    return f"{what}{_writing(dest)}; nothing was written, run the command again to finish"


def _writing(dest: str | None) -> str:
    return f" while writing {dest}" if dest else ""


def _os_message(e: OSError, dest: str | None = None, written: str = "nothing was written") -> str:
    """One line for an OSError that reached the CLI: what, which file, what was written, what to do."""
    import errno

    from .io.atomic import TMP_SUFFIX

    name = e.filename
    if dest and (not name or TMP_SUFFIX in str(name)):
        name = dest  # a temporary file means nothing to the user; the destination does
    where = f": {name}" if name else ""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return f"no space left on device{where}; {written}, free some space or choose another output location"
    if e.errno == errno.EFBIG:
        return f"file too large for this filesystem or the file-size limit (ulimit -f){where}; {written}, choose another location or raise the limit"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; {written}, check the permissions or choose another location"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; {written}, choose another output location"
    if e.errno == errno.EIO:
        return f"input/output error{where} (is the disk failing?); {written}, copy the file to a healthy disk and retry"
    return f"{e.strerror or e}{where}; {written}, check the path and retry"


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
