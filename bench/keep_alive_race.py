"""The keep-alive race behind the soak's client ReadErrors, shown without a model.

    python -m bench.keep_alive_race                    # server idle timeout 1 s vs 75 s
    python -m bench.keep_alive_race --timeouts 5 75 --idle 5

HTTP/1.1 clients keep connections in a pool between requests; servers close connections that
sat idle for their keep-alive timeout. When a client sends a request on a pooled connection at
the moment the server closes it, the request data reaches a closed socket, the kernel answers
with a reset and the client reads ``ECONNRESET``: ``httpx.ReadError`` for a POST that may or may
not have started. uvicorn's default timeout is 5 s — the same as httpx's ``keepalive_expiry`` —
so any client idling about 5 s between requests races the server. A server timeout longer than
every client's and proxy's idle timeout (``keep_alive_timeout_s``, default 75 s) leaves the
closing to the client, and the race is gone.

Here: a FastAPI app under uvicorn with one POST route taking a multipart upload; ``--clients``
clients each send ``--requests`` requests and idle about ``--idle`` seconds (±2%) between them,
once per server timeout in ``--timeouts``. Prints the errors per timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket

import httpx
import uvicorn
from fastapi import FastAPI, Request


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


async def run(timeout_keep_alive: float, clients: int, requests: int, idle_s: float) -> dict[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="error",
                                           timeout_keep_alive=timeout_keep_alive))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    errors: dict[str, int] = {}
    body = b"x" * 200_000
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=httpx.Limits(keepalive_expiry=max(idle_s * 2, 5.0))) as client:

        async def one_client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(requests):
                try:
                    r = await client.post("/upload", files={"file": ("clip.wav", body)})
                    r.raise_for_status()
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                await asyncio.sleep(rng.uniform(0.98, 1.02) * idle_s)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    server.should_exit = True
    await task
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeouts", type=float, nargs="+", default=[1.0, 75.0], help="server keep-alive timeouts (s)")
    p.add_argument("--idle", type=float, default=None, help="client idle between requests (s; default: the first timeout)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args(argv)
    idle = args.idle if args.idle is not None else args.timeouts[0]
    for timeout in args.timeouts:
        errors = asyncio.run(run(timeout, args.clients, args.requests, idle))
        print(f"server keep-alive {timeout:g} s, client idle ~{idle:g} s: {args.clients * args.requests} requests, "
              f"errors {errors or 0}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
