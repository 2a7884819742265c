"""Graceful drain on SIGTERM: stop taking work, let in-flight requests finish, then exit 0.

Plain uvicorn closes its listening socket the moment SIGTERM arrives, so a load balancer still
routing to the pod sees connection errors instead of a clean 503, and it re-raises the signal
after shutdown (exit status -15, which orchestrators read as a crash). Here SIGTERM first turns
the server *draining*: ``/ready`` answers 503, new chat requests get 503 + ``Connection: close``,
requests already admitted (running or queued) carry on. Once they are done — or
``drain_timeout_s`` has passed — uvicorn's ordinary shutdown runs (engine shutdown in the
lifespan) and the process exits 0. A second SIGTERM or a SIGINT skips the wait.

When the engine dies (its process killed, out of memory), the server cannot bring it back in
place: it answers 503 for ``engine_death_exit_s``, then shuts down and exits with status
:data:`EXIT_ENGINE_DEAD` (3), so a supervisor — Kubernetes, systemd ``Restart=on-failure``, Ray —
starts a fresh process. That is the documented recovery: restart by the supervisor, not in place.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("server")

EXIT_ENGINE_DEAD = 3


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task | None = None
        self._drain_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._app.state.stop_server = self._stop
        await super().serve(sockets)

    def _stop(self) -> None:
        """Shut down now (the engine died): no drain, nothing can finish."""
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "aura", None)
        if sig != signal.SIGTERM or self._loop is None or state is None or self._drain_requested:
            # SIGINT, a second SIGTERM, or not started yet: uvicorn's own (quick) shutdown.
            if sig == signal.SIGTERM:
                self.should_exit = True  # not re-raised after shutdown: a drained exit is a clean exit
            else:
                super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        state.admission.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, state)

    def _start_drain(self, state: Any) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(state))

    async def _drain(self, state: Any) -> None:
        admission = state.admission
        t0 = time.monotonic()

        def busy() -> int:
            return admission.busy

        log.info("SIGTERM: draining", extra={"in_flight": busy(), "drain_timeout_s": self.drain_timeout_s})
        while busy() and time.monotonic() - t0 < self.drain_timeout_s and not self.should_exit:
            await asyncio.sleep(0.05)
        log.info("drained; shutting down", extra={"left": busy(), "drain_s": round(time.monotonic() - t0, 2)})
        self.should_exit = True


def serve(app: Any, *, host: str, port: int, access_log: bool, drain_timeout_s: float,
          keep_alive_timeout_s: float = 75.0, metrics_listen: tuple[str, int] | None = None) -> int:
    """Run ``app`` under uvicorn with the draining SIGTERM behaviour; the process exit status.

    ``metrics_listen``: a second (host, port) the same server listens on, for ``/metrics`` only
    (:class:`server.routes.metrics.MetricsListener` keeps each listener to its own routes)."""
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                            timeout_keep_alive=keep_alive_timeout_s,
                            # after the drain only stragglers remain; do not wait long for them
                            timeout_graceful_shutdown=5)
    sockets = None
    if metrics_listen is not None:
        metrics_host, metrics_port = metrics_listen
        sockets = [config.bind_socket(), uvicorn.Config(app, host=metrics_host, port=metrics_port).bind_socket()]
    DrainingServer(config, app, drain_timeout_s).run(sockets=sockets)
    state = getattr(app.state, "aura", None)
    if state is not None and state.fatal:
        log.error("exiting non-zero for a supervisor restart", extra={"reason": state.fatal,
                                                                      "status": EXIT_ENGINE_DEAD})
        return EXIT_ENGINE_DEAD
    return 0
