"""The audio layer's share of an AuRA model's parameters and of one request's FLOPs (issue 10: both ≤ 5%).

    python -m bench.audio_layer_cost [--adapter DIR] [--model DIR] [--seconds 3 10 30]
                                     [--response-tokens 32] [--encoder-layers 0 1 2]
                                     [--encoder-stride 1 2 4] [--lookahead K]

Defaults: the embedded demo adapter on the demo LLM. ``--encoder-layers`` prices the same adapter
with that many Whisper-shaped blocks in its audio layer (what ``audio_encoder_layers`` trains),
``--encoder-stride`` with its blocks on the mean of that many stem frames (``audio_encoder_stride``; the
stacking shrinks to keep the adapter's tokens per second) and ``--lookahead`` with its blocks seeing K block
frames ahead, so a recipe can be checked against the budget before it is trained.

What is counted (2 FLOPs per multiply-add; norms, activations and softmax are left out on both
sides): the audio layer's convolutions, blocks (causal attention included) and projection
(``AudioLayerConfig.flops``, tested against torch's FLOP counter); the LLM's linear layers and
LoRA for every prompt and generated token, causal attention over the context, and the LM head
for generated tokens only (vLLM computes logits only where it samples). Parameters: the audio
layer against base + LoRA + audio layer.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import get_args

from transformers import AutoTokenizer

from adapters.adapter import AUDIO_WEIGHTS, DEMO_ADAPTER_DIR, LORA_WEIGHTS, audio_layer_params, read_aura_config
from adapters.audio_layer import AudioLayerConfig, EncoderMerge
from adapters.base_model import BaseModelInfo, read_base_model
from adapters.prompt import build_prompt, user_turn
from adapters.validate import safetensors_header
from bench.common import machine

QUESTION = "Answer the question in the audio."


def tensor_params(path: Path) -> int:
    return sum(math.prod(shape) for shape, _ in safetensors_header(path, path.name).values())


def llm_flops(base: BaseModelInfo, lora_rank: int, lora_modules: list[str], prompt_tokens: int, generated: int) -> int:
    """Forward FLOPs of the LLM for one request: prefill of the prompt, then one token at a time."""
    per_token = sum(2 * o * i for o, i in base.linear_shapes.values())
    per_token += sum(2 * lora_rank * sum(base.linear_shapes[m]) for m in lora_modules if m in base.linear_shapes)
    per_token *= base.num_hidden_layers
    tokens = prompt_tokens + generated
    q_width = base.linear_shapes.get("q_proj", (base.hidden_size, base.hidden_size))[0]
    attention = base.num_hidden_layers * 2 * 2 * q_width * tokens * (tokens + 1) // 2
    head = generated * 2 * base.hidden_size * base.vocab_size
    return tokens * per_token + attention + head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, default=DEMO_ADAPTER_DIR)
    parser.add_argument("--model", type=Path, default=None, help="Base LLM folder (default: the demo LLM, prepared once).")
    parser.add_argument("--seconds", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--encoder-layers", type=int, nargs="+", default=None,
                        help="Price the audio layer with these many blocks instead of the adapter's own.")
    parser.add_argument("--encoder-stride", type=int, nargs="+", default=None,
                        help="... with its blocks on the mean of this many stem frames (the stacking divided by it).")
    parser.add_argument("--lookahead", type=int, default=None, help="... with its blocks seeing this many frames ahead.")
    parser.add_argument("--encoder-merge", choices=get_args(EncoderMerge), default=None,
                        help="... merging a stride's stem frames this way (linear: a learned matrix; default: the adapter's).")
    args = parser.parse_args()

    if args.model is None:
        from adapters.provision.demo import prepare_demo_models

        args.model = prepare_demo_models(progress=False).llm
    config = read_aura_config(args.adapter)
    base = read_base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    lora_cfg = json.loads((args.adapter / "adapter_config.json").read_text())
    lora_rank, lora_modules = int(lora_cfg["r"]), list(lora_cfg["target_modules"])
    base_params = sum(tensor_params(p) for p in sorted(Path(args.model).glob("*.safetensors")))
    lora_params = tensor_params(args.adapter / LORA_WEIGHTS)
    assert tensor_params(args.adapter / AUDIO_WEIGHTS) == audio_layer_params(config.audio_layer)

    own = config.audio_layer
    layers: list[AudioLayerConfig] = []
    for n in args.encoder_layers if args.encoder_layers is not None else [own.encoder_layers]:
        for stride in args.encoder_stride if args.encoder_stride is not None else [own.encoder_stride]:
            if stride > 1 and (not n or own.frames_per_token % stride):
                continue  # a stride pools for blocks, and must keep the adapter's frames per token
            layers.append(AudioLayerConfig.model_validate({
                **own.model_dump(), "encoder_layers": n, "encoder_stride": stride,
                "stack_factor": own.frames_per_token // stride,
                "encoder_merge": (args.encoder_merge or own.encoder_merge) if stride > 1 else "mean",
                "encoder_lookahead": (own.encoder_lookahead if args.lookahead is None else args.lookahead) if n else 0}))
    print(f"# {machine()}; base {base.architecture} {base_params / 1e6:.1f}M params, LoRA r={lora_rank} "
          f"{lora_params / 1e6:.2f}M; answer {args.response_tokens} tokens")
    print("| audio layer | params | share of params | " + " | ".join(f"{s:g} s: FLOPs share" for s in args.seconds) + " |")
    print("|---|---|---|" + "---|" * len(args.seconds))
    rows = []
    for layer in layers:
        params = audio_layer_params(layer)
        shares = []
        for seconds in args.seconds:
            frames = config.features.num_frames(int(seconds * config.features.sample_rate))
            prompt = build_prompt(tokenizer, config.prompt, [user_turn(layer.num_tokens(frames), QUESTION)])
            audio = layer.flops(frames)
            llm = llm_flops(base, lora_rank, lora_modules, len(prompt.token_ids), args.response_tokens)
            shares.append(audio / (audio + llm))
            rows.append({"encoder_layers": layer.encoder_layers, "encoder_stride": layer.encoder_stride,
                         "encoder_merge": layer.encoder_merge,
                         "encoder_lookahead": layer.encoder_lookahead, "seconds": seconds, "audio_gflops": audio / 1e9,
                         "llm_gflops": llm / 1e9, "prompt_tokens": len(prompt.token_ids), "share": shares[-1]})
        share_p = params / (params + base_params + lora_params)
        blocks = f"conv stem + {layer.encoder_layers} block(s)"
        if layer.encoder_layers:
            blocks += f" at {20 * layer.encoder_stride} ms, {layer.encoder_lookahead} ahead"
            if layer.encoder_stride > 1:
                blocks += f", {layer.encoder_merge} merge"
        print(f"| {blocks} | {params / 1e6:.2f}M | {share_p:.1%} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
