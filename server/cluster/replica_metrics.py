"""Per-replica ``/metrics``: each model replica serves its own Prometheus text on its own port.

A replica's numbers live in its process (its ``ServerMetrics`` observer and vLLM's engine
gauges, ``vllm:lora_requests_info`` included), so the ingress cannot answer for them; Prometheus
scrapes every replica instead: the replica with local rank ``r`` listens on
``replica_metrics_port + r``. Every series carries a ``replica`` label, so the ``adapter`` and
``tenant`` labels stay intact and per-replica affinity shows in the dashboards.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("server.cluster")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)$")


def with_label(text: str, name: str, value: str) -> str:
    """Prometheus text with ``name="value"`` added to every sample (comments untouched)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    pair = f'{name}="{escaped}"'
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if m is None:
            out.append(line)
            continue
        metric, labels, rest = m.groups()
        inner = labels[1:-1] if labels else ""
        out.append(f"{metric}{{{pair}{',' + inner if inner else ''}}}{rest}")
    return "\n".join(out) + "\n"


def serve_metrics(host: str, port: int, render: Callable[[], bytes], replica: str) -> ThreadingHTTPServer:
    """Start ``GET /metrics`` on ``host:port`` in a daemon thread (stdlib only: scraping must not
    depend on the replica's event loop, which may be busy with requests)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = with_label(render().decode(), "replica", replica).encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet: one scrape every few seconds
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    log.info("replica metrics endpoint", extra={"replica": replica, "url": f"http://{host}:{port}/metrics"})
    return server
