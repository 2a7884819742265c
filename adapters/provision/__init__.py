"""Demo-model provisioning: the demo LLM and teacher, rebuilt from files inside PyPI packages.

Kept apart from the AuRA model pieces (``adapters/*.py``), which training and serving share:
nothing here is part of an adapter or of the served path; it only makes the two demo folders
that ``aura serve`` (no arguments), ``aura train`` and the tests start from when no model hub is
reachable.

- :mod:`.demo` locates the packages and prepares both folders once (``prepare_demo_models``).
- :mod:`.gguf_llm` converts the GGUF LLM; :mod:`.ct2_whisper` the CTranslate2 Whisper teacher,
  with :mod:`.ct2_reader` (the ``model.bin`` format) and :mod:`.whisper_weights` (the name map).
- :mod:`.publish` holds what the converters share (messages, provenance record).
"""
