"""Run one fixed multi-LoRA batch through vLLM's offline engine and print the tokens as JSON.

Used by tests/test_cpu_lora.py, once per CPU LoRA kernel (``AURA_CPU_LORA_KERNEL``), each in its own
process so each engine is built from scratch. The batch is deterministic (all requests are added
before the first step) and mixes adapters, ranks, a request without LoRA, and one prompt given as
embeddings; a small token budget splits long prompts into chunks, so steps mix prefill chunks with
decode tokens.

    python tests/lora_kernel_probe.py OUT.json MODEL NAME=PATH...
"""

from __future__ import annotations

import json
import os
import sys

MAX_TOKENS = 12
# Prompt lengths in tokens: short ones start decoding while the long ones are still in chunks.
PROMPT_LENGTHS = (5, 90, 17, 130, 33, 8, 61, 12)


def main(out: str, model: str, adapters: list[tuple[str, str]], spare_slots: int = 1) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt
    from vllm.lora.request import LoRARequest

    from adapters.base_model import read_base_model

    llm = LLM(model=model, dtype="float32", enable_lora=True, max_lora_rank=16,
              # One slot more than adapters: vLLM's own CPU ops apply the LAST slot to tokens
              # without LoRA (index -1 wraps), so that slot must stay empty for a fair comparison.
              max_loras=len(adapters) + spare_slots, max_num_seqs=8, max_num_batched_tokens=64,
              enable_chunked_prefill=True, enable_prefix_caching=False, enable_prompt_embeds=True,
              enforce_eager=True, max_model_len=512, seed=0, gpu_memory_utilization=0.3,
              # Linear layers only, as the server does (vLLM's embedding LoRA breaks on embeds).
              lora_target_modules=list(read_base_model(model).linear_modules))
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters)]
    vocab = llm.get_tokenizer().vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts: list[TokensPrompt | EmbedsPrompt] = []
    requests: list[LoRARequest | None] = []
    for i, n in enumerate(PROMPT_LENGTHS):
        ids = torch.randint(100, vocab - 1, (n,), generator=gen).tolist()
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        # Adapters in runs and alone, plus one request without LoRA (index 3).
        requests.append(None if i == 3 else loras[(i // 2) % len(loras)])
    # The same long prompt with no LoRA and with every adapter: the test checks these differ,
    # so the comparison cannot pass with LoRA silently ignored.
    for lora in [None, *loras]:
        prompts.append(prompts[1])
        requests.append(lora)
    # One prompt as embeddings (AuRA's path), with the first adapter.
    hidden = llm.llm_engine.model_config.get_hidden_size()
    prompts.append(EmbedsPrompt(prompt_embeds=torch.randn(24, hidden, generator=gen) * 0.5))
    requests.append(loras[0])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    with open(out, "w") as f:  # a file: vLLM logs to stdout
        json.dump([list(o.outputs[0].token_ids) for o in outs], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [tuple(a.split("=", 1)) for a in sys.argv[3:]],  # type: ignore[misc]
         spare_slots=int(os.environ.get("PROBE_SPARE_SLOTS", "1")))
