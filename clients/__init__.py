"""Clients for AuRA serve: they speak HTTP only."""

from clients.sdk import AsyncAuraClient, AuraClient, AuraError, ChatResult

__all__ = ["AsyncAuraClient", "AuraClient", "AuraError", "ChatResult"]
