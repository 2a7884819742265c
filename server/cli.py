"""The one ``aura`` command: serve, ask, adapter tools, eval, and (from adapters/cli.py) train, data, models."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from adapters.cli import add_commands
from server.config import Settings
from server.logs import setup_child_logging

if multiprocessing.current_process().name != "MainProcess":
    # A process spawned by multiprocessing (vLLM's engine core) imports the program's main module,
    # this one, before anything else: its logging is set up here, before vLLM's own imports log.
    setup_child_logging()


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got '{text}'")
    return name, path


# Short or historical flag names, kept so existing scripts and docs keep working.
FLAG_ALIASES: dict[str, list[str]] = {
    "config_file": ["--config"],
    "request_timeout_s": ["--request-timeout"],
    "drain_timeout_s": ["--drain-timeout"],
}


def _flag_type(annotation: object) -> tuple[type | None, tuple[str, ...] | None]:
    """(argparse type, choices) for a Settings field's annotation (``X | None`` is X)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return str, tuple(str(a) for a in get_args(annotation))
    if args and get_origin(annotation) is not dict:
        return _flag_type(args[0]) if len(args) == 1 else (str, None)
    for kind in (int, float, str, Path):  # each class is its own argparse parser
        if annotation is kind:
            return kind, None
    return str, None


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`Settings` field (``--max-num-seqs`` for ``max_num_seqs``), with its
    description, its ``AURA_`` variable and its default in the help, so the CLI never lags the
    settings. Flags default to None: an unset flag leaves the environment's value in place."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"AURA_{name.upper()}"
        default = field.default if field.default_factory is None else field.default_factory()
        # argparse %-formats help text: a literal % in a description must not become a format spec
        help_ = f"{field.description or name} [env {env}; default: {default!r}]".replace("%", "%%")
        if name == "adapters":
            parser.add_argument("--adapter", dest="adapter", action="append", type=_adapter_pair,
                                metavar="NAME=PATH", default=[],
                                help=f"adapter to load at start (repeatable) [env {env} as JSON]")
            continue
        names = [flag, *FLAG_ALIASES.get(name, [])]
        if field.annotation is bool:
            parser.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        kind, choices = _flag_type(field.annotation)
        parser.add_argument(*names, dest=name, type=kind, choices=choices, default=None,
                            metavar=name.upper() if choices is None else None, help=help_)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the HTTP server (no arguments: the embedded demo)",
                       description="Start AuRA serve. Every setting is a flag here and an AURA_<NAME> environment "
                                   "variable; flags win over the environment.")
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    fields = set(Settings.model_fields)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if getattr(args, "adapter", None):
        overrides["adapters"] = dict(args.adapter)
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.lifecycle import serve

    settings = settings_from_args(args)
    if settings.replicas is not None:  # Ray Serve; imported here so a plain `aura serve` never imports ray
        from server.cluster.launch import run_cluster

        return run_cluster(settings)
    metrics_listen = None
    if settings.metrics_port is not None:
        metrics_listen = (settings.metrics_host or settings.host, settings.metrics_port)
    return serve(create_app(settings), host=settings.host, port=settings.port, access_log=settings.access_log,
                 drain_timeout_s=settings.drain_timeout_s, keep_alive_timeout_s=settings.keep_alive_timeout_s,
                 metrics_listen=metrics_listen)


def _add_adapter_tools(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="validate, inspect or initialise adapter directories")
    s = p.add_subparsers(dest="adapter_cmd", required=True)
    v = s.add_parser("validate", help="check an adapter with the server's own validation")
    v.add_argument("path", type=Path)
    v.add_argument("--model", type=Path, help="base model folder to check against (fingerprint, targets, shapes)")
    v.add_argument("--max-lora-rank", type=int, default=64)
    v.set_defaults(func=cmd_adapter_validate)
    i = s.add_parser("inspect", help="print an adapter's config and files as JSON")
    i.add_argument("path", type=Path)
    i.set_defaults(func=cmd_adapter_inspect)
    n = s.add_parser("init", help="create a fresh (untrained) adapter for a base model")
    n.add_argument("path", type=Path)
    n.add_argument("--model", type=Path, required=True)
    n.add_argument("--rank", type=int, default=8)
    n.add_argument("--alpha", type=float, default=16.0)
    n.add_argument("--stack-factor", type=int, default=4)
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(func=cmd_adapter_init)


def cmd_adapter_validate(args: argparse.Namespace) -> int:
    from adapters.base_model import read_base_model
    from adapters.validate import AdapterValidationError, validate_adapter

    base = read_base_model(args.model) if args.model else None
    try:
        config = validate_adapter(args.path, base=base, max_lora_rank=args.max_lora_rank)
    except AdapterValidationError as e:
        print(json.dumps({"valid": False, "code": e.code, "file": e.file, "message": e.message}))
        return 2
    print(json.dumps({"valid": True, "base_model": config.base_model.name, "trained": config.trained,
                      "checked_against_base": base is not None}))
    return 0


def cmd_adapter_inspect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from adapters.adapter import read_aura_config

    try:
        lora = json.loads((args.path / "adapter_config.json").read_text())
        config = read_aura_config(args.path)
    except (OSError, ValueError, ValidationError) as e:
        print(f"{args.path}: not a readable AuRA adapter folder ({e}); "
              f"'aura adapter validate {args.path}' says what is wrong", file=sys.stderr)
        return 2
    files = {p.name: p.stat().st_size for p in sorted(args.path.iterdir()) if p.is_file()}
    print(json.dumps({"aura": config.model_dump(), "lora": {k: lora.get(k) for k in
                      ("r", "lora_alpha", "target_modules", "layers_to_transform")}, "files": files}, indent=2))
    return 0


def cmd_adapter_init(args: argparse.Namespace) -> int:
    from adapters.adapter import init_adapter

    out = init_adapter(args.model, args.path, rank=args.rank, alpha=args.alpha,
                       stack_factor=args.stack_factor, seed=args.seed)
    print(str(out))
    return 0


def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="send a spoken question to a running server and stream the answer")
    p.add_argument("audio", type=Path, help="audio file (any container FFmpeg reads)")
    p.add_argument("prompt", nargs="?", help="optional text to go with the audio")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--adapter")
    p.add_argument("--api-key", default=None, help="or AURA_API_KEY")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.set_defaults(func=cmd_ask)


def cmd_ask(args: argparse.Namespace) -> int:
    import os

    from clients import AuraClient, AuraError

    key = args.api_key or os.environ.get("AURA_API_KEY")
    try:
        with AuraClient(args.url, api_key=key) as client:
            for delta in client.chat_stream(args.audio, args.prompt, adapter=args.adapter,
                                            max_tokens=args.max_tokens, temperature=args.temperature):
                print(delta, end="", flush=True)
    except AuraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="AuRA adapter (the served pipeline) vs ASR->LLM cascade: WER, answer "
                                    "agreement, latency")
    p.add_argument("--manifest", required=True)
    p.add_argument("--adapter", help="AuRA adapter directory (default: the adapter the server serves by default, "
                                     "the embedded demo adapter when it fits the model)")
    p.add_argument("--model", help="base LLM folder (default: the demo model)")
    p.add_argument("--teacher", help="Whisper folder for the cascade baseline (default: the demo teacher)")
    p.add_argument("--no-cascade", action="store_true", help="skip the cascade baseline")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--transcribe-prompt", default=None, help="default: the adapter's training prompt")
    p.add_argument("--reference", choices=("engine", "manifest"), default="engine",
                   help="qa reference answers: recomputed by the same engine from the transcript, or the manifest's response")
    p.add_argument("--details", help="write per-clip results as JSONL here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from adapters.provision.demo import DEMO_TEACHER_NAME, demo_models_dir
    from server.evaluation import EvalOptions, run_eval

    teacher = None
    if not args.no_cascade:
        teacher = Path(args.teacher) if args.teacher else demo_models_dir() / DEMO_TEACHER_NAME
        if not (teacher / "config.json").is_file():
            print(f"aura eval: no Whisper teacher at {teacher}; run `aura models demo`, pass --teacher, or "
                  "--no-cascade", file=sys.stderr)
            return 2
    opts = EvalOptions(manifest=Path(args.manifest), adapter=Path(args.adapter) if args.adapter else None,
                       model=Path(args.model) if args.model else None, teacher=teacher, limit=args.limit,
                       max_tokens=args.max_tokens, threads=args.threads, transcribe_prompt=args.transcribe_prompt,
                       reference=args.reference, progress=not args.quiet,
                       details=Path(args.details) if args.details else None)
    print(json.dumps(run_eval(opts), default=str), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aura", description="AuRA serve: speech LLMs as LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_adapter_tools(sub)
    _add_ask(sub)
    _add_eval(sub)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
