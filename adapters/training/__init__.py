"""AuRA training: layer-wise distillation from a Whisper teacher into LoRA on a causal LLM.

Modules: ``config`` (what a run is), ``data`` (manifest rows -> examples built with the serving
prompt layout), ``teacher`` (frozen Whisper encoder targets, cached per clip), ``student`` (LLM +
LoRA + audio layer + per-layer heads), ``losses``, ``trainer`` (loop, checkpoints, export),
``evaluate`` (AuRA vs cascade), ``demo_data`` (espeak-ng corpus) and ``responses`` (DiVA-style
answer targets from the base LLM).
"""
