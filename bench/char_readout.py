"""Speech to text through a character bottleneck: a run's character head, read by a text-trained LoRA.

The runs' character CTC head (``char_ctc_weight``, RMSNorm + Linear on an early block) learns to
spell unseen speakers within a CPU's budget, while the LM-head CTC over 49k sub-words and the
next-token loss do not. This joins it to a reader of spellings (``bench/text_readout.py
--train-arm chars --save-reader``: a LoRA trained on text alone, spelled in the LLM's own
single-character tokens) on held-out clips: the run's checkpoint spells each clip (its character
posteriors, ``CHAR_SLOTS`` per audio token), the posteriors become vectors in the LLM's input space
(``soft``: the probability-weighted mix of the character tokens' embeddings, the blank adding
nothing; ``hard``: the best character's embedding, or zero for a blank; ``collapsed``: the best
path's units, repeats merged and blanks dropped, laid out again with blanks exactly as the reader
was trained, over ``CHAR_SLOTS`` x n slots for characters and n for pieces), and the reader
transcribes them greedily. WER against the transcript says what a character bottleneck gives with that reader,
with no next-token training on audio; the clips' character error rate beside it says how much of
the loss is the spelling and how much the reading (stop 26, ``bench/OPEN_VOCAB_LOG.md``: CER 0.295
from the teacher-state oracle, WER 1.11 through a 960-line reader that reads clean spellings at 1.16).
A run whose head spells in pieces (``char_ctc_merges``) is read the same way, its vectors the pieces'
own token embeddings, by a reader trained with ``--train-arm pieces`` and the same ``--merges``.

A reader whose training manifest (its provenance names the path) holds any of the held-out sentences is
refused before anything is read: the number would be on text the reader learned.

Pass the run's own flags (its ``--config`` and overrides, ``--work-dir``) so its checkpoint loads
(the fingerprint is checked), and ``--oracle`` for a ``bench/oracle_readout.py`` run:

    python -m bench.char_readout --reader RUNS/char_readout/reader_chars --oracle \\
        --config bench/train_oracle_full_cpu.yaml --student S --teacher T --manifest ROWS \\
        --eval-manifest C/heldout.jsonl --teacher-cache $AURA_HOME/teacher_cache --work-dir RUN/work
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from adapters.training.ctc import CHAR_SLOTS, greedy_ctc, normalize_chars
from bench.text_readout import lay_out, reader_training_texts, splice, unit_slots, unit_token_ids

MODES = ("soft", "hard", "collapsed")


def char_vectors(logits: torch.Tensor, table: torch.Tensor, mode: str, slots: int | None = None) -> torch.Tensor:
    """(S, 1 + units) character-head logits of one clip -> input vectors from ``table`` (units, d),
    the units' own token embeddings (characters, or pieces). Id 0 is the blank and writes a zero
    vector. ``soft`` and ``hard`` give one vector per head position (S); ``collapsed`` gives
    ``slots``: the best path (``greedy_ctc``) spread with blanks as ``text_readout.lay_out`` spreads a
    reader's training rows, since a head's path repeats a unit over frames and a reader never saw that."""
    if mode == "collapsed":
        if slots is None:
            raise ValueError("collapsed vectors need the reader's slot count")
        ids = greedy_ctc(logits[None], torch.tensor([logits.shape[0]]), blank=0)[0]
        return lay_out(table[torch.tensor(ids, dtype=torch.long) - 1], slots, "blanks")
    probs = torch.softmax(logits.float(), dim=-1)
    if mode == "hard":
        probs = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
    elif mode != "soft":
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    return probs[:, 1:] @ table


def main(argv: list[str] | None = None) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.adapter import load_adapter, read_aura_config
    from adapters.prompt import end_of_turn_id
    from adapters.training.config import add_config_flags, config_from_flags
    from adapters.training.evaluate import cer, wer
    from adapters.training.student import greedy_from_embeds
    from adapters.training.trainer import ConfigError, Trainer
    from bench.oracle_readout import install

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every `aura train` flag works here too: give the run's own, so its checkpoint loads.")
    p.add_argument("--reader", type=Path, required=True, help="the text-trained reader (bench/text_readout.py --save-reader)")
    p.add_argument("--oracle", action="store_true", help="the run is a bench/oracle_readout.py run (teacher in the audio layer)")
    p.add_argument("--teacher-layer", type=int, default=None, help="with --oracle: the run's --teacher-layer")
    p.add_argument("--checkpoint", type=Path, help="default: the newest in --work-dir")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--limit", type=int, default=45, help="held-out clips read (the run's eval rows, every task: each has a transcript)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--show", type=int, default=3, help="example transcripts printed per mode")
    p.add_argument("--json", type=Path, help="write the results here too, with every clip's spelling and transcript")
    add_config_flags(p)
    args = p.parse_args(argv)
    if args.work_dir is None:
        p.error("--work-dir is required: the run's checkpoints are there")
    try:
        trainer = Trainer(config_from_flags(args, {"output": Path(args.work_dir) / "not-exported"}))
        if args.oracle:
            install(trainer, args.teacher_layer)
        ckpt = args.checkpoint or (trainer.checkpoints() or [None])[-1]
        if ckpt is None:
            raise ConfigError(f"no checkpoint in {args.work_dir}")
        step = trainer.load_checkpoint(Path(ckpt))
        examples = trainer.eval_examples[: args.limit]
        if not examples:
            raise ConfigError("the run has no held-out rows (--eval-manifest)")
        refs = [trainer.tokenizer.decode(e.transcript_ids).strip() for e in examples]
        seen = reader_training_texts(read_aura_config(args.reader))
        if seen is None:
            print("char_readout: the reader does not name its training manifest's path; cannot check that it never "
                  "saw these sentences", file=sys.stderr)
        elif overlap := [r for r in refs if normalize_chars(r) in seen]:
            raise ConfigError(f"the reader was trained on {len(overlap)} of these {len(refs)} held-out sentences "
                              f"(e.g. {overlap[0]!r}); read clips whose sentences its --train-manifest does not hold")
        logits = trainer.char_logits(examples)  # 1. the run spells each held-out clip (after the check: it is the slow part)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"char_readout: {e}", file=sys.stderr)
        return 2
    units = trainer.units
    spelled = [units.decode(h) for h in greedy_ctc(torch.nn.utils.rnn.pad_sequence(logits, batch_first=True),
                                                   torch.tensor([x.shape[0] for x in logits]), blank=0)]
    char_cer = cer([units.decode(e.transcript_chars) for e in examples], spelled)
    print(json.dumps({"checkpoint": str(ckpt), "step": step, "units": units.name, "clips": len(examples),
                      "char_cer": round(char_cer, 4)}),
          file=sys.stderr, flush=True)
    del trainer

    # 2. the reader transcribes the spellings
    reader_adapter = load_adapter(args.reader)
    base = AutoModelForCausalLM.from_pretrained(str(args.student), dtype=torch.float32)
    reader = PeftModel.from_pretrained(base, str(args.reader)).eval()
    tok = AutoTokenizer.from_pretrained(str(args.student))
    eos = {end_of_turn_id(tok)} | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    with torch.no_grad():
        table = reader.get_input_embeddings()(unit_token_ids(units, tok))
    results: dict[str, object] = {"checkpoint": str(ckpt), "step": step, "clips": len(examples), "char_cer": char_cer,
                                  "units": units.name, "char_slots": CHAR_SLOTS, "reader": str(args.reader)}
    wers: dict[str, float] = {}
    for mode in args.modes:
        t0, hyps, unended = time.perf_counter(), [], 0
        for lg in logits:
            with torch.no_grad():
                embeds, _ = splice(reader, tok, reader_adapter.config.prompt, reader_adapter.transcribe_prompt,
                                   char_vectors(lg, table, mode, unit_slots(units, lg.shape[0] // CHAR_SLOTS)))
            ids = greedy_from_embeds(reader, embeds, max_new_tokens=args.max_tokens, eos_ids=eos)
            hyps.append(tok.decode([i for i in ids if i not in eos], skip_special_tokens=True).strip())
            unended += not any(i in eos for i in ids)  # ran to --max-tokens: usually a loop
        wers[mode] = wer(refs, hyps)
        rows = [{"ref": r, "spelled": s, "hyp": h} for r, s, h in zip(refs, spelled, hyps, strict=True)]
        res = {"mode": mode, "wer": wers[mode], "unended": unended, "seconds": round(time.perf_counter() - t0, 1),
               "examples": rows[: args.show]}
        print(json.dumps(res), file=sys.stderr, flush=True)
        results[mode] = {**res, "rows": rows}
    print(f"\n| checkpoint | step | char CER | {' | '.join(f'{m} WER' for m in args.modes)} |")
    print("|---|---|---|" + "---|" * len(args.modes))
    cells = " | ".join(f"{wers[m]:.3f}" for m in args.modes)
    print(f"| {Path(str(ckpt)).name} | {step} | {char_cer:.3f} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
