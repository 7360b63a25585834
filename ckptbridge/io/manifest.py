"""Where ``archive`` puts its outputs and its manifest: a local directory or a URL prefix.

The manifest (``manifest.jsonl``, one JSON object a line, one line per checkpoint)
is rewritten whole (after each checkpoint while it is small, see ``_archive``): locally through :class:`~ckptbridge.io.atomic.AtomicFile`
(a temporary renamed over it), at a URL as one object put (an object store shows
an object whole or not at all).  A reader therefore sees the manifest before or
after a checkpoint, never a half-written line.

An output's identity is its size and mtime (local) or ETag (at a URL): what the
next run compares with the manifest, without reading the output again.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import CkptBridgeError, FormatError

MANIFEST = "manifest.jsonl"


class Destination:
    """A directory for outputs, local or at a URL, holding :data:`MANIFEST`."""

    def __init__(self, root: str) -> None:
        from .remote import is_url, redact

        self.remote = is_url(root)
        self._fs: Any = None
        self._listing: dict[str, list[Any]] | None = None
        if self.remote:
            from .remote import _filesystem

            fs, path, _, http = _filesystem(root)
            if http:
                raise FormatError(f"{redact(root)}: plain HTTP cannot store outputs; give a local directory or an s3://, gs:// prefix")
            self._fs, self._path = fs, str(path).rstrip("/")
            self.root = root.rstrip("/")
            self.shown = redact(self.root)
        else:
            if os.path.exists(root) and not os.path.isdir(root):
                raise FormatError(f"destination {root} is a file; give a directory (created if missing) or a URL prefix")
            self.root = self.shown = os.path.normpath(root)
            self._path = os.path.abspath(root)

    def output(self, rel: str) -> str:
        """Where the output at ``rel`` (a "/"-separated path below the destination) is written."""
        if self.remote:
            return f"{self.root}/{rel}"
        return os.path.join(self.root, *rel.split("/"))

    def shown_output(self, rel: str) -> str:
        from .remote import redact

        return redact(self.output(rel))

    def contains(self, local_path: str) -> bool:
        """Whether a local directory is the destination or inside it (a walk of the sources skips it)."""
        if self.remote:
            return False
        here = os.path.abspath(local_path)
        return here == self._path or here.startswith(self._path + os.sep)

    def prepare(self, rel: str) -> None:
        """Make the directory an output goes into (object stores have none to make)."""
        if not self.remote:
            os.makedirs(os.path.dirname(self.output(rel)) or os.curdir, exist_ok=True)

    def identity(self, rel: str) -> list[Any] | None:
        """The output's [size, mtime_ns or ETag], or None where there is none.

        At a URL the destination is listed once, recursively, on the first question (a
        thousand objects a request), rather than asked once per output."""
        if not self.remote:
            return identity_of(self.output(rel))
        if self._listing is None:
            try:
                self._fs.invalidate_cache(self._path)
                found = self._fs.find(self._path, detail=True)
            except FileNotFoundError:
                found = {}
            self._listing = {str(p).rstrip("/")[len(self._path) + 1:]: [int(i.get("size") or 0), object_tag(i)]
                             for p, i in found.items() if str(p).startswith(self._path + "/") and i.get("type", "file") == "file"}
        return self._listing.get(rel)

    # --- the manifest -------------------------------------------------------------

    @property
    def manifest(self) -> str:
        return self.output(MANIFEST)

    def read_manifest(self) -> dict[str, dict[str, Any]]:
        """The entries of the manifest by their ``rel``, the last line for each winning; {} where there is none."""
        try:
            if self.remote:
                text = self._fs.cat_file(f"{self._path}/{MANIFEST}").decode("utf-8")
            else:
                with open(self.manifest, encoding="utf-8") as f:
                    text = f.read()
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError:
            raise FormatError(f"{self.shown}/{MANIFEST} is not UTF-8 text; it is not a manifest ckptbridge wrote: move it away") from None
        entries: dict[str, dict[str, Any]] = {}
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a line that does not parse records nothing: its checkpoint is redone
            if isinstance(doc, dict) and isinstance(doc.get("rel"), str):
                entries[doc["rel"]] = doc
        return entries

    def write_manifest(self, entries: dict[str, dict[str, Any]]) -> int:
        """Replace the manifest by ``entries``, whole (sorted by ``rel``); the bytes written."""
        data = "".join(json.dumps(entries[k], sort_keys=True) + "\n" for k in sorted(entries)).encode("utf-8")
        if self.remote:
            self._fs.pipe_file(f"{self._path}/{MANIFEST}", data)
            return len(data)
        from . import atomic

        os.makedirs(self.root, exist_ok=True)
        out = atomic.AtomicFile(self.manifest, force=True)
        try:
            with open(out.tmp, "wb") as f:
                f.write(data)
            out.commit()
        except BaseException:
            out.abort()
            raise
        return len(data)


def identity_of(path: str) -> list[Any] | None:
    """A file's [size, mtime_ns] (local) or an object's [size, ETag] (URL); None where it does not exist."""
    from .remote import is_url

    if not is_url(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return [st.st_size, str(st.st_mtime_ns)]
    from .remote import _filesystem

    fs, p, _, _ = _filesystem(path)
    try:
        fs.invalidate_cache(p)
        info = fs.info(p)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CkptBridgeError(f"cannot look up {path}: {e}") from None
    return [int(info.get("size") or 0), object_tag(info)]


def object_tag(info: dict[str, Any]) -> str:
    """What says an object changed, from its fsspec info: its ETag (S3), its hash (GCS), else its time."""
    for key in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""
