"""Adapter sources into the content-addressed cache: local, file://, http(s) archives on loopback,
and s3:// against a real S3-compatible server (moto's server mode) on loopback — no mocks."""

from __future__ import annotations

import io
import os
import stat
import time
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapter_helpers import (
    copy_adapter, file_server, make_tarball, moto_s3, redirect_server, s3_client, self_signed_cert, sha256_of,
    trickle_server, upload_adapter,
)
from adapters.validate import validate_adapter
from server.sources import AdapterCache, SourceError, tree_digest


@pytest.fixture
def cache(tmp_path) -> AdapterCache:
    return AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30, allow_http=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


async def test_local_path_and_file_url_share_one_immutable_copy(cache, tiny):
    src = tiny.adapters["alpha"]
    a = await cache.fetch(str(src), trusted=True)
    b = await cache.fetch(src.as_uri(), trusted=True)
    assert a.path == b.path and a.path.parent == cache.root
    assert a.path.name == a.digest == tree_digest(src)
    assert _files(a.path) == _files(src)
    validate_adapter(a.path)
    beta = await cache.fetch(str(tiny.adapters["beta"]), trusted=True)
    assert beta.path != a.path


async def test_folder_sha256_is_checked(cache, tiny):
    src = tiny.adapters["alpha"]
    ok = await cache.fetch(str(src), sha256=tree_digest(src), trusted=True)
    assert ok.path.is_dir()
    with pytest.raises(SourceError) as e:
        await cache.fetch(str(src), sha256="0" * 64, trusted=True)
    assert e.value.kind == "checksum_mismatch"


async def test_missing_and_unsupported_sources(cache, tmp_path):
    for source, kind in [(str(tmp_path / "nope"), "not_found"), ("ftp://host/a.tar.gz", "bad_source"),
                         (str(tmp_path), "not_found")]:
        if source == str(tmp_path):
            (tmp_path / "plain.txt").write_text("x")
            source = str(tmp_path / "plain.txt")
            kind = "bad_source"
        with pytest.raises(SourceError) as e:
            await cache.fetch(source, trusted=True)
        assert e.value.kind == kind, source


async def test_http_archive_with_sha256_and_zip(cache, tiny, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    tgz = make_tarball(tiny.adapters["beta"], www / "beta.tar.gz")
    make_tarball(tiny.adapters["beta"], www / "flat.tgz", top=None)
    with zipfile.ZipFile(www / "beta.zip", "w") as z:
        for f in tiny.adapters["beta"].iterdir():
            z.write(f, f"beta/{f.name}")
    with file_server(www) as url:
        got = await cache.fetch(f"{url}/beta.tar.gz", sha256=sha256_of(tgz), trusted=True)
        assert _files(got.path) == _files(tiny.adapters["beta"])
        assert (await cache.fetch(f"{url}/flat.tgz", trusted=True)).path == got.path  # same content, one copy
        assert (await cache.fetch(f"{url}/beta.zip", trusted=True)).path == got.path
        with pytest.raises(SourceError) as e:
            await cache.fetch(f"{url}/beta.tar.gz", sha256="f" * 64, trusted=True)
        assert e.value.kind == "checksum_mismatch"
        with pytest.raises(SourceError) as e:
            await cache.fetch(f"{url}/missing.tar.gz", trusted=True)
        assert e.value.kind == "not_found"


async def test_https_with_a_real_tls_server(tiny, tmp_path):
    certfile, keyfile = self_signed_cert(tmp_path)
    www = tmp_path / "www"
    www.mkdir()
    make_tarball(tiny.adapters["alpha"], www / "alpha.tar.gz")
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30, verify=str(certfile))
    with file_server(www, certfile=certfile, keyfile=keyfile) as url:
        assert url.startswith("https://")
        got = await cache.fetch(f"{url}/alpha.tar.gz", trusted=True)
        assert _files(got.path) == _files(tiny.adapters["alpha"])
        untrusting = AdapterCache(tmp_path / "cache2", max_bytes=50 * 1024**2, timeout_s=30)
        with pytest.raises(SourceError) as e:  # the system trust store does not know our cert
            await untrusting.fetch(f"{url}/alpha.tar.gz", trusted=True)
        assert e.value.kind == "fetch_failed"


async def test_plain_http_is_refused_unless_allowed(tmp_path):
    strict = AdapterCache(tmp_path / "c", max_bytes=1 << 20, timeout_s=5)
    with pytest.raises(SourceError) as e:
        await strict.fetch("http://127.0.0.1:9/a.tar.gz", trusted=True)
    assert e.value.kind == "bad_source" and "https" in e.value.message


def _evil_tar(path: Path, member: str, *, symlink: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if symlink:
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            data = b"owned"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("member, symlink", [("../escape.json", False), ("/abs/path.json", False),
                                             ("adapter/link.json", True)])
async def test_unsafe_archives_are_refused(cache, tmp_path, member, symlink):
    evil = _evil_tar(tmp_path / "evil.tar.gz", member, symlink=symlink)
    with pytest.raises(SourceError) as e:
        await cache.fetch(str(evil), trusted=True)
    assert e.value.kind == "unsafe_archive"
    assert not (tmp_path / "escape.json").exists()


async def test_size_cap_and_timeout(tiny, tmp_path):
    small = AdapterCache(tmp_path / "small", max_bytes=1000, timeout_s=30, allow_http=True)
    with pytest.raises(SourceError) as e:
        await small.fetch(str(tiny.adapters["alpha"]), trusted=True)
    assert e.value.kind == "too_large"
    www = tmp_path / "www"
    www.mkdir()
    make_tarball(tiny.adapters["alpha"], www / "alpha.tar.gz")
    hasty = AdapterCache(tmp_path / "hasty", max_bytes=50 * 1024**2, timeout_s=1, allow_http=True)
    with file_server(www) as url:
        with pytest.raises(SourceError) as e:
            await hasty.fetch(f"{url}/slow/alpha.tar.gz", trusted=True)  # the test server sleeps 5 s first
    assert e.value.kind == "timeout"
    assert not [p for p in (tmp_path / "hasty").iterdir() if not p.name.startswith(".")]


async def test_cache_trim_keeps_versions_in_use(tiny, tmp_path):
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30)
    a = await cache.fetch(str(tiny.adapters["alpha"]), trusted=True)
    b = await cache.fetch(str(tiny.adapters["beta"]), trusted=True)
    os.utime(a.path, (1, 1))  # alpha is the least recently used
    cache.max_bytes = a.bytes + 10
    cache.trim(keep={a.path})
    assert a.path.is_dir() and not b.path.exists()  # b went although newer: a is in use
    cache.trim(keep=set())
    assert a.path.is_dir()  # exactly at the cap: nothing more to evict


async def test_s3_prefix_and_archive_against_a_real_s3_server(tiny, tmp_path, monkeypatch):
    with moto_s3() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        client = s3_client(env)
        client.create_bucket(Bucket="adapters")
        upload_adapter(client, "adapters", "beta/v1", tiny.adapters["beta"])
        tgz = make_tarball(tiny.adapters["alpha"], tmp_path / "alpha.tar.gz")
        client.upload_file(str(tgz), "adapters", "packed/alpha.tar.gz")
        cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30)

        beta = await cache.fetch("s3://adapters/beta/v1/", trusted=True)
        assert _files(beta.path) == _files(tiny.adapters["beta"])
        alpha = await cache.fetch("s3://adapters/packed/alpha.tar.gz", sha256=sha256_of(tgz), trusted=True)
        assert _files(alpha.path) == _files(tiny.adapters["alpha"])
        for missing in ("s3://adapters/nothing/here/", "s3://adapters/packed/none.tar.gz", "s3://no-bucket/x/"):
            with pytest.raises(SourceError) as e:
                await cache.fetch(missing, trusted=True)
            assert e.value.kind == "not_found", missing


def test_credentials_in_sources_are_never_echoed():
    from server.sources import redact

    assert redact("https://user:secret@example.com:8443/a.tar.gz") == "https://example.com:8443/a.tar.gz"
    assert redact("s3://bucket/prefix/") == "s3://bucket/prefix/"


# ---- what a tenant (an untrusted caller) may reach ------------------------------------------------------

async def test_tenant_local_sources_only_under_the_roots_and_refusals_read_alike(tiny, tmp_path):
    roots = tmp_path / "roots"
    roots.mkdir()
    inside = copy_adapter(tiny.adapters["alpha"], roots / "alpha")
    (roots / "out").symlink_to(tiny.adapters["beta"])
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30, roots=[roots])
    got = await cache.fetch(str(inside), trusted=False)
    assert _files(got.path) == _files(inside)
    assert stat.S_IMODE(cache.root.stat().st_mode) == 0o700 and stat.S_IMODE(got.path.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in got.path.iterdir()} == {0o600}
    messages = set()
    for source in (str(tiny.adapters["beta"]), "/etc/shadow", "/proc/1", "/nope", str(roots / "out"),
                   str(roots / ".." / "cache"), "file:///etc", "relative"):
        with pytest.raises(SourceError) as e:
            await cache.fetch(source, trusted=False)
        assert e.value.kind == "forbidden", source
        messages.add(e.value.message)
    assert len(messages) == 1


async def test_devices_and_fifos_are_refused_for_everyone(tiny, tmp_path):
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30)
    for i, make in enumerate((lambda p: p.symlink_to("/dev/zero"), os.mkfifo)):
        folder = copy_adapter(tiny.adapters["alpha"], tmp_path / f"evil{i}")
        (folder / "adapter_model.safetensors").unlink()
        make(folder / "adapter_model.safetensors")
        t0 = time.monotonic()
        with pytest.raises(SourceError) as e:
            await cache.fetch(str(folder), trusted=True)
        assert e.value.kind == "unsafe_source" and time.monotonic() - t0 < 2


async def test_a_trickling_fetch_really_stops_at_its_deadline(tmp_path):
    certfile, keyfile = self_signed_cert(tmp_path)
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=1, verify=str(certfile))
    with trickle_server(certfile, keyfile) as (url, seen):
        with pytest.raises(SourceError) as e:
            await cache.fetch(f"{url}/a.tar.gz", trusted=True)
        assert e.value.kind == "timeout"
        deadline = time.monotonic() + 2
        while seen.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen.total == 1 and seen.open == 0


async def test_tenant_https_sources_reach_only_public_or_allowed_addresses(tiny, tmp_path):
    certfile, keyfile = self_signed_cert(tmp_path, ips=("127.0.0.1", "127.0.0.2"))
    www = tmp_path / "www"
    www.mkdir()
    make_tarball(tiny.adapters["alpha"], www / "alpha.tar.gz")
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30, verify=str(certfile),
                         allowed_networks=["127.0.0.2/32"])
    with file_server(www, certfile=certfile, keyfile=keyfile) as loopback, \
            file_server(www, certfile=certfile, keyfile=keyfile, host="127.0.0.2") as allowed:
        assert (await cache.fetch(f"{allowed}/alpha.tar.gz", trusted=False)).path.is_dir()
        assert (await cache.fetch(f"{loopback}/alpha.tar.gz", trusted=True)).path.is_dir()  # admins: anywhere
        with pytest.raises(SourceError) as e:
            await cache.fetch(f"{loopback}/alpha.tar.gz", trusted=False)
        assert e.value.kind == "forbidden"
        for target in (f"{loopback}/alpha.tar.gz", "http://127.0.0.2:1/alpha.tar.gz", "file:///etc/passwd"):
            with redirect_server(target, certfile=certfile, keyfile=keyfile, host="127.0.0.2") as hop:
                with pytest.raises(SourceError) as e:
                    await cache.fetch(f"{hop}/alpha.tar.gz", trusted=False)
                assert e.value.kind == "forbidden", target


async def test_corrupt_archives_fail_as_source_or_validation_errors_never_anything_else(tiny, tmp_path):
    """Bit flips in a .tar.gz once escaped as zlib.error (a 500); every failure must be typed."""
    import random

    from adapters.validate import AdapterValidationError

    good = make_tarball(tiny.adapters["alpha"], tmp_path / "good.tar.gz").read_bytes()
    cache = AdapterCache(tmp_path / "cache", max_bytes=50 * 1024**2, timeout_s=30)
    rng = random.Random(5)
    kinds = set()
    for i in range(40):
        data = bytearray(good)
        for _ in range(rng.choice([1, 4, 32])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.tar.gz"
        path.write_bytes(bytes(data))
        try:
            await cache.fetch(str(path), trusted=True, validate=validate_adapter)
            kinds.add("ok")
        except (SourceError, AdapterValidationError) as e:
            kinds.add(type(e).__name__)
    assert "SourceError" in kinds
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".staging")]
