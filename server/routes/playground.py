"""GET /playground: a browser page to talk to the server (push-to-talk over the realtime socket,
or a dropped file over POST /v1/audio/chat). GET / redirects to it.

The page is static and uses only the public API, so it needs no key on the server side: the
visitor types their own API key, which the page sends as a Bearer header (HTTP) or as the
``openai-insecure-api-key.<key>`` WebSocket subprotocol (browsers cannot set socket headers).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter()

PAGE = Path(__file__).resolve().parent.parent / "static" / "playground.html"


@lru_cache(maxsize=1)
def _page() -> str:
    return PAGE.read_text()


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/playground")
