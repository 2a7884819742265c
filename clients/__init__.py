"""Clients for AuRA serve: they speak HTTP only."""
