"""Checkpoints at remote URLs (``https://``, ``s3://``, ``gs://``, any fsspec protocol), read by byte range.

fsspec is the storage layer the PyData stack shares (pandas, dask, xarray, zarr):
its ``http`` filesystem (over aiohttp) and, where the user installs them, s3fs and
gcsfs do the talking; this module only asks for byte ranges, so a checkpoint is
never downloaded whole to be read.  :func:`open_place` turns a URL into a
:class:`RemotePlace` (the URL's "directory") and the name of the checkpoint inside
it; :class:`RemoteFile` is one object read by ``pread``.

Failures: a request that fails for a reason that may pass (a dropped connection,
a time-out, a 5xx answer) is retried :data:`ATTEMPTS` times in all with a growing
pause, then becomes one :class:`RemoteError`; a 404 is :class:`errors.NotFoundError`
and a 401/403 a :class:`RemotePermissionError`, at once.

Credentials come from where each protocol's library looks (s3fs: the AWS
variables, ``~/.aws``, instance roles; gcsfs: Google's application default
credentials; https: userinfo or a signed query string in the URL).  They are used
for the requests and never shown: every name, message and recorded source is the
URL through :func:`redact`, without userinfo, query string or fragment.

Importing this module imports no fsspec; the first :func:`open_place` does.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Generator, Iterable
from typing import Any

from .. import errors
from ..errors import RemoteError, RemotePermissionError
from . import state as _state
from .ckptfiles import DATA_SUFFIX
from .progress import bar
from .ranged import Place, RangedFile, _check_relpath
from .threads import Job

__all__ = ["RemoteError", "RemotePermissionError", "RemoteFile", "RemotePlace", "is_url", "open_place", "redact", "fetched"]

#: Tries per request, the first included; the pauses between them grow from :data:`BACKOFF` seconds.
ATTEMPTS = 4
BACKOFF = 0.5
#: The largest range asked for in one request: retries repeat at most this much, and the bar moves between requests.
CHUNK = 16 << 20
#: Reads smaller than this fetch this much and keep it (readahead for a table's small blocks and adjacent small tensors).
READAHEAD = 256 << 10
#: A streamed read (a tensor read block by block, :meth:`RemoteFile.stream`) asks for pieces of at most BLOCK
#: bytes, several in flight on helper threads while the reader uses the last one; WINDOW bounds the bytes of
#: the pieces in flight, fetched and not yet used, and in use by the reader, all together: one stream's
#: throughput in bounded memory, whatever the tensor's size.  A request also holds about its size again while
#: aiohttp joins its body: 4 MiB blocks in a 12 MiB window keep an export over HTTP of vgg_16 + Momentum + EMA
#: at 85 MB peak RSS (a 16 MiB window reached 101 MB).
BLOCK = 4 << 20
WINDOW = 12 << 20
#: The ``checkpoint`` state file is a few lines; a larger one is not read.
MAX_STATE_BYTES = 1 << 20

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_HTTP = ("http", "https")
# Suffixes of files a URL names directly: probed as a file first (no prefix or directory probes).
_FILE_SUFFIXES = re.compile(rf"(\.index|\.meta|{DATA_SUFFIX}|\.tar|\.tar\.gz|\.tgz|\.zip|\.ckpt)$")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return bool(_SCHEME.match(path))


def redact(url: str) -> str:
    """``url`` without userinfo, query string or fragment: what names, messages and archives may hold.

    >>> redact("https://user:secret@host:8443/a/b.ckpt?X-Amz-Signature=abc#x")
    'https://host:8443/a/b.ckpt'
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # an unparseable port or bracket: cut by hand rather than show anything after an '@' or '?'
        scheme, _, rest = url.partition("://")
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        authority, slash, path = rest.partition("/")
        return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = host + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _scrub(text: str) -> str:
    """``text`` with every URL in it redacted (a library's exception may quote the URL it was given)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


class _Counter:
    """Bytes and requests fetched, summed over every remote file of the process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.requests += 1


_TOTAL = _Counter()


def fetched() -> tuple[int, int]:
    """(bytes, requests) fetched by remote reads in this process so far; tests read the difference around a call."""
    return _TOTAL.bytes, _TOTAL.requests


# --------------------------------------------------------------------------- failures


def _status(e: BaseException) -> int | None:
    """The HTTP status behind an exception, following its causes (fsspec wraps aiohttp's errors)."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        st = getattr(cur, "status", None)
        if isinstance(st, int):
            return st
        resp = getattr(cur, "response", None)  # botocore's ClientError
        if isinstance(resp, dict):
            code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _describe(e: BaseException) -> str:
    """A short, credential-free description of an exception for a message."""
    st = _status(e)
    text = _scrub(str(e)).strip()
    if len(text) > 200:
        text = text[:200] + "..."
    what = type(e).__name__ + (f": {text}" if text and not text.startswith(("http", "s3", "gs")) else "")
    return f"HTTP {st}, {what}" if st is not None else what


def _final(e: BaseException, name: str, http: bool) -> errors.CkptBridgeError | None:
    """The error to raise at once for ``e`` (a missing object, a refusal); None when a retry may help."""
    st = _status(e)
    if st in (401, 403) or (st is None and isinstance(e, PermissionError)):
        return RemotePermissionError(
            f"permission denied reading {name}" + (f" (HTTP {st})" if st else "")
            + "; check the credentials for it (see the README's 'Credentials') and the object's access rights")
    if st == 404 or (st is None and isinstance(e, FileNotFoundError) and not (http and (e.__cause__ or e.__context__))):
        return errors.NotFoundError(f"no such remote file: {name}; check the URL")
    if st is not None and 400 <= st < 500 and st not in (408, 429):
        return RemoteError(f"reading {name} failed: the server answered HTTP {st}; check the URL")
    return None


_REFUSED, _UNREACHABLE = "connection refused", "no route to the host"


def _connect_failure(e: BaseException) -> tuple[str | None, str] | None:
    """(host:port where known, why) when ``e`` is a failure to connect at all, following its causes; else None.

    fsspec's http filesystem reports a refused connection as FileNotFoundError, its
    cause aiohttp's ClientConnectorError (which knows the host and port), its cause
    the socket's ConnectionRefusedError.
    """
    import errno
    import socket

    where: str | None = None
    why: str | None = None
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            break
        host, port = getattr(cur, "host", None), getattr(cur, "port", None)
        if where is None and isinstance(host, str) and host and isinstance(port, int):
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if why is None:
            if isinstance(cur, socket.gaierror):
                why = "the host name cannot be resolved"
            elif isinstance(cur, ConnectionRefusedError) or getattr(cur, "errno", None) == errno.ECONNREFUSED:
                why = _REFUSED
            elif getattr(cur, "errno", None) in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                why = _UNREACHABLE
        cur = cur.__cause__ or cur.__context__
    return (where, why) if why is not None else None


def _authority(name: str) -> str | None:
    """``host:port`` of an http(s) URL (the port its scheme implies where none is written)."""
    try:
        parts = urllib.parse.urlsplit(name)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.scheme not in _HTTP:
        return None
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _retrying(what: str, name: str, http: bool, call: Any, final: Any = None, attempts: int | None = None) -> Any:
    """``call()``, retried with backoff while its failures may pass; then one clear error naming ``name``.

    ``final(e, name, http)`` sorts the failures that are final at once (by default :func:`_final`, a read's);
    ``attempts`` (default :data:`ATTEMPTS`) is 1 where the library retries on its own (s3fs, botocore)."""
    final_of = _final if final is None else final
    tries = ATTEMPTS if attempts is None else attempts
    said = f"{tries} attempts" if tries > 1 else "after the library's own retries"
    last: BaseException | None = None
    for attempt in range(tries):
        if attempt:
            time.sleep(BACKOFF * (2 ** (attempt - 1)))
        try:
            return call()
        except errors.CkptBridgeError:
            raise
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - every library's exceptions differ; sorted by _final
            stop = final_of(e, name, http)
            if stop is not None:
                raise stop from None  # from None: the cause's text may hold the URL's credentials
            last = e
    assert last is not None
    failed = _connect_failure(last)
    if failed is not None:
        where, why = failed
        where = where or _authority(name)
        target = where if where is not None else f"the server of {name}"
        hint = ("check the host and port in the URL and that the server is running" if why == _REFUSED
                else "check the host name in the URL and the network" if why != _UNREACHABLE else "check the network")
        raise RemoteError(f"cannot connect to {target}: {why} ({what} {name}, {said}); {hint}, then run again") from None
    times = f"{tries} times (" if tries > 1 else f"({said}: "
    raise RemoteError(f"{what} {name} failed {times}{_describe(last)}); "
                      "check the network and the server, then run again") from None


# --------------------------------------------------------------------------- files and places


class _Stopped(errors.CkptBridgeError):
    """A fetched-ahead request whose stream's reader has gone: not retried, and seen by no one."""


class RemoteFile(RangedFile):
    """One remote object, read by byte-range requests (never whole unless asked for all of it)."""

    def __init__(self, place: RemotePlace, fs_path: str, name: str, size: int) -> None:
        self._place = place
        self._path = fs_path
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        self._cache: tuple[int, bytes] | None = None  # (offset, bytes) of the last readahead
        #: bytes and requests this file fetched
        self.bytes_fetched = 0
        self.requests = 0

    def pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0:
            raise ValueError(f"bad range ({offset}, {n}) of {self.name}")
        if offset + n > self.size:
            raise errors.FormatError(f"{self.name} is truncated: needed bytes {offset}..{offset + n} of a {self.size}-byte file")
        if n == 0:
            return b""
        with self._lock:
            cache = self._cache
        if cache is not None and cache[0] <= offset and offset + n <= cache[0] + len(cache[1]):
            start = offset - cache[0]
            return cache[1][start:start + n]
        if n < READAHEAD:
            block = self._fetch(offset, min(self.size, offset + READAHEAD) - offset)
            with self._lock:
                self._cache = (offset, block)
            return block[:n]
        parts = []
        pos, end = offset, offset + n
        while pos < end:
            step = min(CHUNK, end - pos)
            parts.append(self._fetch(pos, step))
            pos += step
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def block_hint(self) -> int | None:
        return max(1, BLOCK) if self._place._concurrent else None

    def stream(self, ranges: Iterable[tuple[int, int]]) -> Generator[bytes, None, None]:
        """The bytes of each ``(offset, n)`` of ``ranges`` in order, fetched ahead of the caller.

        Each range is fetched in requests of at most :data:`BLOCK` bytes, started on
        helper threads as far ahead as :data:`WINDOW` allows: the requests in flight,
        the pieces fetched and not yet yielded, and the range last yielded (the
        caller's until it asks for the next) never add up to more than WINDOW
        (beyond one request, or a range longer than the window, which is yielded
        whole).  Each request is retried as :meth:`pread`'s are, and its failure is
        raised when its range's turn comes; requests still in flight when the caller
        stops are left to end on their own and retried no more.  A lone range of at
        most one block is one :meth:`pread` (its small-read readahead included).
        Where fsspec's filesystem is not asynchronous (a ``tar://`` chain reads one
        shared file object), the ranges are read one after another, as there.
        """
        if not self._place._concurrent:
            yield from super().stream(ranges)
            return
        block, window = max(1, BLOCK), max(1, BLOCK, WINDOW)
        it = iter(ranges)
        head = [r for r in (next(it, None), next(it, None)) if r is not None]
        if len(head) < 2 and (not head or head[0][1] <= block):
            if head:
                yield self.pread(*head[0])
            return

        def pieces() -> Generator[tuple[int, int, bool], None, None]:
            """(offset, n, whether it ends its range) of the requests, in order; a range of 0 bytes is one piece of 0."""
            for offset, n in itertools.chain(head, it):
                if offset < 0 or n < 0:
                    raise ValueError(f"bad range ({offset}, {n}) of {self.name}")
                if offset + n > self.size:
                    raise errors.FormatError(f"{self.name} is truncated: needed bytes {offset}..{offset + n} of a {self.size}-byte file")
                if n == 0:
                    yield offset, 0, True
                for k in range(0, n, block):
                    m = min(block, n - k)
                    yield offset + k, m, k + m == n

        stopped = threading.Event()
        queue: deque[tuple[int, bool, Job | None]] = deque()  # (bytes, ends its range, the request) in order
        held = 0  # bytes of the queue's requests, of the pieces taken from it, and of the range last yielded
        todo = pieces()
        nxt = next(todo, None)
        parts: list[bytes] = []
        try:
            while True:
                while nxt is not None and (not queue or held + nxt[1] <= window):
                    offset, n, last = nxt
                    queue.append((n, last, Job(self._fetch, offset, n, stopped, name="ckptbridge-fetch") if n else None))
                    held += n
                    nxt = next(todo, None)
                if not queue:
                    return
                n, last, job = queue.popleft()
                parts.append(job.wait() if job is not None else b"")
                if last:
                    data = parts[0] if len(parts) == 1 else b"".join(parts)
                    parts = []
                    yield data
                    held -= len(data)
                    del data
        finally:
            stopped.set()
            todo.close()

    def _fetch(self, offset: int, n: int, stopped: threading.Event | None = None) -> bytes:
        """Exactly ``n`` bytes at ``offset`` in one request, retried (no more once ``stopped`` is set)."""
        place = self._place

        def call() -> bytes:
            if stopped is not None and stopped.is_set():
                raise _Stopped(f"reading {self.name} was stopped")
            data = place._fs.cat_file(self._path, start=offset, end=offset + n)
            if len(data) > n:
                # The server sent more than the range: it ignores Range requests, and each read would fetch it all.
                raise RemoteError(f"the server of {self.name} does not honour byte-range requests (asked for {n} bytes, got "
                                  f"{len(data)}); download the file and pass the local copy")
            if len(data) < n:
                raise ConnectionError(f"short read: {len(data)} of {n} bytes")  # the connection closed early: retried
            return bytes(data)

        self._place._bar_expect(n)
        data: bytes = _retrying("reading", self.name, place._http, call)
        with self._lock:
            self.bytes_fetched += n
            self.requests += 1
        place._count(n)
        return data

    def close(self) -> None:
        self._cache = None


class RemotePlace(Place):
    """A remote "directory": the objects beside each other under one URL prefix."""

    def __init__(self, fs: Any, root: str, display: str, *, http: bool, query: str = "", progress: bool | None = None) -> None:
        self._fs = fs
        self._root = root.rstrip("/")
        self._query = query
        self._http = http
        #: whether requests may be in flight together: fsspec's asynchronous filesystems (http, s3, gcs) take
        #: them from any thread; a synchronous one (a tar:// or zip:// chain over its one open file) may not
        self._concurrent = bool(getattr(fs, "async_impl", False))
        self.name = display.rstrip("/")
        self._progress = progress
        self._bar: Any = None
        self._bar_total = 0
        self._lock = threading.Lock()
        self._found: dict[str, dict[str, Any]] = {}
        #: bytes and requests fetched through this place's files
        self.bytes_fetched = 0
        self.requests = 0

    # --- paths --------------------------------------------------------------

    def _fs_path(self, relpath: str) -> str:
        rel = _check_relpath(relpath, self.name)
        return (f"{self._root}/{rel}" if rel else self._root) + self._query

    def display(self, relpath: str) -> str:
        """The credential-free URL of ``relpath`` in this place."""
        rel = _check_relpath(relpath, self.name)
        return f"{self.name}/{rel}" if rel else self.name

    # --- the Place interface ------------------------------------------------

    def _info(self, relpath: str) -> dict[str, Any] | None:
        """The object's info, or None where it does not exist (or is a directory).

        A file found is remembered for the place's life: resolution asks about the same
        few names several times, and each question is a request."""
        path, name = self._fs_path(relpath), self.display(relpath)
        with self._lock:
            known = self._found.get(path)
        if known is not None:
            return known

        def call() -> dict[str, Any] | None:
            try:
                return dict(self._fs.info(path))
            except FileNotFoundError as e:
                st = _status(e)
                if st == 404 or (st is None and not (self._http and (e.__cause__ or e.__context__))):
                    return None
                raise
        info: dict[str, Any] | None = _retrying("looking up", name, self._http, call)
        if info is None or info.get("type", "file") != "file":
            return None
        with self._lock:
            self._found[path] = info
        return info

    def open(self, relpath: str) -> RemoteFile:
        name = self.display(relpath)
        info = self._info(relpath)
        if info is None:
            raise errors.NotFoundError(f"no such remote file: {name}; check the URL")
        size = info.get("size")
        if not isinstance(size, int):
            raise RemoteError(f"the server of {name} does not say its size, so it cannot be read by ranges; "
                              "download the file and pass the local copy")
        return RemoteFile(self, self._fs_path(relpath), name, size)

    def exists(self, relpath: str) -> bool:
        return self._info(relpath) is not None

    def listdir(self, reldir: str = "") -> list[str] | None:
        if self._http:
            return None  # plain HTTP has no listing (a server's HTML index page is not one)
        path, name = self._fs_path(reldir), self.display(reldir)

        def call() -> list[str]:
            try:
                entries = self._fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
            return sorted(str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")

        result: list[str] = _retrying("listing", name, self._http, call)
        return result

    def close(self) -> None:
        with self._lock:
            b, self._bar = self._bar, None
        if b is not None:
            b.close()

    # --- accounting ---------------------------------------------------------

    def _bar_expect(self, n: int) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = bar(0, f"fetching {self.name}", self._progress)
            self._bar_total += n
            self._bar.total = self._bar_total

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n
            self.requests += 1
            if self._bar is not None:
                self._bar.update(n)
        _TOTAL.add(n)


# --------------------------------------------------------------------------- opening a URL


def _filesystem(url: str) -> tuple[Any, str, str, bool]:
    """(fs, path, query, is_http) for a URL; fsspec and the protocol's package are imported here."""
    try:
        import fsspec.core  # noqa: F401 - only whether it is installed: _url_to_fs uses it
    except ImportError:
        raise errors.MissingDependencyError("reading remote URLs needs fsspec (and aiohttp for https); "
                                            "install them with: pip install 'ckptbridge[remote]'") from None
    scheme = url.split("://", 1)[0].lower()
    http = scheme in _HTTP
    query = ""
    if http:
        parts = urllib.parse.urlsplit(url)
        query = "?" + parts.query if parts.query else ""
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    try:
        fs, path = _url_to_fs(url)
    except ImportError as e:
        raise errors.MissingDependencyError(_missing_protocol(scheme, http, e)) from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise errors.FormatError(f"{redact(url)}: fsspec knows no {scheme}:// protocol; check the URL") from None
        raise errors.FormatError(f"{redact(url)}: not a URL fsspec can open ({_scrub(str(e))}); check the URL") from None
    return fs, str(path), query, http


_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def _missing_protocol(scheme: str, http: bool, e: ImportError) -> str:
    """What to install when fsspec cannot import the package a ``scheme://`` URL needs."""
    if http:
        needs, install = "aiohttp", "'ckptbridge[remote]'"
    elif scheme in _PROTOCOL_PACKAGES:
        needs = install = _PROTOCOL_PACKAGES[scheme]
    else:
        needs, install = f"the package fsspec names ({e})", "it"
    return f"reading {scheme}:// URLs needs {needs}; install it with: pip install {install}"


_BRACKETED = re.compile(r"\[[^\]/]*\]")


def _chain(url: str) -> list[str]:
    """The URLs of an fsspec chain (``tar://member::https://host/a.tar``), split at ``::`` outside brackets:
    an IPv6 literal (``http://[::1]:8000/x``) is one URL, where fsspec's own split cuts it at its ``::``."""
    parts, start, depth = [], 0, 0
    i = 0
    while i < len(url):
        c = url[i]
        if c == "[":
            depth += 1
        elif c == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and url.startswith("::", i):
            parts.append(url[start:i])
            start = i + 2
            i += 1
        i += 1
    parts.append(url[start:])
    return parts


def _url_to_fs(url: str) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs``, except that a ``::`` inside an IPv6 literal does not chain."""
    import fsspec
    import fsspec.core

    if not _BRACKETED.search(url):
        found: tuple[Any, str] = fsspec.core.url_to_fs(url)  # fsspec's own reading, chains included
        return found
    bits = _chain(url)
    # From the innermost URL out, each outer filesystem reading the one inside as an open file (its "fo"):
    # handed a URL instead, it would open it with fsspec.open, which splits it at '::' again.
    inner: Any = None
    for i, bit in enumerate(reversed(bits)):
        protocol = fsspec.core.split_protocol(bit)[0] or "file"
        cls = fsspec.get_filesystem_class(protocol)
        kw = dict(cls._get_kwargs_from_urls(bit))
        path = cls._strip_protocol(bit)
        fs = fsspec.filesystem(protocol, **kw, **({"fo": inner} if inner is not None else {}))
        if i == len(bits) - 1:
            return fs, path
        inner = fs.open(path, "rb")
    raise AssertionError("unreachable")


def _split(path: str) -> tuple[str, str]:
    """(directory, last name) of an fs path or URL."""
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail


def _scheme_root(display: str) -> bool:
    """Whether a display URL has no path below its host or bucket (``s3://bucket``, ``https://host``)."""
    rest = display.split("://", 1)[1]
    return "/" not in rest.strip("/")


def _state_prefix(place: RemotePlace) -> str | None:
    """The prefix a directory's ``checkpoint`` state file names (its base name: the files sit beside it), or None."""
    from .ckptfiles import STATE_NAME

    try:
        f = place.open(STATE_NAME)
    except errors.NotFoundError:
        return None
    if f.size > MAX_STATE_BYTES:
        raise errors.FormatError(f"{f.name} is {f.size} bytes, too large for a checkpoint state file; name the checkpoint prefix instead")
    text = f.pread(0, f.size).decode("utf-8", "replace")
    state = _state.parse_state(text, f.name, "fix or remove it, or name the checkpoint prefix instead")
    p = state.model_checkpoint_path
    if not p:
        return None
    # TensorFlow may record an absolute path of the machine that trained; the files are beside the state file.
    return _state.state_basename(p)


def _in_directory(place: RemotePlace) -> str:
    """The checkpoint in a remote directory: the state file's, else the one ``*.index`` a listing finds."""
    from .ckptfiles import INDEX

    prefix = _state_prefix(place)
    if prefix == "" and place.exists(INDEX):
        return INDEX  # Saver.save(sess, "dir/"): an empty base name, named by its index
    if prefix:
        if place.exists(prefix + INDEX) or place.exists(prefix):
            return prefix
        raise errors.NotFoundError(f"the checkpoint state file in {place.name} names {prefix}, which is not there; "
                                   "name the checkpoint prefix in the URL")
    names = place.listdir()
    if names is None:
        raise errors.NotFoundError(f"no checkpoint state file at {place.display('checkpoint')}, and plain HTTP cannot list "
                                   f"{place.name}; name the checkpoint prefix or file in the URL")
    prefixes = sorted(n[: -len(INDEX)] for n in names if n.endswith(INDEX))
    if len(prefixes) == 1:
        return prefixes[0] or INDEX
    if prefixes:
        shown = ", ".join(prefixes[:8]) + (" ..." if len(prefixes) > 8 else "")
        raise errors.FormatError(f"{place.name} holds {len(prefixes)} checkpoints and no state file names one ({shown}); "
                                 "name the one you want in the URL")
    raise errors.NotFoundError(f"no checkpoint in {place.name} (no 'checkpoint' state file and no *.index); check the URL")


def open_place(url: str, *, progress: bool | None = None) -> tuple[RemotePlace, str]:
    """The remote place a URL points into, and the name inside it to open.

    The URL names a file (a V1 checkpoint, a ``.index`` or data shard, a tarball:
    the name is its base name), a V2 prefix (``PREFIX.index`` exists: the name is
    the prefix's base name) or a directory (its ``checkpoint`` state file, or where
    the protocol can list, its only ``*.index``, says which prefix).  Plain http(s)
    cannot list, so names are probed with HEAD requests.  ``progress``: a bar of
    bytes fetched on stderr (None: only when stderr is a terminal).
    """
    from .ckptfiles import INDEX, STATE_NAME

    display = redact(url)
    fs, path, query, http = _filesystem(url)
    if path.endswith("/") or _scheme_root(display):
        place = RemotePlace(fs, path, display, http=http, query=query, progress=progress)
        return place, _in_directory(place)
    parent, base = _split(path)
    dparent, _ = _split(display)
    place = RemotePlace(fs, parent, dparent, http=http, query=query, progress=progress)
    refused: errors.CkptBridgeError | None = None
    # A file's name (x.index, x.tar.gz) is probed as that file alone; anything else (a .ckpt may be a V1 file
    # or a V2 prefix) as a prefix, a file, then a directory.
    named_file = bool(_FILE_SUFFIXES.search(base))
    probes = [base] if named_file and not base.endswith(".ckpt") else [base, base + INDEX] if named_file else [base + INDEX, base]
    for probe in probes:
        try:
            if place.exists(probe):
                return place, (base if probe == base + INDEX else probe)
        except RemotePermissionError as e:
            refused = refused or e  # a bucket that may not be listed answers 403 for a missing key: try the other names
    inner = RemotePlace(fs, path, display, http=http, query=query, progress=progress)
    try:
        if not named_file and (inner.exists(STATE_NAME) or inner.listdir() is not None):
            return inner, _in_directory(inner)
    except RemotePermissionError as e:
        refused = refused or e
    except errors.NotFoundError:
        pass
    if refused is not None:
        raise refused
    looked = ", ".join(probes) + ("" if named_file else f" and a directory with a '{STATE_NAME}' file")
    raise errors.NotFoundError(f"no checkpoint at {display} (looked for {looked}); check the URL")
