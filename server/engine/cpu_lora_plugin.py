"""vLLM general plugin: run LoRA on the CPU through the segmented punica wrapper.

Registered under the ``vllm.general_plugins`` entry point group (pyproject.toml), so vLLM calls
``register`` in every process it starts (front end, engine core, workers) before building the
model. It changes one thing: on the CPU platform, ``get_punica_wrapper`` names
``server.engine.cpu_lora.SegmentedPunicaWrapperCPU`` instead of vLLM's per-token torch ops. The
installed vLLM is not edited.

It does nothing on other platforms, and nothing when ``AURA_CPU_LORA_KERNEL=vllm`` (the
``cpu_lora_kernel`` setting; the engine exports it before starting vLLM's processes, which
inherit the environment). The choice is read each time vLLM asks for a wrapper, so one process
may build engines of both kinds (the parity test and the LoRA benchmark do).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENTRY_POINT_NAME = "aura_cpu_lora"  # its name in pyproject.toml's vllm.general_plugins group
ENV_VAR = "AURA_CPU_LORA_KERNEL"
SEGMENTED = "segmented"
VLLM = "vllm"
KERNELS = (SEGMENTED, VLLM)
WRAPPER_QUALNAME = "server.engine.cpu_lora.SegmentedPunicaWrapperCPU"


def selected_kernel() -> str:
    """The kernel the environment asks for; unknown values fall back to vLLM's own path."""
    value = os.environ.get(ENV_VAR, SEGMENTED).strip().lower()
    return value if value in KERNELS else VLLM


def register() -> None:
    """Entry point: wrap the CPU platform's ``get_punica_wrapper`` (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    if getattr(platform_cls, "_aura_segmented_lora", False):
        return
    vllm_wrapper = platform_cls.get_punica_wrapper  # bound classmethod

    def get_punica_wrapper(cls: type) -> str:
        return WRAPPER_QUALNAME if selected_kernel() == SEGMENTED else vllm_wrapper()

    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)  # type: ignore[method-assign]
    platform_cls._aura_segmented_lora = True  # type: ignore[attr-defined]
