"""A segmented punica wrapper for vLLM's CPU platform: one matmul pair per adapter segment.

vLLM's CPU LoRA path (``PunicaWrapperCPU`` over ``vllm/lora/ops/torch_ops``) expands the adapter
index to every token and gathers ``weights[indices]``: a private copy of each LoRA matrix for
every token of every LoRA module, followed by a batched mat-vec. For a rank-16 LoRA on a
576-wide layer that copy is far larger than the work, and the LoRA ends up costing as much as
the layer it adapts.

vLLM lays a batch's tokens out request by request, so the tokens of one adapter form contiguous
runs ("segments"; ``compute_meta`` already merges neighbouring requests of the same adapter).
This wrapper does, per segment and output slice, ``h = scale * (x[s:e] @ A[i].T)`` (shrink) and
``y[s:e, slice].addmm_(h, B[i].T)`` (expand): plain GEMMs on views of the stacked weights, nothing
gathered or copied per token, and no intermediate buffer (adding into a strided block of ``y``
with ``addmm_`` is several times cheaper than materialising the product and adding it). Index -1
(a request without LoRA) gets no delta at all.

The arithmetic follows the torch ops it replaces so outputs match them: the shrink runs in
float32 (the parent's buffer dtype), the expand in the output's dtype. Only the summation order
inside a GEMM differs from the einsum (float rounding).

Nothing here is specific to one model or server: it is written to be proposed upstream as the
body of ``PunicaWrapperCPU``. Until then ``server.engine.cpu_lora_plugin`` selects it through
vLLM's ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

if TYPE_CHECKING:
    from vllm.lora.layers import LoRAMapping

__all__ = ["SegmentedPunicaWrapperCPU", "lora_segments"]

# (start, end, slot): tokens [start, end) use the LoRA in stacked slot `slot`; -1 means none.
Segment = tuple[int, int, int]


def lora_segments(token_lora_indices: torch.Tensor) -> list[Segment]:
    """Contiguous runs of equal adapter slots, in token order (one host sync per step)."""
    if token_lora_indices.numel() == 0:
        return []
    slots, counts = torch.unique_consecutive(token_lora_indices.cpu(), return_counts=True)
    segments: list[Segment] = []
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        segments.append((start, start + count, slot))
        start += count
    return segments


class SegmentedPunicaWrapperCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose linear-layer LoRA ops run one GEMM pair per adapter segment.

    The segments are computed once per step in ``update_metadata`` and reused by every LoRA
    module of the forward pass. ``add_shrink``/``add_expand`` (called on their own by the fully
    sharded layers) are segmented too; embedding and logits LoRA keep the parent's code.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str,
                 **kwargs: Any) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._segments: list[Segment] = []

    def update_metadata(self, mapping: LoRAMapping, lora_index_to_id: list[int | None], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._segments = lora_segments(self.token_lora_indices)

    def add_shrink(self, y: tuple[torch.Tensor, ...] | torch.Tensor, x: torch.Tensor,
                   lora_a_stacked: tuple[torch.Tensor, ...], scale: float, **kwargs: Any) -> None:
        """``y[i][s:e] = scale * (x[s:e] @ lora_a_stacked[i][slot].T)`` per segment; rows of
        segments without LoRA are zeroed (the op assigns, it does not accumulate)."""
        x = x.view(-1, x.shape[-1])
        for slice_idx, weights in enumerate(lora_a_stacked):
            out = y[slice_idx]
            out = out.view(-1, out.shape[-1])
            for start, end, slot in self._segments:
                if slot < 0:
                    out[start:end].zero_()
                    continue
                w = weights[slot].reshape(weights.shape[-2], weights.shape[-1]).to(out.dtype)  # (rank, in)
                delta = x[start:end].to(out.dtype) @ w.T
                if scale != 1.0:
                    delta = scale * delta
                out[start:end, : delta.shape[1]] = delta

    def add_expand(self, y: torch.Tensor, x: tuple[torch.Tensor, ...] | torch.Tensor,
                   lora_b_stacked: tuple[torch.Tensor, ...], output_slices: tuple[int, ...],
                   offset_start: int = 0, add_inputs: bool = True, **kwargs: Any) -> None:
        """``y[s:e, off:off+n] (+)= x[i][s:e] @ lora_b_stacked[i][slot].T`` per segment and slice.

        Rows without LoRA are left alone when adding and zeroed when assigning."""
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for slice_idx, weights in enumerate(lora_b_stacked):
            size = output_slices[slice_idx]
            buf = x[slice_idx]
            for start, end, slot in self._segments:
                target = y2[start:end, offset: offset + size]
                if slot < 0:
                    if not add_inputs:
                        target.zero_()
                    continue
                w = weights[slot].reshape(weights.shape[-2], weights.shape[-1]).to(y2.dtype)  # (out, rank)
                delta = buf[start:end].to(y2.dtype) @ w.T
                if add_inputs:
                    target += delta
                else:
                    target.copy_(delta)
            offset += size

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> None:
        """``y[s:e, slice] += (scale * x[s:e] @ A[slot].T) @ B[slot].T`` per segment and slice.

        The same arithmetic as the parent's shrink-into-float32-buffer then expand, without the
        buffer: each segment's shrink result goes straight into an in-place ``addmm_`` on its
        block of ``y``. Steps where no token uses a LoRA return at once."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        if buffer is not None:  # a caller-provided buffer: keep the two-phase contract
            self.add_shrink(buffer, x, lora_a_stacked, scale, **kwargs)
            self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=True, **kwargs)
            return
        x2 = x.view(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        for start, end, slot in self._segments:
            if slot < 0:
                continue
            xs = x2[start:end].to(torch.float32)
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
                shrunk = xs @ a[slot, 0].to(torch.float32).T  # (tokens, rank), float32 as the buffer
                if scale != 1.0:
                    shrunk = scale * shrunk
                y2[start:end, offset: offset + size].addmm_(shrunk.to(y2.dtype), b[slot, 0].to(y2.dtype).T)
                offset += size
