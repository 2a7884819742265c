"""Where adapters come from: local folders, file://, s3:// and https:// — into an immutable cache.

Every source is materialised into ``<home>/adapter-cache/<digest>/``, where the digest is the
sha256 over the folder's files (names + contents). Why copy even local folders:

* vLLM reads a LoRA's files again whenever its LRU evicts and later reloads it. If a version's
  folder could change on disk (an adapter re-saved in place, a re-fetch into the same place), an
  old version still serving requests would silently start running new weights, and its LoRA
  would no longer match its audio layer. A content-addressed, never-modified folder rules that out.
* The same bytes fetched twice share one copy; a re-fetch of an unchanged adapter costs a hash.

Accepted sources:

* ``/path/to/adapter`` or ``file:///path/to/adapter`` — an adapter folder (or an archive file).
* ``s3://bucket/prefix/`` — the adapter's files directly under the prefix; or
  ``s3://bucket/key.tar.gz`` — an archive. Credentials, region and endpoint come from the
  environment as for any AWS SDK (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
* ``https://host/adapter.tar.gz`` — an archive: ``.tar.gz``/``.tgz``/``.tar``/``.zip`` of the
  adapter folder (files at the root or inside one top-level folder, e.g. ``tar czf a.tar.gz a/``).
  ``http://`` is refused unless the server allows it (``AURA_ADAPTER_ALLOW_HTTP=1``; tests only).

An optional ``sha256`` (hex) pins the exact archive (or, for a folder, the cache digest) the
caller expects. Archives are unpacked defensively: no absolute paths, no ``..``, no links or
devices, and a size cap on both the download and the unpacked files. Every fetch has a deadline.
Per-file checksums inside ``aura_config.json`` are checked afterwards by adapter validation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_CHUNK = 1 << 20


class SourceError(Exception):
    """A source could not be fetched. ``kind``: bad_source, not_found, too_large, checksum_mismatch,
    unsafe_archive, timeout, fetch_failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Fetched:
    """A materialised adapter: its immutable cache folder and what it came from."""

    path: Path
    source: str
    digest: str
    bytes: int


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def redact(source: str) -> str:
    """Sources may carry credentials (https://user:pw@host/...); never log or echo them."""
    p = urlparse(source)
    if p.password or p.username:
        return p._replace(netloc=p.hostname + (f":{p.port}" if p.port else "")).geturl()
    return source


class AdapterCache:
    """Content-addressed adapter folders under ``root`` with a total size cap (LRU by last use)."""

    def __init__(self, root: Path, *, max_bytes: int, timeout_s: float, allow_http: bool = False,
                 verify: str | bool = True) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_http = allow_http
        self.verify = verify
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- public --------------------------------------------------------------------------------

    async def fetch(self, source: str, *, sha256: str | None = None,
                    in_use: Callable[[], Iterable[Path]] = tuple) -> Fetched:
        """Materialise ``source`` in the cache (bounded by ``timeout_s``), then trim the cache."""
        try:
            fetched = await asyncio.wait_for(asyncio.to_thread(self._fetch_sync, source, sha256),
                                             timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise SourceError("timeout", f"fetching {redact(source)} took longer than {self.timeout_s:g} s") from None
        await asyncio.to_thread(self.trim, set(in_use()) | {fetched.path})
        return fetched

    def trim(self, keep: set[Path]) -> None:
        """Delete least recently used entries (never those in ``keep``) until under the cap."""
        entries = []
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                entries.append((d.stat().st_mtime, d, _tree_size(d)))
        total = sum(size for _, _, size in entries)
        keep = {Path(k).resolve() for k in keep}
        for _, d, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if d.resolve() in keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size
            log.info("adapter cache entry evicted", extra={"path": str(d), "bytes": size})

    # ---- the work, on a worker thread -------------------------------------------------------------

    def _fetch_sync(self, source: str, sha256: str | None) -> Fetched:
        deadline = time.monotonic() + self.timeout_s
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            archive_digest = self._download(source, staging, deadline)
            if sha256 and archive_digest is not None and archive_digest != sha256.lower():
                raise SourceError("checksum_mismatch", f"{redact(source)}: the archive's sha256 is {archive_digest}, "
                                  f"but the request expects {sha256.lower()}")
            folder = _single_root(staging / "adapter")
            digest = tree_digest(folder)
            if sha256 and archive_digest is None and digest != sha256.lower():
                raise SourceError("checksum_mismatch", f"{redact(source)}: the folder's digest is {digest}, but the "
                                  f"request expects {sha256.lower()} (for folders, the digest of sorted "
                                  "'name sha256' lines; or send an archive and its sha256)")
            size = _tree_size(folder)
            final = self.root / digest
            if final.is_dir():
                os.utime(final)  # most recently used
            else:
                try:
                    os.replace(folder, final)
                except OSError:  # another fetch of the same bytes won the race
                    if not final.is_dir():
                        raise
            return Fetched(final, redact(source), digest, size)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, source: str, staging: Path, deadline: float) -> str | None:
        """Put the adapter's files under ``staging/adapter``; return the archive's sha256 if any."""
        parsed = urlparse(source)
        scheme = parsed.scheme.lower()
        out = staging / "adapter"
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            path = Path(unquote(parsed.path) if scheme == "file" else source).expanduser()
            if not path.exists():
                raise SourceError("not_found", f"{source} does not exist on the server")
            if path.is_dir():
                self._copy_folder(path, out)
                return None
            if not is_archive(path.name):
                raise SourceError("bad_source", f"{source} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
            return self._unpack_file(path, out)
        if scheme in ("http", "https"):
            if scheme == "http" and not self.allow_http:
                raise SourceError("bad_source", "http:// sources are refused (no integrity in transit); use https:// "
                                  "or set AURA_ADAPTER_ALLOW_HTTP=1 on a trusted network")
            archive = staging / ("download" + _archive_suffix(parsed.path))
            digest = self._http_get(source, archive, deadline)
            return self._unpack_file(archive, out, digest)
        if scheme == "s3":
            return self._s3_get(parsed.netloc, parsed.path.lstrip("/"), staging, out, deadline)
        raise SourceError("bad_source", f"unsupported source scheme '{scheme}://'; use a path, file://, s3:// or https://")

    def _copy_folder(self, src: Path, out: Path) -> None:
        out.mkdir(parents=True)
        total = 0
        for f in sorted(src.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_dir():
                continue  # adapters are flat; nested folders (training runs, caches) are not served
            total += f.stat().st_size
            self._check_size(total, str(src))
            shutil.copyfile(f, out / f.name)

    def _check_size(self, total: int, what: str) -> None:
        if total > self.max_bytes:
            raise SourceError("too_large", f"{redact(what)} is larger than the adapter cache "
                              f"({self.max_bytes} bytes, AURA_ADAPTER_CACHE_BYTES)")

    def _http_get(self, url: str, dest: Path, deadline: float) -> str:
        import httpx

        h = hashlib.sha256()
        total = 0
        remaining = max(0.1, deadline - time.monotonic())
        try:
            with httpx.stream("GET", url, timeout=httpx.Timeout(remaining), follow_redirects=True,
                              verify=self.verify) as r:
                if r.status_code == 404:
                    raise SourceError("not_found", f"{redact(url)} answered 404")
                if r.status_code >= 400:
                    raise SourceError("fetch_failed", f"{redact(url)} answered HTTP {r.status_code}")
                declared = int(r.headers.get("content-length") or 0)
                self._check_size(declared, url)
                with open(dest, "wb") as f:
                    for block in r.iter_bytes(_CHUNK):
                        total += len(block)
                        self._check_size(total, url)
                        if time.monotonic() > deadline:
                            raise SourceError("timeout", f"fetching {redact(url)} took longer than {self.timeout_s:g} s")
                        h.update(block)
                        f.write(block)
        except httpx.TimeoutException as e:
            raise SourceError("timeout", f"fetching {redact(url)} timed out ({e})") from None
        except httpx.HTTPError as e:
            raise SourceError("fetch_failed", f"fetching {redact(url)} failed: {e}") from None
        return h.hexdigest()

    def _s3_get(self, bucket: str, key: str, staging: Path, out: Path, deadline: float) -> str | None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as e:  # pragma: no cover - boto3 is a dependency
            raise SourceError("bad_source", "s3:// sources need boto3 (pip install boto3)") from e
        if not bucket:
            raise SourceError("bad_source", "an s3:// source needs a bucket: s3://bucket/prefix/")
        remaining = max(1.0, deadline - time.monotonic())
        client = boto3.client("s3", config=Config(connect_timeout=min(10.0, remaining), read_timeout=remaining,
                                                  retries={"max_attempts": 2}))
        try:
            if is_archive(key):
                dest = staging / ("download" + _archive_suffix(key))
                head = client.head_object(Bucket=bucket, Key=key)
                self._check_size(int(head.get("ContentLength", 0)), f"s3://{bucket}/{key}")
                client.download_file(bucket, key, str(dest))
                return self._unpack_file(dest, out, None)
            prefix = key.rstrip("/") + "/" if key else ""
            objects = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                objects += page.get("Contents", [])
            if not objects:
                raise SourceError("not_found", f"s3://{bucket}/{prefix} holds no files")
            self._check_size(sum(int(o["Size"]) for o in objects), f"s3://{bucket}/{prefix}")
            out.mkdir(parents=True)
            for o in objects:
                name = o["Key"][len(prefix):]
                if not name or "/" in name or name.startswith("."):
                    continue
                if time.monotonic() > deadline:
                    raise SourceError("timeout", f"fetching s3://{bucket}/{prefix} took longer than {self.timeout_s:g} s")
                client.download_file(bucket, o["Key"], str(out / name))
            return None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise SourceError("not_found", f"s3://{bucket}/{key} does not exist ({code})") from None
            raise SourceError("fetch_failed", f"s3://{bucket}/{key}: {e}") from None
        except BotoCoreError as e:
            raise SourceError("fetch_failed", f"s3://{bucket}/{key}: {e}") from None

    def _unpack_file(self, archive: Path, out: Path, digest: str | None = None) -> str:
        if digest is None:
            digest = _sha256(archive)
        name = archive.name.lower()
        out.mkdir(parents=True)
        try:
            if name.endswith(".zip"):
                self._unzip(archive, out)
            else:
                self._untar(archive, out)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise SourceError("unsafe_archive", f"{archive.name}: not a readable archive ({e})") from None
        return digest

    def _untar(self, archive: Path, out: Path) -> None:
        total = 0
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                rel = _safe_member(m.name)
                if m.isdir():
                    continue
                if not m.isfile():
                    raise SourceError("unsafe_archive", f"{archive.name}: '{m.name}' is a link or device; archives "
                                      "may hold regular files only")
                total += m.size
                self._check_size(total, archive.name)
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f, _CHUNK)

    def _unzip(self, archive: Path, out: Path) -> None:
        total = 0
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                rel = _safe_member(info.filename)
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise SourceError("unsafe_archive", f"{archive.name}: '{info.filename}' is a symlink")
                total += info.file_size
                self._check_size(total, archive.name)
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as f:
                    written = 0
                    for block in iter(lambda: src.read(_CHUNK), b""):
                        written += len(block)
                        if written > info.file_size:  # a lying header (zip bomb) is cut off
                            raise SourceError("unsafe_archive", f"{archive.name}: '{info.filename}' is larger than declared")
                        f.write(block)


def _archive_suffix(path: str) -> str:
    low = path.lower()
    return next((s for s in ARCHIVE_SUFFIXES if low.endswith(s)), ".tar.gz")


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or name.startswith("\\"):
        raise SourceError("unsafe_archive", f"archive member '{name}' points outside the adapter folder")
    return p


def _single_root(folder: Path) -> Path:
    """Archives may wrap the files in one top-level folder; accept both layouts."""
    if not folder.is_dir():
        raise SourceError("not_found", "the source holds no files")
    items = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(items) == 1 and items[0].is_dir():
        return items[0]
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(folder: Path) -> str:
    """sha256 over sorted ``"<relative name> <sha256>\\n"`` lines: the identity of a folder's content."""
    lines = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        lines.append(f"{f.relative_to(folder).as_posix()} {_sha256(f)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
