"""AuRA serve: the HTTP server for AuRA speech LLMs."""
