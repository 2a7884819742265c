"""A strict reader of the server's SSE stream, shared by the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stream:
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks if c["choices"] for t in (c["choices"][0].get("token_ids") or [])]

    @property
    def usage(self) -> dict[str, Any] | None:
        return next((c["usage"] for c in self.chunks if c.get("usage")), None)

    @property
    def finish_reason(self) -> str | None:
        return next((c["choices"][0]["finish_reason"] for c in self.chunks
                     if c["choices"] and c["choices"][0].get("finish_reason")), None)


def parse_sse(lines: list[str]) -> Stream:
    """Every event is one ``data: `` line followed by a blank line; [DONE] ends the stream."""
    out = Stream()
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not out.done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            out.done = True
            continue
        obj = json.loads(payload)
        if "error" in obj:
            out.error = obj["error"]
            continue
        out.chunks.append(obj)
    return out
