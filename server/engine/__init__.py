"""Engines behind one small interface: vLLM (production) and plain PyTorch (reference/oracle)."""

from server.engine.base import Engine, EngineDead, GenerationChunk, GenerationRequest, SamplingOptions

__all__ = ["Engine", "EngineDead", "GenerationChunk", "GenerationRequest", "SamplingOptions"]
