"""GET /v1/realtime: OpenAI Realtime over WebSocket (text output), one session per socket.

Thin: authenticate (``Authorization: Bearer`` or the ``openai-insecure-api-key.<key>``
subprotocol browsers use), enforce the session cap and idle timeout, and move JSON text between
the socket and :class:`server.realtime.RealtimeConversation`, which does everything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.errors import APIError
from server.realtime import RealtimeConversation
from server.routes.door import tenant_of
from server.state import ServerState
from server.tenancy import OPEN_PRINCIPAL, Principal

log = logging.getLogger("server.realtime")

router = APIRouter()

_KEY_PROTOCOL = "openai-insecure-api-key."
_REALTIME_PROTOCOL = "realtime"


def _credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """(Authorization header value, subprotocol to echo): the header, else the key subprotocol."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    echo = _REALTIME_PROTOCOL if _REALTIME_PROTOCOL in offered else None
    header = ws.headers.get("authorization")
    if header:
        return header, echo
    for p in offered:
        if p.startswith(_KEY_PROTOCOL):
            return f"Bearer {p[len(_KEY_PROTOCOL):]}", echo
    return None, echo


class _Sessions:
    """How many realtime sessions are open (a per-app counter; the cap is a setting)."""

    def __init__(self) -> None:
        self.open = 0


def _authenticate(state: ServerState, header: str | None) -> Principal:
    return state.tenancy.authenticate(header) if state.tenancy is not None else OPEN_PRINCIPAL


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket, model: str | None = None) -> None:
    state: ServerState = ws.app.state.aura
    sessions: _Sessions | None = getattr(ws.app.state, "realtime_sessions", None)
    if sessions is None:
        sessions = ws.app.state.realtime_sessions = _Sessions()
    header, subprotocol = _credentials(ws)
    await ws.accept(subprotocol=subprotocol)

    async def send(event: dict[str, Any]) -> None:
        await ws.send_text(json.dumps(event))

    async def refuse(message: str, code: str, type_: str, close_code: int) -> None:
        await send({"type": "error", "event_id": "event_refused",
                    "error": {"type": type_, "code": code, "message": message, "param": None, "event_id": None}})
        await ws.close(code=close_code)

    try:
        principal = _authenticate(state, header)
    except APIError as e:
        await refuse(e.message, e.code, e.type, 1008)
        return
    try:
        await state.service.check_accepting()  # draining or a dead engine: say so and close
    except APIError as e:
        await refuse(e.message, e.code, e.type, 1012 if e.code == "draining" else 1011)
        return
    if sessions.open >= state.settings.realtime_max_sessions:
        await refuse(f"{sessions.open} realtime sessions are open, the limit; try again later", "too_many_sessions",
                     "rate_limit_error", 1013)
        return
    sessions.open += 1
    conversation = RealtimeConversation(state.service, principal, tenant_of(principal, ws.headers, state.settings),
                                        send, model=model)
    try:
        await conversation.start()
        while True:
            try:
                async with asyncio.timeout(state.settings.realtime_idle_timeout_s):
                    message = await ws.receive()
            except TimeoutError:
                await refuse(f"no event for {state.settings.realtime_idle_timeout_s:g} s; closing the session",
                             "session_idle_timeout", "invalid_request_error", 1000)
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await conversation.error("binary frames are not accepted; send JSON events as text", "invalid_event")
                continue
            await conversation.handle(text)
    except WebSocketDisconnect:
        return
    finally:
        sessions.open -= 1
        await conversation.close()
