"""AuRA training: layer-wise distillation from a Whisper teacher into LoRA on a causal LLM.

Modules: ``config`` (what a run is), ``data`` (manifest rows -> examples built with the serving
prompt layout), ``teacher`` (frozen Whisper encoder targets, cached per clip), ``student`` (LLM +
LoRA + audio layer + per-layer heads), ``losses``, ``trainer`` (loop, checkpoints, export),
``evaluate`` (AuRA vs cascade), ``responses`` (DiVA-style answer targets from the base LLM), the
spoken corpus (``texts``: LLM-written and encyclopedia lines + the held-out 4-gram check,
``voices``: espeak-ng accents x variants, ``augment``: noise/reverb/band/speed/gain, ``corpus``:
the resumable builder), ``ctc`` (alignment loss at the audio positions) and ``ddp`` (torchrun).
"""
