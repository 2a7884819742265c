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
devices, and a size cap on both the download and the unpacked files, counted as bytes are read.
Per-file checksums inside ``aura_config.json`` are checked by adapter validation, which runs in
the staging folder: rejected content never enters the cache.

What a tenant (a key that is not an admin's) may reach — the server runs with the operator's
rights, so a source is a request to read on the operator's behalf:

* Local paths and ``file://`` only under ``adapter_roots`` (after resolving symlinks); outside
  them every path gets one and the same answer, so a folder, a file, a missing path and
  ``/proc`` look alike. Admin keys and the server's own config may name any path.
* Regular files only, for everyone: devices, FIFOs and links to them are refused before a byte
  is read (``/dev/zero`` reports size 0 and never ends).
* https hosts are resolved once, every address is checked (no loopback, link-local, private,
  multicast or reserved address unless inside ``adapter_allowed_networks``), and the connection
  goes to the checked address (TLS still verifies the host name). Redirects are followed by hand,
  each hop checked the same way, and may not change the scheme except to https. Fetch failures
  read alike whatever answered, so a source cannot be used to map which ports are open.

Every fetch runs on the cache's own small thread pool (never the default executor, where audio
decoding runs), reads in small blocks with a per-read timeout, and checks the overall deadline
and a cancel flag after every read: when the deadline passes the thread really stops.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import lzma
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlparse

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_BLOCK = 64 * 1024  # one read: small, so the deadline is checked often
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
# zlib/lzma raise their own errors on a corrupt stream; zipfile raises NotImplementedError for an
# unknown compression method and RuntimeError for an encrypted member.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error,
                   lzma.LZMAError, ValueError, NotImplementedError, RuntimeError)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOCAL_FORBIDDEN = ("local paths and file:// sources need an admin key, or a path under the server's "
                   "adapter_roots; use https:// or s3://")


class SourceError(Exception):
    """A source could not be fetched. ``kind``: bad_source, forbidden, not_found, too_large,
    checksum_mismatch, unsafe_archive, unsafe_source, timeout, fetch_failed."""

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
        return p._replace(netloc=(p.hostname or "") + (f":{p.port}" if p.port else "")).geturl()
    return source


class _Budget:
    """The deadline and cancel flag of one fetch, checked after every read."""

    def __init__(self, source: str, timeout_s: float) -> None:
        self.source = redact(source)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.cancel = threading.Event()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.cancel.is_set() or time.monotonic() > self.deadline:
            raise SourceError("timeout", f"fetching {self.source} took longer than {self.timeout_s:g} s")


class AdapterCache:
    """Content-addressed adapter folders under ``root`` with a total size cap (LRU by last use)."""

    def __init__(self, root: Path, *, max_bytes: int, timeout_s: float, allow_http: bool = False,
                 verify: str | bool = True, roots: Iterable[Path] = (), allowed_networks: Iterable[str] = (),
                 workers: int = 2, read_timeout_s: float = 10.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_http = allow_http
        self.verify = verify
        self.roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in roots)
        self.allowed_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.read_timeout_s = min(read_timeout_s, timeout_s)
        # Own pool: a slow or hostile source can hold at most these threads, never the loop's
        # default executor that audio decoding and validation share.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-fetch")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    # ---- public --------------------------------------------------------------------------------

    async def fetch(self, source: str, *, sha256: str | None = None,
                    in_use: Callable[[], Iterable[Path]] = tuple, trusted: bool,
                    validate: Callable[[Path], object] | None = None) -> Fetched:
        """Materialise ``source`` in the cache within ``timeout_s``, then trim the cache.

        ``trusted``: the caller is an admin (or the server's own config): any local path, any
        host. ``validate`` runs on the staging folder; what it rejects never enters the cache.
        """
        budget = _Budget(source, self.timeout_s)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._pool, self._fetch_sync, source, sha256, trusted, validate, budget)
        try:
            fetched = await asyncio.wait_for(job, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            budget.cancel.set()  # the worker stops at its next read
            raise SourceError("timeout", f"fetching {redact(source)} took longer than {self.timeout_s:g} s") from None
        except BaseException:
            budget.cancel.set()
            raise
        keep = set(in_use()) | {fetched.path}
        await loop.run_in_executor(self._pool, self.trim, keep)
        return fetched

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    def _fetch_sync(self, source: str, sha256: str | None, trusted: bool,
                    validate: Callable[[Path], object] | None, budget: _Budget) -> Fetched:
        budget.check()  # queued behind other fetches past its deadline: do nothing
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            try:
                archive_digest = self._download(source, staging, budget, trusted)
            except OSError as e:  # a permission error, a vanished file, /proc, a full disk: never a 500
                log.info("adapter source unreadable", extra={"source": redact(source), "error": str(e)})
                if not _is_local(source):
                    raise SourceError("fetch_failed", f"fetching {redact(source)} failed: the server could not "
                                      "store it") from None
                if not trusted:
                    raise SourceError("forbidden", LOCAL_FORBIDDEN) from None
                raise SourceError("not_found", f"{redact(source)} could not be read ({e.strerror})") from None
            if sha256 and archive_digest is not None and archive_digest != sha256.lower():
                raise SourceError("checksum_mismatch", f"{redact(source)}: the archive's sha256 is {archive_digest}, "
                                  f"but the request expects {sha256.lower()}")
            folder = _single_root(staging / "adapter")
            digest = tree_digest(folder, budget)
            if sha256 and archive_digest is None and digest != sha256.lower():
                raise SourceError("checksum_mismatch", f"{redact(source)}: the folder's digest is {digest}, but the "
                                  f"request expects {sha256.lower()} (for folders, the digest of sorted "
                                  "'name sha256' lines; or send an archive and its sha256)")
            if validate is not None:
                validate(folder)  # in staging: a rejected adapter leaves nothing behind
            budget.check()
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

    def _download(self, source: str, staging: Path, budget: _Budget, trusted: bool) -> str | None:
        """Put the adapter's files under ``staging/adapter``; return the archive's sha256 if any."""
        parsed = urlparse(source)
        scheme = parsed.scheme.lower()
        out = staging / "adapter"
        if _is_local(source):
            path = self._local_path(source, parsed.path if scheme == "file" else None, trusted)
            if path.is_dir():
                self._copy_folder(path, out, budget, trusted)
                return None
            if not trusted and not path.exists():
                raise SourceError("not_found", f"{source} is not an adapter folder or archive under the adapter roots")
            if not path.exists():
                raise SourceError("not_found", f"{source} does not exist on the server")
            if not is_archive(path.name):
                raise SourceError("bad_source", f"{source} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
            archive = staging / ("download" + _archive_suffix(path.name))
            digest = self._copy_file(path, archive, budget, 0, str(source))[1]
            return self._unpack_file(archive, out, budget, digest)
        if scheme in ("http", "https"):
            if scheme == "http" and not self.allow_http:
                raise SourceError("bad_source", "http:// sources are refused (no integrity in transit); use https:// "
                                  "or set AURA_ADAPTER_ALLOW_HTTP=1 on a trusted network")
            archive = staging / ("download" + _archive_suffix(parsed.path))
            digest = self._http_get(source, archive, budget, trusted)
            return self._unpack_file(archive, out, budget, digest)
        if scheme == "s3":
            return self._s3_get(parsed.netloc, parsed.path.lstrip("/"), staging, out, budget)
        raise SourceError("bad_source", f"unsupported source scheme '{scheme}://'; use a path, file://, s3:// or https://")

    # ---- local paths -------------------------------------------------------------------------------

    def _under_roots(self, real: str) -> bool:
        return any(real == str(r) or real.startswith(str(r).rstrip(os.sep) + os.sep) for r in self.roots)

    def _local_path(self, source: str, url_path: str | None, trusted: bool) -> Path:
        """The path to read; for tenants only under ``adapter_roots``, with one answer for all else."""
        raw = unquote(url_path) if url_path is not None else source
        if trusted:
            return Path(raw).expanduser()
        if not os.path.isabs(raw):
            raise SourceError("forbidden", LOCAL_FORBIDDEN)
        real = os.path.realpath(raw)  # resolves every symlink: no escaping the roots through a link
        if not self.roots or not self._under_roots(real):
            raise SourceError("forbidden", LOCAL_FORBIDDEN)
        return Path(real)

    def _copy_folder(self, src: Path, out: Path, budget: _Budget, trusted: bool) -> None:
        out.mkdir(parents=True, mode=0o700)
        total = 0
        for f in sorted(src.iterdir()):
            budget.check()
            if f.name.startswith("."):
                continue
            if f.is_dir():
                continue  # adapters are flat; nested folders (training runs, caches) are not served
            if not trusted and not self._under_roots(os.path.realpath(f)):
                raise SourceError("unsafe_source", f"{src}: '{f.name}' links outside the adapter roots")
            total = self._copy_file(f, out / f.name, budget, total, str(src))[0]

    def _copy_file(self, src: Path, dest: Path, budget: _Budget, total: int, what: str) -> tuple[int, str]:
        """Copy one regular file, counting bytes as read; returns (running total, sha256)."""
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not block open
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SourceError("unsafe_source", f"{what}: '{src.name}' is not a regular file (a device, FIFO, "
                                  "socket or a link to one); adapters hold regular files only")
            os.set_blocking(fd, True)
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                total, digest = self._write_stream(f, dest, budget, total, what)
        finally:
            os.close(fd)
        return total, digest

    def _write_stream(self, src: BinaryIO, dest: Path, budget: _Budget, total: int, what: str,
                      limit: int | None = None) -> tuple[int, str]:
        h = hashlib.sha256()
        written = 0
        with _create_private(dest) as out:
            while True:
                block = src.read(_BLOCK)
                if not block:
                    break
                budget.check()
                written += len(block)
                total += len(block)
                if limit is not None and written > limit:  # a lying header (zip bomb) is cut off
                    raise SourceError("unsafe_archive", f"{what}: '{dest.name}' is larger than declared")
                self._check_size(total, what)
                h.update(block)
                out.write(block)
        return total, h.hexdigest()

    def _check_size(self, total: int, what: str) -> None:
        if total > self.max_bytes:
            raise SourceError("too_large", f"{redact(what)} is larger than the adapter cache "
                              f"({self.max_bytes} bytes, AURA_ADAPTER_CACHE_BYTES)")

    # ---- http(s) -----------------------------------------------------------------------------------

    def _check_address(self, addr: IPAddress) -> bool:
        if any(addr in n for n in self.allowed_networks):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)

    def _resolve(self, host: str, port: int, trusted: bool, url: str) -> str:
        """Resolve once; for tenants every address must be public (or allowed). Returns the IP to use."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise SourceError("fetch_failed", f"fetching {redact(url)} failed: the host name does not resolve") from None
        addrs = [ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos]
        if not addrs:
            raise SourceError("fetch_failed", f"fetching {redact(url)} failed: the host name does not resolve")
        if not trusted:
            bad = [a for a in addrs if not self._check_address(a)]
            if bad:
                raise SourceError("forbidden", f"{redact(url)} resolves to a loopback, link-local or private address; "
                                  "tenant sources must be public hosts (or inside adapter_allowed_networks)")
        return str(addrs[0])

    def _http_get(self, url: str, dest: Path, budget: _Budget, trusted: bool) -> str:
        import httpx

        first_scheme = urlparse(url).scheme.lower()
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            budget.check()
            parsed = urlparse(current)
            scheme = parsed.scheme.lower()
            if scheme not in ("http", "https") or (scheme != first_scheme and scheme != "https"):
                raise SourceError("forbidden", f"{redact(url)} redirects to another scheme ({scheme}://); refused")
            if scheme == "http" and not self.allow_http:
                raise SourceError("forbidden", f"{redact(url)} redirects to http://; refused")
            if not parsed.hostname:
                raise SourceError("bad_source", f"{redact(current)} names no host")
            port = parsed.port or (443 if scheme == "https" else 80)
            ip = self._resolve(parsed.hostname, port, trusted, current)
            target = httpx.URL(current).copy_with(host=ip)  # connect to the address that was checked
            host_header = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
            extensions = {"sni_hostname": parsed.hostname} if scheme == "https" else {}
            rt = max(0.1, min(self.read_timeout_s, budget.remaining()))
            timeout = httpx.Timeout(rt, connect=rt)
            try:
                with httpx.Client(verify=self.verify, timeout=timeout, follow_redirects=False,
                                  trust_env=False) as client:
                    req = client.build_request("GET", target, headers={"Host": host_header},
                                               extensions=extensions)
                    r = client.send(req, stream=True)
                    try:
                        if r.status_code in _REDIRECTS and r.headers.get("location"):
                            current = urljoin(current, r.headers["location"])
                            continue
                        if r.status_code >= 400:
                            raise self._http_failure(url, trusted, f"HTTP {r.status_code}",
                                                     "not_found" if r.status_code == 404 else "fetch_failed")
                        self._check_size(int(r.headers.get("content-length") or 0), url)
                        return self._write_stream(_RawStream(r.iter_raw(), budget), dest, budget, 0, url)[1]
                    finally:
                        r.close()
            except httpx.TimeoutException:
                if budget.remaining() <= 0 or budget.cancel.is_set():
                    raise SourceError("timeout", f"fetching {redact(url)} took longer than {self.timeout_s:g} s") from None
                raise self._http_failure(url, trusted, "a read timed out") from None
            except httpx.HTTPError as e:
                raise self._http_failure(url, trusted, str(e)) from None
        raise SourceError("fetch_failed", f"fetching {redact(url)} failed: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _http_failure(url: str, trusted: bool, detail: str, kind: str = "fetch_failed") -> SourceError:
        """Admins get the detail; tenants one text whatever answered (no port scanning by error text)."""
        if trusted:
            return SourceError(kind, f"fetching {redact(url)} failed: {detail}")
        log.info("adapter fetch failed", extra={"source": redact(url), "error": detail})
        return SourceError("fetch_failed", f"fetching {redact(url)} failed; check the URL and that the host serves "
                           "the archive over https")

    # ---- s3 ------------------------------------------------------------------------------------------

    def _s3_get(self, bucket: str, key: str, staging: Path, out: Path, budget: _Budget) -> str | None:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as e:  # pragma: no cover - boto3 is a dependency
            raise SourceError("bad_source", "s3:// sources need boto3 (pip install boto3)") from e
        if not bucket:
            raise SourceError("bad_source", "an s3:// source needs a bucket: s3://bucket/prefix/")
        rt = max(1.0, min(self.read_timeout_s, budget.remaining()))
        client = boto3.client("s3", config=Config(connect_timeout=rt, read_timeout=rt, retries={"max_attempts": 2}))

        def get(k: str, dest: Path, total: int) -> tuple[int, str]:
            body = client.get_object(Bucket=bucket, Key=k)["Body"]
            try:
                return self._write_stream(body, dest, budget, total, f"s3://{bucket}/{key}")
            finally:
                body.close()

        try:
            if is_archive(key):
                dest = staging / ("download" + _archive_suffix(key))
                digest = get(key, dest, 0)[1]
                return self._unpack_file(dest, out, budget, digest)
            prefix = key.rstrip("/") + "/" if key else ""
            objects = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                budget.check()
                objects += page.get("Contents", [])
                if len(objects) > 1000:
                    raise SourceError("bad_source", f"s3://{bucket}/{prefix} holds more than 1000 files")
            if not objects:
                raise SourceError("not_found", f"s3://{bucket}/{prefix} holds no files")
            self._check_size(sum(int(o["Size"]) for o in objects), f"s3://{bucket}/{prefix}")
            out.mkdir(parents=True, mode=0o700)
            total = 0
            for o in objects:
                name = o["Key"][len(prefix):]
                if not name or "/" in name or name.startswith("."):
                    continue
                total = get(o["Key"], out / name, total)[0]
            return None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise SourceError("not_found", f"s3://{bucket}/{key} does not exist ({code})") from None
            raise SourceError("fetch_failed", f"s3://{bucket}/{key}: {e}") from None
        except BotoCoreError as e:
            raise SourceError("fetch_failed", f"s3://{bucket}/{key}: {e}") from None

    # ---- archives ------------------------------------------------------------------------------------

    def _unpack_file(self, archive: Path, out: Path, budget: _Budget, digest: str) -> str:
        name = archive.name.lower()
        out.mkdir(parents=True, mode=0o700)
        try:
            if name.endswith(".zip"):
                self._unzip(archive, out, budget)
            else:
                self._untar(archive, out, budget)
        except _ARCHIVE_ERRORS as e:  # every way a corrupt archive can fail to read: a 4xx, never a 500
            raise SourceError("unsafe_archive", f"{archive.name}: not a readable archive ({e})") from None
        return digest

    def _untar(self, archive: Path, out: Path, budget: _Budget) -> None:
        total = 0
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                budget.check()
                rel = _safe_member(m.name)
                if m.isdir():
                    continue
                if not m.isfile():
                    raise SourceError("unsafe_archive", f"{archive.name}: '{m.name}' is a link or device; archives "
                                      "may hold regular files only")
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                src = tar.extractfile(m)
                assert src is not None
                with src:
                    total = self._write_stream(src, dest, budget, total, archive.name, limit=m.size)[0]

    def _unzip(self, archive: Path, out: Path, budget: _Budget) -> None:
        total = 0
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                budget.check()
                rel = _safe_member(info.filename)
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                    raise SourceError("unsafe_archive", f"{archive.name}: '{info.filename}' is a link or device; "
                                      "archives may hold regular files only")
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with z.open(info) as src:
                    total = self._write_stream(src, dest, budget, total, archive.name, limit=info.file_size)[0]


class _RawStream:
    """A file-like view of an httpx raw byte iterator (each item: one network read)."""

    def __init__(self, chunks: Iterator[bytes], budget: _Budget) -> None:
        self._chunks = chunks
        self._budget = budget

    def read(self, _size: int = -1) -> bytes:
        for chunk in self._chunks:
            self._budget.check()  # a trickle of 1 byte per read still meets the deadline
            if chunk:
                return chunk
        return b""


def _is_local(source: str) -> bool:
    scheme = urlparse(source).scheme.lower()
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _create_private(path: Path) -> BinaryIO:
    """A new file only its owner can read (0600): cached adapters are other tenants' property."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    return os.fdopen(fd, "wb")


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


def _sha256(path: Path, budget: _Budget | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if budget is not None:
                budget.check()
            h.update(block)
    return h.hexdigest()


def tree_digest(folder: Path, budget: _Budget | None = None) -> str:
    """sha256 over sorted ``"<relative name> <sha256>\\n"`` lines: the identity of a folder's content."""
    lines = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        lines.append(f"{f.relative_to(folder).as_posix()} {_sha256(f, budget)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
