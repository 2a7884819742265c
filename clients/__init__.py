"""Clients for AuRA serve: they speak HTTP only."""

from clients.sdk import SSE_DONE, AsyncAuraClient, AuraClient, AuraError, ChatResult, parse_event

__all__ = ["SSE_DONE", "AsyncAuraClient", "AuraClient", "AuraError", "ChatResult", "parse_event"]
