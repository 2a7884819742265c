"""Helpers for adapter tests: break adapters on purpose, serve them over loopback HTTP(S) and S3."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import socket
import ssl
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from adapters.adapter import AURA_CONFIG, CHECKSUMMED, sha256_file


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(adapter: Path) -> None:
    """Recompute aura_config.json's per-file sha256 after a deliberate edit, so only the intended
    rule fails (not the checksum one)."""
    cfg = json.loads((adapter / AURA_CONFIG).read_text())
    cfg["files"] = {f: sha256_file(adapter / f) for f in CHECKSUMMED if (adapter / f).exists()}
    (adapter / AURA_CONFIG).write_text(json.dumps(cfg, indent=2))


def edit_json(adapter: Path, name: str, fix_checksums: bool = True, **changes) -> None:
    path = adapter / name
    data = json.loads(path.read_text())
    for k, v in changes.items():
        cur = data
        *parents, leaf = k.split("__")
        for p in parents:
            cur = cur[p]
        if v is DELETE:
            cur.pop(leaf, None)
        else:
            cur[leaf] = v
    path.write_text(json.dumps(data, indent=2))
    if fix_checksums:
        rehash(adapter)


DELETE = object()


def make_tarball(adapter: Path, out: Path, *, top: str | None = "adapter") -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(adapter.iterdir()):
            tar.add(f, arcname=f"{top}/{f.name}" if top else f.name)
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    delay_s = 0.0

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(5)
            self.path = self.path[len("/slow"):]
        super().do_GET()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up (timeout tests)
        pass


@contextlib.contextmanager
def file_server(root: Path, *, certfile: Path | None = None, keyfile: Path | None = None,
                host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``root`` on loopback over HTTP (or HTTPS with a cert); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    with _serve(_QuietServer((host, 0), handler), certfile, keyfile) as url:
        yield url


@contextlib.contextmanager
def _serve(httpd: http.server.HTTPServer, certfile: Path | None = None, keyfile: Path | None = None) -> Iterator[str]:
    """Run ``httpd`` on a thread (TLS when given a cert) and yield its base URL; shut it down after."""
    scheme = "http"
    if certfile is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certfile), str(keyfile))
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"{scheme}://{httpd.server_address[0]}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Trickle:
    """What a trickling server saw: connections open now and in all."""

    def __init__(self) -> None:
        self.open = 0
        self.total = 0
        self.lock = threading.Lock()


@contextlib.contextmanager
def trickle_server(certfile: Path, keyfile: Path, *, host: str = "127.0.0.1",
                   interval_s: float = 0.1) -> Iterator[tuple[str, Trickle]]:
    """An HTTPS server that answers every GET with a 10 MB body sent 1 byte per ``interval_s``
    until the client hangs up; ``Trickle.open`` tells whether the clients really stopped reading."""
    seen = Trickle()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            with seen.lock:
                seen.open += 1
                seen.total += 1
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(10 * 1024 * 1024))
                self.end_headers()
                for _ in range(10 * 1024 * 1024):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(interval_s)
            except OSError:
                pass
            finally:
                with seen.lock:
                    seen.open -= 1

    with _serve(_QuietServer((host, 0), Handler), certfile, keyfile) as url:
        yield url, seen


@contextlib.contextmanager
def redirect_server(location: str, *, certfile: Path, keyfile: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """An HTTPS server that answers every GET with ``302 Location: <location>``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _serve(_QuietServer((host, 0), Handler), certfile, keyfile) as url:
        yield url


def self_signed_cert(out_dir: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A throwaway certificate for ``ips`` (and localhost), for a real TLS round trip."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([*(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = out_dir / "cert.pem", out_dir / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode) on loopback; yields the env a client needs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        srv.stop()


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def upload_adapter(client, bucket: str, prefix: str, adapter: Path) -> None:
    for f in sorted(adapter.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix.rstrip('/')}/{f.name}")
