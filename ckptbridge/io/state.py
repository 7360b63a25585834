"""The ``checkpoint`` state file of a checkpoint directory: read, check, write.

TensorFlow keeps a text-format ``CheckpointState`` proto beside its checkpoints;
``tf.train.latest_checkpoint`` restores the prefix its ``model_checkpoint_path``
names, and ``CheckpointManager`` prunes by ``all_model_checkpoint_paths``.  This
module parses the four fields that proto has (strictly: a malformed file is an
error that names it, never a guess) and writes them back in the same format.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat

from ..errors import FormatError
from .ckptfiles import STATE_NAME as STATE_NAME  # re-exported: the file names live in ckptfiles
from .ckptfiles import state_path as state_path

MAX_STATE_BYTES = 1 << 20  # TensorFlow's own files hold a few lines per checkpoint kept
#: how the state file names a checkpoint with an empty base name (``dir/.index``), see :func:`with_latest`
EMPTY_BASENAME = "./"

_STRING_FIELDS = ("model_checkpoint_path", "all_model_checkpoint_paths")
_FLOAT_FIELDS = ("all_model_checkpoint_timestamps", "last_preserved_timestamp")
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?|[-+]?(?:inf|nan|infinity)\b)
      | (?P<punct>[:;,])
    )""",
    re.X | re.I,
)
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, "'": 39, '"': 34, "?": 63}


@dataclasses.dataclass
class CheckpointState:
    """The fields of TensorFlow's ``CheckpointState`` proto."""

    model_checkpoint_path: str | None = None
    all_model_checkpoint_paths: list[str] = dataclasses.field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = dataclasses.field(default_factory=list)
    last_preserved_timestamp: float | None = None


def _unescape(body: str, where: str) -> str:
    """A C-escaped text-format string body (quotes removed) as a path string."""
    raw = body.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c != 0x5C:  # backslash
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(raw):
            raise FormatError(f"{where}: a string ends in a lone backslash")
        e = chr(raw[i + 1])
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 2
        elif e in "01234567":
            j = i + 1
            while j < len(raw) and j < i + 4 and chr(raw[j]) in "01234567":
                j += 1
            value = int(raw[i + 1 : j], 8)
            if value > 255:
                raise FormatError(f"{where}: octal escape \\{raw[i + 1:j].decode()} is larger than a byte")
            out.append(value)
            i = j
        elif e in "xX":
            j = i + 2
            while j < len(raw) and j < i + 4 and chr(raw[j]) in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 2:
                raise FormatError(f"{where}: \\x is not followed by hex digits")
            out.append(int(raw[i + 2 : j], 16))
            i = j
        else:
            raise FormatError(f"{where}: unknown escape \\{e!s} in a string")
    return os.fsdecode(bytes(out))


def parse_state(text: str, path: str, fix: str = "fix or remove it") -> CheckpointState:
    """Parse a state file's text; a :class:`FormatError` names ``path``, the first problem and ``fix``."""
    try:
        return _parse(text, path)
    except FormatError as e:
        raise FormatError(f"{e}; {fix}") from None


def _parse(text: str, path: str) -> CheckpointState:
    state = CheckpointState()
    tokens = _tokens(text, path)
    i = 0
    while i < len(tokens):
        kind, value, line = tokens[i]
        where = f"checkpoint state file {path} is malformed (line {line}"
        if kind != "ident" or value not in _STRING_FIELDS + _FLOAT_FIELDS:
            raise FormatError(f"{where}: expected a CheckpointState field, got {value[:40]!r})")
        field = value
        i += 1
        if i < len(tokens) and tokens[i][:2] == ("punct", ":"):
            i += 1
        got, i = _field_value(tokens, i, field, where)
        if i < len(tokens) and tokens[i][0] == "punct" and tokens[i][1] in ";,":
            i += 1
        _set_field(state, field, got)
    return state


def _tokens(text: str, path: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) of each token but comments."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            line = text.count("\n", 0, pos) + 1
            raise FormatError(f"checkpoint state file {path} is malformed (line {line}: unexpected {text[pos:].strip()[:20]!r})")
        kind = m.lastgroup or ""
        if kind != "comment":
            tokens.append((kind, m.group(kind), text.count("\n", 0, m.start(kind)) + 1))
        pos = m.end()
    return tokens


def _field_value(tokens: list[tuple[str, str, int]], i: int, field: str, where: str) -> tuple[str | float, int]:
    """The value of ``field`` at ``tokens[i]`` (adjacent strings joined) and the index after it."""
    if field in _STRING_FIELDS:
        parts = []
        while i < len(tokens) and tokens[i][0] == "string":
            s = tokens[i][1]
            parts.append(_unescape(s[1:-1], f"{where}, {field})"))
            i += 1
        if not parts:
            raise FormatError(f"{where}: {field} needs a quoted string)")
        return "".join(parts), i
    if i >= len(tokens) or tokens[i][0] != "number":
        raise FormatError(f"{where}: {field} needs a number)")
    return float(tokens[i][1].rstrip("fF")), i + 1


def _set_field(state: CheckpointState, field: str, got: str | float) -> None:
    if field == "model_checkpoint_path":
        state.model_checkpoint_path = str(got)
    elif field == "all_model_checkpoint_paths":
        state.all_model_checkpoint_paths.append(str(got))
    elif field == "all_model_checkpoint_timestamps":
        state.all_model_checkpoint_timestamps.append(float(got))
    else:
        state.last_preserved_timestamp = float(got)


def _escape(s: str) -> str:
    out = []
    for b in os.fsencode(s):
        ch = chr(b)
        if ch in "\\\"'":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0x20 <= b < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def format_state(state: CheckpointState) -> str:
    """The text-format proto TensorFlow reads (fields in its declaration order)."""
    lines = []
    if state.model_checkpoint_path is not None:
        lines.append(f"model_checkpoint_path: {_escape(state.model_checkpoint_path)}")
    lines += [f"all_model_checkpoint_paths: {_escape(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    return "".join(line + "\n" for line in lines)


def read_state(directory: str, fix: str = "fix or remove it, or name the checkpoint prefix instead") -> CheckpointState | None:
    """The directory's state, or None when it has no state file.

    Anything but a regular file there (a directory, a FIFO, a device) is refused
    before it is opened: opening a FIFO would wait for a writer forever.
    """
    path = state_path(directory)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FormatError(f"cannot read the checkpoint state file {path} ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"checkpoint state file {path} is {describe_mode(st.st_mode)}, not a regular file; {fix}")
    if st.st_size > MAX_STATE_BYTES:
        raise FormatError(f"checkpoint state file {path} is {st.st_size} bytes, more than {MAX_STATE_BYTES} (not a state file?); {fix}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except OSError as e:
        raise FormatError(f"cannot read the checkpoint state file {path} ({e.strerror}); {fix}") from None
    return parse_state(data.decode("utf-8", "surrogateescape"), path, fix)


def state_basename(named: str) -> str:
    """The base name a state file's path gives its checkpoint, whose files sit beside the state file.

    TensorFlow records the path the checkpoint was saved under: an absolute one of the machine
    that saved it (``/home/u/run/model.ckpt-7``, ``C:\\run\\model.ckpt-7``) or one relative to
    the directory.  ``Saver.save(sess, "run/")`` names a prefix with an empty base name
    (``run/.index``...), recorded as ``/home/u/run/`` or ``.``; a trailing ``/``, ``.`` and ``..``
    give that empty base name.  The one rule for local and remote directories: whatever the path,
    the checkpoint is looked for by this name in the directory itself, never outside it.
    """
    base = _slashed(named).rsplit("/", 1)[-1]
    return "" if base in (".", "..") else base


_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


def _slashed(named: str) -> str:
    """``named`` with ``/`` between its parts: a Windows absolute path's backslashes are separators,
    anywhere else a backslash is part of a POSIX file name (``we\\ird.ckpt``)."""
    return named.replace("\\", "/") if _WINDOWS_ABSOLUTE.match(named) else named


def confined(directory: str, named: str) -> tuple[str, bool]:
    """(the prefix in ``directory`` a state file's path ``named`` stands for, whether ``named``
    pointed outside ``directory``): see :func:`state_basename`."""
    base = state_basename(named)
    return os.path.join(directory, base), not _names_directory(directory, named)


def _names_directory(directory: str, named: str) -> bool:
    """Whether the directory part of ``named`` (resolved against ``directory``) is ``directory`` itself."""
    path = _slashed(named)
    head, _, last = path.rpartition("/")
    if last in (".", ".."):
        head = path
    elif not head:
        if not path.startswith("/"):
            return True  # a bare base name, as TensorFlow writes for a checkpoint beside its state file
        head = "/"
    where = os.path.join(directory, head)
    if os.path.normpath(os.path.abspath(where)) == os.path.normpath(os.path.abspath(directory)):
        return True
    try:
        return os.path.samefile(where, directory)  # the same directory by another name (a symlink)
    except (OSError, ValueError):  # no such directory, a name too long, a NUL byte
        return False


def describe_mode(mode: int) -> str:
    """'a directory', 'a FIFO', ... for a file type that is not a regular file."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"


def with_latest(state: CheckpointState | None, directory: str, basename: str, now: float) -> CheckpointState:
    """``state`` with ``basename`` as the latest checkpoint, every earlier one kept.

    As ``tf.train.update_checkpoint_state`` does, the latest is also the last of
    ``all_model_checkpoint_paths``; timestamps are kept aligned where the file has them.
    An empty base name (``out/.index``...) is recorded as ``./``: ``tf.train.latest_checkpoint``
    ignores an empty path, and misreads ``.`` (what its Saver records for ``"out/"``) as the
    directory, but restores ``out/./``.
    """
    basename = basename or EMPTY_BASENAME
    if state is None:
        return CheckpointState(basename, [basename])
    paths = list(state.all_model_checkpoint_paths)
    stamps = list(state.all_model_checkpoint_timestamps)
    aligned = len(stamps) == len(paths) and bool(stamps)
    me = os.path.normpath(os.path.join(directory, basename))
    keep = [k for k, p in enumerate(paths) if os.path.normpath(os.path.join(directory, p)) != me]
    paths = [paths[k] for k in keep] + [basename]
    if aligned:
        stamps = [stamps[k] for k in keep] + [now]
    return CheckpointState(basename, paths, stamps, state.last_preserved_timestamp)
