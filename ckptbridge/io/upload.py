"""Outputs at URLs (``s3://``, ``gs://``, any fsspec protocol that writes): a verified local file, uploaded, checked, published.

An archive bound for a URL is first written and read back like any local output,
into scratch space (:class:`Destination` does not care which format).  Then
:meth:`Destination.upload` sends that one file, and nothing appears at the URL
until all of it is there and checked:

- **S3** (s3fs): a multipart upload straight to the key.  Each part carries its
  MD5 (``Content-MD5``), so S3 refuses a part that arrives different; the parts
  are completed into the object in one request, which without ``force`` is
  conditional (``If-None-Match: *``: an object written meanwhile is not replaced).
  Then the object's size and ETag (the MD5 of the parts' MD5s, where the store's
  ETags are MD5s) are compared with what was sent.  A failure before completion
  aborts the upload: S3 keeps no object and, once aborted, no parts.
- **Any other protocol**: the file is written to a temporary name beside the
  destination (``.<name>.<pid>-...ckptbridge-tmp``, as local temporaries are
  named), its size and checksum compared (the store's ``crc32c`` or ``md5Hash``
  where its info gives one, as GCS's does; else the object is read back by range
  and its crc32c computed), and only then moved to its name (``fs.mv``: a rename,
  or a server-side copy on stores that have no rename).  A failure removes the
  temporary object.

The local file is read once, in order, for the upload; the whole-file crc32c
(:data:`CHECKSUM` ``:<8 hex digits>``, what :attr:`Uploaded.checksum` and
``Report.checksum`` hold) and the MD5s are computed from those same reads.

Errors are one :mod:`ckptbridge.errors` error naming the URL without credentials
(:func:`.remote.redact`): no credentials, access denied, no such bucket, a server
that cannot be reached (retried as remote reads are, :func:`.remote._retrying`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import os
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import crc32c as _crc32c

from .. import errors
from ..errors import OutputExistsError, RemoteError, RemotePermissionError, option
from . import atomic as _atomic
from . import remote as _remote
from .progress import bar
from .signals import raise_if_signalled, signals_deferred

__all__ = ["CHECKSUM", "Destination", "Uploaded", "file_checksum", "is_url"]

#: The algorithm of the whole-file checksum, the prefix of :attr:`Uploaded.checksum`.
CHECKSUM = "crc32c"
#: A multipart upload's parts are this size (the last one smaller), more for a file that would need over
#: MAX_PARTS of them (80 GB); S3 takes 5 MiB at least (but for the last).  UPLOAD_THREADS parts are in flight
#: at a time, so an upload holds about (UPLOAD_THREADS + 1) * PART_BYTES, and botocore a copy of each part
#: while it sends it: 8 MiB parts two at a time took an export of 245 MB to moto's server at 127 MB peak RSS
#: (reading the same checkpoint from S3 takes 115 MB), where 16 MiB parts four at a time took 240 MB.
PART_BYTES = 8 << 20
MAX_PARTS = 10_000
MIN_PART_BYTES = 5 << 20
UPLOAD_THREADS = 2
#: Reads of the local file and of a read-back are this size.
_READ_BYTES = 4 << 20

is_url = _remote.is_url


@dataclasses.dataclass(frozen=True)
class Uploaded:
    """What was published at a URL, and how it was checked."""

    url: str
    #: bytes of the object
    size: int
    #: ``crc32c:<8 hex digits>`` of the object's bytes, whole
    checksum: str
    #: the store's ETag of the object (quotes removed), where it gives one
    etag: str | None
    #: what the store confirmed, in a few words (for --debug and the docs)
    checked: str


def format_checksum(crc: int) -> str:
    return f"{CHECKSUM}:{crc:08x}"


def file_checksum(path: str) -> str:
    """The :data:`CHECKSUM` of a local file's bytes, in :attr:`Uploaded.checksum`'s form (one pass over it)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            crc = _crc32c.crc32c(chunk, crc)
    return format_checksum(crc)


# --------------------------------------------------------------------------- failures


def _no_credentials(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) says no credentials were found (botocore's NoCredentialsError & co.)."""
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            return False
        if "Credential" in type(cur).__name__ or "NoAuthToken" in type(cur).__name__:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _write_final(e: BaseException, name: str, http: bool) -> errors.CkptBridgeError | None:
    """The error to raise at once for a failed write to ``name`` (None: a retry may help)."""
    st = _remote._status(e)
    if _no_credentials(e):
        return RemotePermissionError(f"no credentials found to write {name}; set them as the README's 'Credentials' says "
                                     "(for s3://, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if st in (401, 403) or (st is None and isinstance(e, PermissionError)):
        return RemotePermissionError(f"permission denied writing {name}" + (f" (HTTP {st})" if st else "")
                                     + "; check the credentials for it (see the README's 'Credentials') and that they may write there")
    if st == 404 or (st is None and isinstance(e, FileNotFoundError)):
        return errors.NotFoundError(f"cannot write {name}: {_where_missing(name)} does not exist; create it first, or check the URL")
    if st is not None and 400 <= st < 500 and st not in (408, 429):
        return RemoteError(f"writing {name} failed: the server answered HTTP {st} ({_remote._describe(e)}); check the URL")
    return None


_BUCKETS = ("s3", "s3a", "gs", "gcs")


def _where_missing(name: str) -> str:
    scheme, _, rest = name.partition("://")
    if scheme in _BUCKETS:
        return f"the bucket {scheme}://{rest.split('/', 1)[0]}"
    return "its directory"


def _call(what: str, name: str, call: Callable[[], Any], attempts: int | None = None) -> Any:
    """``call()``, retried like a remote read, its failures one error naming ``name``."""
    return _remote._retrying(what, name, False, call, final=_write_final, attempts=attempts)


def _s3(what: str, name: str, call: Callable[[], Any]) -> Any:
    """An S3 request: s3fs and botocore retry what may pass on their own, so it is tried once more here at most."""
    return _call(what, name, call, attempts=1)


# --------------------------------------------------------------------------- the destination


class Destination:
    """An object at a URL that :meth:`upload` publishes whole, or not at all.

    Made before any work: it refuses what can be refused up front (an unknown
    protocol, a missing package, http(s), an existing object without ``force``,
    a missing bucket, no credentials or no permission to write, where the store
    tells before an upload: S3 does, through the multipart upload it starts here).
    It is in the process's ledger of pending outputs (``io.atomic``) until it is
    published or aborted, so an error or a signal aborts it.
    """

    def __init__(self, url: str, *, force: bool = False) -> None:
        self.url = _remote.redact(url)
        self.force = force
        scheme = url.split("://", 1)[0].lower()
        if "://" not in self.url:  # no host or bucket (s3:///x.h5, memory:///x.h5): redact keeps no "//" for it
            self.url = url.split("?", 1)[0].split("#", 1)[0]  # and there is no userinfo to hide
            if scheme in _BUCKETS:
                raise errors.FormatError(f"cannot write {self.url}: the URL names no bucket; check the URL")
        if scheme in ("http", "https"):
            raise errors.FormatError(f"cannot write {self.url}: ckptbridge writes outputs to object stores and file systems "
                                     "fsspec can write (s3://, gs://, ...), not to http(s):// URLs; write a local file and upload it")
        if url.endswith("/") or (scheme in _BUCKETS and _remote._scheme_root(self.url)):
            raise errors.FormatError(f"cannot write {self.url}: it names no object; name the object to write, "
                                     f"e.g. {self.url.rstrip('/')}/model.h5")
        try:
            fs, path, _, _ = _remote._filesystem(url)
        except errors.MissingDependencyError as e:
            raise errors.MissingDependencyError(str(e).replace("reading ", "writing to ", 1)) from None
        self._fs = fs
        self._path = path.rstrip("/")
        if not self._path.rsplit("/", 1)[-1]:
            raise errors.FormatError(f"cannot write {self.url}: it names no object; name the object to write, "
                                     f"e.g. {self.url.rstrip('/')}/model.h5")
        self._done = False
        self._upload: _S3Multipart | _Moved
        if _is_s3(fs):
            self._upload = _S3Multipart(fs, self._path, self.url, force)
        else:
            self._upload = _Moved(fs, self._path, self.url, force)
        _atomic.track_pending(self._ledger_key, self.abort)

    @property
    def _ledger_key(self) -> str:
        return f"{self.url}#{id(self)}"

    def upload(self, local: str, *, progress: bool | None = False) -> Uploaded:
        """Send the finished local file ``local``, check what the store holds, publish it at the URL.

        ``progress``: a bar of the bytes sent on stderr (None: only when stderr is a terminal)."""
        if self._done:
            raise errors.CkptBridgeError(f"internal error: {self.url} was already published or aborted")
        raise_if_signalled()
        shown = bar(os.path.getsize(local), f"uploading {self.url}", progress)
        try:
            done = self._upload.run(local, shown)
        finally:
            shown.close()
        with signals_deferred():
            self._done = True
            _atomic.untrack_pending(self._ledger_key)
        return done

    def abort(self) -> None:
        """Leave nothing at the URL of this upload (safe to call twice, and after :meth:`upload`)."""
        if self._done:
            return
        with signals_deferred():
            self._done = True
            _atomic.untrack_pending(self._ledger_key)
            try:
                self._upload.abort()
            except Exception:  # noqa: BLE001 - best effort: the error being raised is the one to show
                pass


def _is_s3(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "call_s3") and hasattr(fs, "split_path")


def _published(url: str) -> None:
    _atomic.note_published(url)


class _Reader:
    """The local file read once, in order: pieces of it, with the crc32c of everything read so far."""

    def __init__(self, path: str) -> None:
        self.size = os.path.getsize(path)
        self.crc = 0
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close(), the upload's own finally

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        self.crc = _crc32c.crc32c(data, self.crc)
        return data

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------- S3: one multipart upload


def _part_size(size: int) -> int:
    part = max(PART_BYTES, -(-size // MAX_PARTS))
    return -(-part // (1 << 20)) << 20  # whole MiB


class _S3Multipart:
    """A multipart upload to one key: started when made (the store says now what it refuses), completed or aborted."""

    def __init__(self, fs: Any, path: str, url: str, force: bool) -> None:
        self._fs, self.url, self.force = fs, url, force
        bucket, key, _ = fs.split_path(path)
        if not key:
            raise errors.FormatError(f"cannot write {url}: it names no object; name the object to write, e.g. s3://{bucket}/model.h5")
        self._bucket, self._key = bucket, key
        if not force and self._exists():
            raise OutputExistsError(f"output {url} already exists; pass {option('force', True)} to overwrite it")
        resp = _s3("starting the upload of", url, lambda: fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key))
        self._id: str | None = resp["UploadId"]

    def _exists(self) -> bool:
        def call() -> bool:
            try:
                self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key)
            except FileNotFoundError:
                return False
            except PermissionError:
                return False  # no s3:ListBucket: a missing key answers 403; the conditional completion still guards it
            return True
        exists: bool = _s3("looking up", self.url, call)
        return exists

    def _send(self, number: int, data: bytes, md5: bytes) -> dict[str, Any]:
        """Upload part ``number``; its entry for the completion (its ETag and any checksum the store returned)."""
        assert self._id is not None
        upload_id = self._id
        resp = _s3("uploading", self.url, lambda: self._fs.call_s3(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=data,
            ContentMD5=base64.b64encode(md5).decode("ascii")))
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        part.update({k: v for k, v in resp.items() if k.startswith("Checksum") and k != "ChecksumType" and isinstance(v, str)})
        return part

    def run(self, local: str, shown: Any) -> Uploaded:
        reader = _Reader(local)
        md5s: list[bytes] = []
        parts: list[dict[str, Any]] = []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="ckptbridge-upload")
        try:
            step = _part_size(reader.size)
            pending: deque[tuple[concurrent.futures.Future[dict[str, Any]], int]] = deque()

            def landed() -> None:
                future, n = pending.popleft()
                parts.append(future.result())
                shown.update(n)

            for number in range(1, max(1, -(-reader.size // step)) + 1):
                data = reader.read(step)
                md5 = hashlib.md5(data).digest()
                md5s.append(md5)
                pending.append((pool.submit(self._send, number, data, md5), len(data)))
                del data
                while len(pending) >= UPLOAD_THREADS or (pending and pending[0][0].done()):
                    landed()
                raise_if_signalled()
            while pending:
                landed()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no part still in flight when the upload is aborted
            reader.close()
        md5_etags = all(p["ETag"].strip('"') == m.hex() for p, m in zip(parts, md5s))
        want_etag = hashlib.md5(b"".join(md5s)).hexdigest() + f"-{len(md5s)}" if md5_etags else None
        self._complete(parts)
        return self._check(reader.size, format_checksum(reader.crc), want_etag, len(parts))

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        assert self._id is not None
        upload_id = self._id
        cond = {} if self.force else {"IfNoneMatch": "*"}
        meanwhile = OutputExistsError(f"output {self.url} already exists (written meanwhile by another process); "
                                      f"pass {option('force', True)} to overwrite it")

        def complete() -> None:
            self._fs.call_s3("complete_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id,
                             MultipartUpload={"Parts": parts}, **cond)

        def call() -> None:
            try:
                complete()
            except FileExistsError:
                raise meanwhile from None
            except OSError as e:
                if not cond or _remote._status(e) != 501:
                    raise
                # A store without conditional writes (older S3-compatible ones answer 501 Not Implemented):
                # the object is looked for once more, which a writer racing this one can still beat.
                if self._exists():
                    raise meanwhile from None
                cond.clear()
                complete()

        with signals_deferred():
            _s3("completing the upload of", self.url, call)
            self._id = None
            _published(self.url)
        self._fs.invalidate_cache(f"{self._bucket}/{self._key}")

    def _check(self, size: int, checksum: str, want_etag: str | None, nparts: int) -> Uploaded:
        head = _s3("checking", self.url, lambda: self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key))
        etag = str(head.get("ETag", "")).strip('"') or None
        got = head.get("ContentLength")
        if got != size or (want_etag is not None and etag != want_etag):
            with signals_deferred():
                _s3("removing", self.url, lambda: self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key))
                _atomic.forget_published(self.url)
            raise errors.CorruptError(f"upload of {self.url}: the store holds {got} bytes (ETag {etag}) where {size} bytes "
                                      f"(ETag {want_etag}) were sent; the object was removed, run again")
        how = f"{nparts} part(s), each checked by S3 against its MD5; size" + (" and ETag" if want_etag else "")
        return Uploaded(self.url, size, checksum, etag, how)

    def abort(self) -> None:
        if self._id is None:
            return
        upload_id, self._id = self._id, None
        _s3("aborting the upload of", self.url, lambda: self._fs.call_s3(
            "abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id))


# --------------------------------------------------------------------------- any protocol: a temporary, then a move


class _Moved:
    """An upload to a temporary name beside the destination, checked there, then moved to its name."""

    def __init__(self, fs: Any, path: str, url: str, force: bool) -> None:
        self._fs, self._path, self.url, self.force = fs, path, url, force
        parent, base = path.rsplit("/", 1) if "/" in path else ("", path)
        owner = _atomic.owner_tag()
        name = f".{base}.{owner + '.' if owner else ''}{secrets.token_hex(4)}{_atomic.TMP_SUFFIX}"
        self._tmp = f"{parent}/{name}" if parent else name
        self._made = False
        if not force and self._exists(path):
            raise OutputExistsError(f"output {url} already exists; pass {option('force', True)} to overwrite it")

    def _exists(self, path: str) -> bool:
        found: bool = _call("looking up", self.url, lambda: self._fs.exists(path))
        return found

    def run(self, local: str, shown: Any) -> Uploaded:
        reader = _Reader(local)
        md5 = hashlib.md5()
        try:
            self._made = True
            with self._fs.open(self._tmp, "wb") as out:
                while data := reader.read(_READ_BYTES):
                    md5.update(data)
                    out.write(data)
                    shown.update(len(data))
                    raise_if_signalled()
        except errors.CkptBridgeError:
            raise
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - every filesystem's exceptions differ
            raise (_write_final(e, self.url, False) or RemoteError(
                f"uploading {self.url} failed ({_remote._describe(e)}); nothing was written there, run again")) from None
        finally:
            reader.close()
        checksum = format_checksum(reader.crc)
        how = self._check(self._tmp, reader.size, reader.crc, md5.digest())
        with signals_deferred():
            if not self.force and self._exists(self._path):
                raise OutputExistsError(f"output {self.url} already exists (written meanwhile by another process); "
                                        f"pass {option('force', True)} to overwrite it")
            _call("publishing", self.url, lambda: self._fs.mv(self._tmp, self._path))
            self._made = False
            _published(self.url)
        info = self._info(self._path)
        if info.get("size") != reader.size:
            raise errors.CorruptError(f"upload of {self.url}: the store holds {info.get('size')} bytes where {reader.size} were sent "
                                      "after the move; check the object and run again")
        etag = info.get("ETag") or info.get("etag")
        return Uploaded(self.url, reader.size, checksum, str(etag).strip('"') if etag else None, how)

    def _info(self, path: str) -> dict[str, Any]:
        self._fs.invalidate_cache(path)
        info: dict[str, Any] = _call("checking", self.url, lambda: dict(self._fs.info(path)))
        return info

    def _check(self, path: str, size: int, crc: int, md5: bytes) -> str:
        """Compare what the store holds at ``path`` with what was sent; say how it was checked."""
        info = self._info(path)
        if info.get("size") != size:
            raise errors.CorruptError(f"upload of {self.url}: the store holds {info.get('size')} bytes where {size} were sent; "
                                      "nothing was published, run again")
        stored = _stored_checksum(info)
        if stored is not None:
            kind, value = stored
            want = crc.to_bytes(4, "big") if kind == "crc32c" else md5
            if value != want:
                raise errors.CorruptError(f"upload of {self.url}: the store's {kind} differs from what was sent; "
                                          "nothing was published, run again")
            return f"size and the store's {kind}"
        got = 0
        for offset in range(0, size, _READ_BYTES):
            data = _call("reading back", self.url, self._reader(path, offset, min(_READ_BYTES, size - offset)))
            got = _crc32c.crc32c(data, got)
            raise_if_signalled()
        if got != crc:
            raise errors.CorruptError(f"upload of {self.url}: read back, its crc32c differs from what was sent; "
                                      "nothing was published, run again")
        return "size, and crc32c of the object read back"

    def _reader(self, path: str, offset: int, n: int) -> Callable[[], bytes]:
        def call() -> bytes:
            data = bytes(self._fs.cat_file(path, start=offset, end=offset + n))
            if len(data) != n:
                raise ConnectionError(f"short read: {len(data)} of {n} bytes")
            return data
        return call

    def abort(self) -> None:
        if not self._made:
            return
        self._made = False

        def call() -> None:
            try:
                self._fs.rm_file(self._tmp)
            except FileNotFoundError:
                pass
        _call("removing", self.url, call)


def _stored_checksum(info: dict[str, Any]) -> tuple[str, bytes] | None:
    """A whole-object checksum the store's info gives: ("crc32c", 4 bytes) or ("md5", 16 bytes), as GCS's
    ``crc32c`` and ``md5Hash`` (base64); None where there is none."""
    for key, kind, n in (("crc32c", "crc32c", 4), ("md5Hash", "md5", 16)):
        value = info.get(key)
        if isinstance(value, str):
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                continue
            if len(raw) == n:
                return kind, raw
    return None
