"""Which layers carry the words? A linear CTC probe on frozen audio-position states.

An adapter that distils Whisper well but still transcribes nothing has two possible faults: the
early layers do not carry the words (distillation is the bottleneck), or they do and the LLM
above never learns to read them (the read-out is). This trains the same small probe (LayerNorm +
Linear to two character slots per audio token, i.e. 25 Hz, CTC) on each source's states of the
same training clips and reports its character error rate on held-out clips: Whisper's own
blocks (pooled to the student's rate, the distillation targets), and the student's layers with
the adapter. A student layer close to Whisper's means the information is there.

    python -m bench.probe_layers --adapter A --train-manifest T --heldout-manifest H --clips 600
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from adapters.training.ctc import CHAR_SLOTS, CHARS, ctc_loss, decode_chars, encode_chars, greedy_ctc, normalize_chars
from adapters.training.evaluate import cer


def train_probe(train: list[tuple[torch.Tensor, str]], held: list[tuple[torch.Tensor, str]], *, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    dim = train[0][0].shape[-1]
    probe = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, CHAR_SLOTS * (len(CHARS) + 1)))
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
    rng = random.Random(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return probe(x).reshape(x.shape[0] * CHAR_SLOTS, len(CHARS) + 1)

    for _ in range(steps):
        batch = rng.sample(train, min(32, len(train)))
        out = [logits(x) for x, _ in batch]
        loss = ctc_loss(torch.nn.utils.rnn.pad_sequence(out, batch_first=True), torch.tensor([len(o) for o in out]),
                        [encode_chars(t) for _, t in batch], blank=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    refs, hyps = [], []
    with torch.no_grad():
        for x, text in held:
            out = logits(x)
            refs.append(normalize_chars(text))
            hyps.append(decode_chars(greedy_ctc(out[None], torch.tensor([len(out)]), blank=0)[0]))
    return cer(refs, hyps)


def main() -> None:
    from adapters.training.config import TrainConfig
    from adapters.training.data import collate, read_manifest_absolute, with_features_batch, write_manifest
    from adapters.training.student import decoder_layers
    from adapters.training.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--train-manifest", type=Path, required=True)
    p.add_argument("--heldout-manifest", type=Path, required=True)
    p.add_argument("--clips", type=int, default=600, help="training clips for the probes (transcribe rows)")
    p.add_argument("--layers", default="0,1,4,6,9,14,20", help="student layers (0 = the audio vectors themselves)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/aura_probe"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)

    def subset(src: Path, n: int, name: str) -> Path:
        out = a.work / name
        write_manifest(out, [r for r in read_manifest_absolute(src) if r.task == "transcribe"][:n])
        return out

    train_m, held_m = subset(a.train_manifest, a.clips, "train.jsonl"), subset(a.heldout_manifest, 10_000, "heldout.jsonl")
    layers = [int(x) for x in a.layers.split(",")]
    cfg = TrainConfig.model_validate(dict(
        student=a.student, teacher=a.teacher, manifest=train_m, eval_manifest=held_m, output=a.work / "unused",
        init_from=a.adapter, steps=1, tasks=["transcribe"], progress=False, threads=a.threads,
        layer_map={1: 0, 4: 1, 6: 2, 9: 3}, teacher_context_frames=500, teacher_cache=a.work / "tcache", eval_examples=10_000))
    t = Trainer(cfg)
    t.student.eval()
    inner, blocks = t.student.causal_lm.model, decoder_layers(t.student.causal_lm)
    top = max(layers)

    def states(examples: list) -> dict[str, list[tuple[torch.Tensor, str]]]:
        out: dict[str, list[tuple[torch.Tensor, str]]] = {}
        texts = [t.tokenizer.decode(e.transcript_ids) for e in examples]
        for i, tt in enumerate(t.teacher_targets_for(examples, "teacher")):
            for j in range(tt.shape[0]):
                out.setdefault(f"whisper block {j}", []).append((tt[j].float(), texts[i]))
        for s in range(0, len(examples), 8):
            chunk = examples[s : s + 8]
            b = collate(with_features_batch(chunk, t.setup.features), t.pad_id)
            with torch.no_grad():
                embeds, n_tok = t.student.embed(b.input_ids, b.features, b.frame_lengths, b.audio_starts)
                inner.layers = torch.nn.ModuleList(list(blocks)[: top + 1])
                try:
                    hs = inner(inputs_embeds=embeds, attention_mask=b.attention_mask, use_cache=False, output_hidden_states=True).hidden_states
                finally:
                    inner.layers = blocks
            for k, e in enumerate(chunk):
                st, n = int(b.audio_starts[k]), int(n_tok[k])
                for layer in layers:  # hidden_states[0] = the embeddings (audio vectors), [l+1] = block l's output
                    h = hs[0] if layer == 0 else hs[layer + 1]
                    out.setdefault("student audio vectors" if layer == 0 else f"student layer {layer}", []).append(
                        (h[k, st : st + n].float(), texts[s + k]))
        return out

    t0 = time.time()
    tr, he = states(t.examples), states(t.eval_examples)
    print(f"states of {len(t.examples)} train / {len(t.eval_examples)} held-out clips in {time.time() - t0:.0f} s", file=sys.stderr)
    result = {}
    for name in tr:
        result[name] = round(train_probe(tr[name], he[name], steps=a.steps, seed=0), 4)
        print(f"{name:24s} held-out CER {result[name]:.3f}", file=sys.stderr, flush=True)
    print(json.dumps({"adapter": str(a.adapter), "train_clips": len(t.examples), "heldout_clips": len(t.eval_examples),
                      "steps": a.steps, "cer": result}))


if __name__ == "__main__":
    main()
