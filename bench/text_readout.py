"""Can the LLM read text-like vectors at the audio positions? A read-out ceiling, with no audio.

The oracle (``bench/oracle_readout.py``) showed that even Whisper's own states do not teach the
LLM to write the transcript within the examples a CPU affords. This asks from the other end: if
the audio layer emitted the transcript's own token embeddings, laid over the clip's audio
positions the way a CTC path lays its labels, would the LLM, with or without an adapter's LoRA,
transcribe? If it does, the read-out is free once the audio vectors are lexical, and the audio
side is the whole problem; if not even this is read, the LoRA has to learn the reading itself.

Arms, per transcription row (its clip sets the audio-token count n, as the adapter's audio layer
would; L = the transcript's token count):

- ``text``: the L token embeddings alone (n = L): what a cascade hands the LLM, in the audio slot;
- ``stretched``: each token repeated to fill the n positions (a CTC path without blanks);
- ``blanks``: the L tokens at evenly spread positions, zero vectors between (a CTC path whose
  blank writes nothing);
- ``chars``: the transcript *spelled*, each character (``adapters.training.ctc.CHARS``) as the LLM's
  own single-character token, spread with blanks over the character head's ``CHAR_SLOTS`` x n
  slots: what a character CTC posterior would hand the LLM as soft embeddings. ``--char-noise``
  reads it again with that share of the characters edited (substituted, dropped or inserted),
  which says what character error rate the audio side must reach for a given WER;
- ``pieces``: the transcript, normalised as the character head spells it, cut by the LLM's own
  BPE with only its first ``--merges`` merges (every piece is still one of the LLM's tokens; ~1.7x
  as many as the full cut at 1,024), spread with blanks over the n positions: what a CTC head over
  that small sub-word inventory (``char_ctc_merges``) would hand it. ``--char-noise`` edits its
  characters before the cut, as for ``chars``.

Greedy decoding with the prompt the adapter transcribes with, WER against the transcript.
``--stack-factor`` counts the audio positions as an audio layer stacking that many 50 Hz frames would.

With ``--train-manifest`` it also trains a fresh LoRA (the trainer's targets and rank) on that
manifest's transcripts alone, laid out by ``--train-arm`` over as many positions as their clips
would take (the positions-per-token ratio drawn from a sample of the training clips), with the
next-token loss on the transcript; then reads the held-out rows as above, every ``--eval-every``
steps. That says whether *learning to read* a path at the audio rate is cheap (no audio, no teacher).

    python -m bench.text_readout --student S --manifest C/heldout_resp.jsonl \\
        --adapter adapters/demo_adapter [--adapter A2 ...] --limit 45
    python -m bench.text_readout --student S --manifest C/heldout_resp.jsonl --train-manifest C/train.jsonl \\
        --train-arm blanks --train-steps 300
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adapters.training.ctc import CHAR_SLOTS, CHAR_UNITS, CHARS, Units, normalize_chars, piece_units

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from adapters.adapter import AuraConfig
    from adapters.prompt import PromptLayout

ARMS = ("text", "stretched", "blanks", "chars", "pieces")
TOKEN_ARMS = ARMS[1:3]  # the sub-word paths the "mix" training arm draws from
UNIT_ARMS = ARMS[3:]  # laid out in a CTC head's units (lay_units)


def spell(text: str, rate: float, gen: random.Random) -> str:
    """The transcript as the character head spells it (``CHARS``, lower case), with about ``rate``
    of the characters edited: each, with probability ``rate``, substituted, dropped or followed by
    an inserted one (equally likely), which makes the character error rate ~``rate``."""
    out: list[str] = []
    for c in normalize_chars(text):
        if gen.random() >= rate:
            out.append(c)
            continue
        op = gen.randrange(3)
        if op == 0:
            out.append(gen.choice(CHARS))
        elif op == 2:
            out.extend((c, gen.choice(CHARS)))
    return "".join(out)


def lay_out(tokens: torch.Tensor, n: int, arm: str) -> torch.Tensor:
    """(n', d) vectors for the audio span from (L, d) token embeddings; n' = L for ``text``."""
    count = tokens.shape[0]
    if arm == "text" or count >= n:
        return tokens
    if arm == "stretched":
        return tokens[torch.arange(n) * count // n]
    if arm == "blanks":
        out = torch.zeros(n, tokens.shape[1], dtype=tokens.dtype)
        out[(torch.arange(count) * n) // count] = tokens
        return out
    raise ValueError(f"unknown arm {arm!r}; one of {ARMS}")


def audio_positions(config: AuraConfig, num_samples: int, stack_factor: int | None) -> int:
    """The audio-token count of a clip of ``num_samples`` for ``config``'s layer, or for one that
    stacks ``stack_factor`` frames instead."""
    layer = config.audio_layer if stack_factor is None else config.audio_layer.model_copy(update={"stack_factor": stack_factor})
    return layer.num_tokens(config.features.num_frames(num_samples))


def read_vectors(model: torch.nn.Module, tok: PreTrainedTokenizerBase, layout: PromptLayout, prompt_text: str,
                 text: str, n: int, arm: str, answer: list[int] | None = None,
                 units: Units | None = None) -> tuple[torch.Tensor, int]:
    """Prompt embeddings with ``text`` laid out by ``arm`` over ``n`` audio positions (and the
    ``answer`` ids appended); returns them and the prompt's length. The ``chars`` and ``pieces``
    arms lay ``units`` out (``lay_units``); for ``chars``, ``text`` is already spelled (``spell``)."""
    embed = model.get_input_embeddings()
    if arm in UNIT_ARMS:
        if units is None:
            raise ValueError(f"the {arm} arm needs its units")
        vecs = lay_units(embed, tok, units, text, n)
    else:
        vecs = lay_out(embed(torch.tensor(tok.encode(text, add_special_tokens=False))), n, arm)
    return splice(model, tok, layout, prompt_text, vecs, answer)


def unit_slots(units: Units, n: int) -> int:
    """The slots a clip of ``n`` audio tokens gives ``units``: the character head's ``CHAR_SLOTS``
    per audio token for a spelling (a 25 Hz alphabet needs them), one per audio token for pieces."""
    return CHAR_SLOTS * n if units.token_ids is None else n


def unit_token_ids(units: Units, tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """The LLM token of each unit (class k + 1 -> row k): its own single-character tokens for a
    spelling, the pieces' own ids for pieces."""
    return char_token_ids(tok) if units.token_ids is None else torch.tensor(units.token_ids)


def lay_units(embed: torch.nn.Module, tok: PreTrainedTokenizerBase, units: Units, text: str, n: int) -> torch.Tensor:
    """``text`` in ``units``, each as its LLM token's embedding, spread with blanks over
    ``unit_slots(units, n)``: what a CTC head over those units hands the LLM on its best path.
    A text with no units is all blanks."""
    ids = units.encode(text)
    slots = unit_slots(units, n)
    if not ids:
        return torch.zeros(slots, embed.weight.shape[1])
    return lay_out(embed(unit_token_ids(units, tok)[torch.tensor(ids) - 1]), slots, "blanks")


@functools.cache
def char_token_ids(tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """The LLM's own single-character token for each of ``CHARS`` (SmolLM2 and most byte-level BPEs have one).
    Cached per tokenizer: every laid-out row asks for it."""
    ids = [tok.encode(c, add_special_tokens=False) for c in CHARS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer spells some of {CHARS!r} with more than one token")
    return torch.tensor([i[0] for i in ids])


def splice(model: torch.nn.Module, tok: PreTrainedTokenizerBase, layout: PromptLayout, prompt_text: str,
           vecs: torch.Tensor, answer: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Prompt embeddings with ``vecs`` (n, d) in the audio span (and the ``answer`` ids appended);
    returns them and the prompt's length."""
    from adapters.prompt import build_prompt, user_turn

    embed = model.get_input_embeddings()
    prompt = build_prompt(tok, layout, [user_turn(vecs.shape[0], prompt_text)])
    start, length = prompt.audio_spans[0]
    embeds = embed(torch.tensor(prompt.token_ids + (answer or [])))
    embeds = torch.cat([embeds[:start], vecs, embeds[start + length :]])
    return embeds, len(prompt.token_ids)


def train_reader(model: torch.nn.Module, tok: PreTrainedTokenizerBase, layout: PromptLayout, prompt_text: str,
                 texts: list[str], ratios: list[float], args: argparse.Namespace, eot: int,
                 on_eval: Callable[[int], None], units: dict[str, Units]) -> None:
    """Train ``model``'s LoRA to transcribe ``texts`` laid out by ``args.train_arm`` at the audio rate."""
    gen = random.Random(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        model.train()
        seqs, labels = [], []
        for _ in range(args.batch_size):
            text = gen.choice(texts)
            target = tok.encode(text, add_special_tokens=False)
            n = max(len(target), round(len(target) * gen.choice(ratios)))
            arm = gen.choice(TOKEN_ARMS) if args.train_arm == "mix" else args.train_arm
            laid = spell(text, gen.uniform(0.0, args.train_char_noise), gen) if arm in UNIT_ARMS else text
            embeds, plen = read_vectors(model, tok, layout, prompt_text, laid, n, arm, target + [eot], units.get(arm))
            seqs.append(embeds)
            labels.append(torch.tensor([-100] * plen + target + [eot]))
        width = max(e.shape[0] for e in seqs)
        batch = torch.zeros(len(seqs), width, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100)
        for i, (e, y) in enumerate(zip(seqs, labels, strict=True)):
            batch[i, : e.shape[0]], mask[i, : e.shape[0]], lab[i, : y.shape[0]] = e, 1, y
        loss = model(inputs_embeds=batch, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step == 1 or step % 10 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)}),
                  file=sys.stderr, flush=True)
        if step % args.eval_every == 0 or step == args.train_steps:
            model.eval()
            on_eval(step)


def save_reader(model: torch.nn.Module, args: argparse.Namespace, shape: AuraConfig) -> Path:
    """The text-trained LoRA as an adapter folder: a fresh audio layer of ``shape``'s layout (what
    ``init_adapter`` makes) and provenance saying what the LoRA learned. Untrained on audio."""
    from adapters.adapter import init_adapter, load_adapter, read_aura_config, save_adapter

    layer = shape.audio_layer
    out = init_adapter(args.student, args.save_reader, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                       features=shape.features, conv_channels=layer.conv_channels, stack_factor=layer.stack_factor,
                       encoder_layers=layer.encoder_layers, encoder_heads=layer.encoder_heads, prompt=shape.prompt,
                       seed=args.seed)
    config = read_aura_config(out).model_copy(update={"training": {
        "text_reader": {"arm": args.train_arm, "steps": args.train_steps, "manifest": args.train_manifest.name,
                        "manifest_path": str(args.train_manifest.resolve()),
                        "stack_factor": layer.stack_factor if args.stack_factor is None else args.stack_factor}}})
    return save_adapter(out, config=config, audio_layer=load_adapter(out).audio_layer, peft_model=model)


def reader_training_texts(config: AuraConfig) -> set[str] | None:
    """The normalised transcripts of a saved reader's training manifest (``save_reader``'s provenance), so a
    read can refuse sentences the reader learned from; None for a reader that does not name the manifest's path."""
    from adapters.training.data import read_manifest_absolute

    path = config.training.get("text_reader", {}).get("manifest_path")
    if not path or not Path(path).is_file():
        return None
    return {normalize_chars(r.text) for r in read_manifest_absolute(path) if r.task == "transcribe"}


def main(argv: list[str] | None = None) -> int:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.adapter import DEFAULT_TARGETS, DEMO_ADAPTER_DIR, load_adapter, new_lora_config
    from adapters.audio import load_audio_file
    from adapters.base_model import read_base_model
    from adapters.prompt import end_of_turn_id
    from adapters.training.data import read_manifest_absolute
    from adapters.training.evaluate import cer, wer
    from adapters.training.student import greedy_from_embeds

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, required=True, help="the base LLM folder the adapters were trained on")
    p.add_argument("--manifest", type=Path, required=True, help="held-out rows to read (transcription rows are used)")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="an adapter whose LoRA also reads (repeatable); the first sets the audio-token rate and prompt "
                        "(default: adapters/demo_adapter, read without its LoRA unless named)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--stack-factor", type=int, default=None, help="count audio positions as a layer stacking this many frames")
    p.add_argument("--merges", type=int, default=1024, help="pieces: the BPE merges kept (of the LLM's own, in order)")
    p.add_argument("--char-noise", type=float, nargs="+", default=[0.0],
                   help="chars, pieces: read the held-out transcripts with each of these shares of their characters "
                        "edited (0 = clean), as a head that misspells would hand them")
    p.add_argument("--limit", type=int, default=45)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--show", type=int, default=2, help="example hypotheses printed per model and arm")
    p.add_argument("--json", type=Path, help="write the results here too")
    t = p.add_argument_group("training a reader (text only)")
    t.add_argument("--train-manifest", type=Path, help="train a fresh LoRA on these rows' transcripts")
    t.add_argument("--train-arm", choices=(*ARMS[1:], "mix"), default="blanks",
                   help="the path the reader learns: one arm, or mix (stretched and blanks)")
    t.add_argument("--train-char-noise", type=float, default=0.0,
                   help="chars, pieces: edit each training transcript's characters at a rate drawn from [0, this] "
                        "before it is laid out (a reader that corrects a head's misspellings)")
    t.add_argument("--train-steps", type=int, default=300)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lora-rank", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-reader", type=Path, help="write the trained LoRA here as an adapter folder (a fresh audio "
                                                    "layer of the first adapter's shape), for a run's init_from")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    units = {"chars": CHAR_UNITS}  # each unit arm's units
    if "pieces" in (*args.arms, args.train_arm):
        units["pieces"] = piece_units(args.student, args.merges)

    shape_from = load_adapter(args.adapter[0] if args.adapter else DEMO_ADAPTER_DIR)
    cfg = shape_from.config
    tok = AutoTokenizer.from_pretrained(str(args.student))
    eot = end_of_turn_id(tok)
    eos = {eot} | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    rows = [r for r in read_manifest_absolute(args.manifest) if r.task == "transcribe"][: args.limit]
    if not rows:
        print(f"text_readout: no transcription rows in {args.manifest}", file=sys.stderr)
        return 2
    counts = [audio_positions(cfg, len(load_audio_file(r.audio).samples), args.stack_factor) for r in rows]
    stats = {"rows": len(rows), "audio_tokens_mean": sum(counts) / len(counts),
             "text_tokens_mean": sum(len(tok.encode(r.text, add_special_tokens=False)) for r in rows) / len(rows)}
    if "pieces" in units:
        stats["pieces_mean"] = sum(len(units["pieces"].encode(r.text)) for r in rows) / len(rows)
    print(json.dumps(stats), file=sys.stderr, flush=True)
    results: list[dict[str, object]] = []

    # what each read feeds: (column, arm, held-out inputs); chars once per noise level, spelled per row with a fixed seed
    reads: list[tuple[str, str, list[str]]] = []
    for arm in args.arms:
        if arm not in UNIT_ARMS:
            reads.append((arm, arm, [r.text for r in rows]))
            continue
        for rate in args.char_noise:
            spelled = [spell(r.text, rate, random.Random(args.seed * 100003 + i)) for i, r in enumerate(rows)]
            measured = cer([normalize_chars(r.text) for r in rows], spelled)
            reads.append((f"{arm} (CER {measured:.2f})" if rate > 0 else arm, arm, spelled))
    columns = [c for c, _, _ in reads]

    def read_all(model: torch.nn.Module, label: str, prompt_text: str) -> None:
        for column, arm, inputs in reads:
            t0, hyps = time.perf_counter(), []
            for laid, n in zip(inputs, counts, strict=True):
                with torch.no_grad():
                    embeds, _ = read_vectors(model, tok, cfg.prompt, prompt_text, laid, n, arm, units=units.get(arm))
                ids = greedy_from_embeds(model, embeds, max_new_tokens=args.max_tokens, eos_ids=eos)
                hyps.append(tok.decode([i for i in ids if i not in eos], skip_special_tokens=True).strip())
            res = {"model": label, "arm": column, "wer": wer([r.text for r in rows], hyps), "rows": len(rows),
                   "seconds": round(time.perf_counter() - t0, 1),
                   "examples": [{"ref": r.text, "hyp": h} for r, h in list(zip(rows, hyps, strict=True))[: args.show]]}
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)

    def fresh_base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(args.student), dtype=torch.float32).eval()

    labels = ["base LLM (no LoRA)"]
    read_all(fresh_base(), labels[0], shape_from.transcribe_prompt)
    for i, a in enumerate(args.adapter):
        labels.append(f"LoRA of {a}")
        prompt_text = (shape_from if i == 0 else load_adapter(a)).transcribe_prompt
        read_all(PeftModel.from_pretrained(fresh_base(), str(a)).eval(), labels[-1], prompt_text)
    if args.train_manifest is not None:
        train_rows = [r for r in read_manifest_absolute(args.train_manifest) if r.task == "transcribe"]
        held = {r.text for r in rows}
        texts = [r.text for r in train_rows if r.text not in held]
        if not texts:
            print(f"text_readout: no transcription rows in {args.train_manifest} that are not read as held-out", file=sys.stderr)
            return 2
        ratios = []
        for r in train_rows[:64]:
            n_tok = len(tok.encode(r.text, add_special_tokens=False))
            ratios.append(audio_positions(cfg, len(load_audio_file(r.audio).samples), args.stack_factor) / max(1, n_tok))
        print(json.dumps({"train_texts": len(texts), "positions_per_token": sorted(ratios)[len(ratios) // 2]}),
              file=sys.stderr, flush=True)
        base = fresh_base()
        lora = new_lora_config(read_base_model(args.student), rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                               target_modules=DEFAULT_TARGETS)
        model = get_peft_model(base, lora)

        def on_eval(step: int) -> None:
            labels.append(f"text-trained LoRA ({args.train_arm}), step {step}")
            read_all(model, labels[-1], shape_from.transcribe_prompt)

        train_reader(model, tok, cfg.prompt, shape_from.transcribe_prompt, texts, ratios, args, eot, on_eval, units)
        if args.save_reader is not None:
            save_reader(model, args, cfg)

    print(f"\n| reader | {' | '.join(columns)} |")
    print("|---|" + "---|" * len(columns))
    for label in labels:
        cells = [next(f"{r['wer']:.3f}" for r in results if r["model"] == label and r["arm"] == a) for a in columns]
        print(f"| {label} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
