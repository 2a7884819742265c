"""The ``aura`` command line: serve flags come from the Settings object, so none can lag behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, settings_from_args
from server.config import Settings


def _serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def test_every_setting_has_a_serve_flag_with_help_and_its_env_variable():
    actions = {a.dest: a for a in _serve_parser()._actions}
    for name, field in Settings.model_fields.items():
        dest = "adapter" if name == "adapters" else name
        assert dest in actions, f"setting {name} has no flag"
        assert field.description, f"setting {name} has no description"
        assert f"AURA_{name.upper()}" in actions[dest].help


def test_flags_become_settings_and_old_flag_names_still_work():
    args = build_parser().parse_args([
        "serve", "--max-num-seqs", "4", "--no-enable-prefix-caching", "--config", "t.yaml", "--request-timeout", "5",
        "--adapter", "a=/p", "--engine", "reference", "--tenant-max-concurrent", "2", "--body-read-timeout-s", "3"])
    s = settings_from_args(args)
    assert (s.max_num_seqs, s.enable_prefix_caching, str(s.config_file), s.request_timeout_s) == (4, False, "t.yaml", 5.0)
    assert s.adapters == {"a": "/p"} and s.engine == "reference" and s.tenant_max_concurrent == 2
    assert s.body_read_timeout_s == 3.0


def test_unset_flags_leave_the_environment_in_charge(monkeypatch):
    monkeypatch.setenv("AURA_MAX_STOP_STRINGS", "3")
    assert settings_from_args(build_parser().parse_args(["serve"])).max_stop_strings == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--engine", "nope"])


def test_subcommands_are_grouped():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "ask", "adapter", "train", "eval", "data", "models"} <= set(sub.choices)


def test_there_is_one_cli_and_scripts_call_it():
    """``aura`` (server/cli.py) is the only entry: adapters/cli.py only registers its subcommands,
    and the shell scripts call ``server.cli`` (``adapters.cli`` had no ``eval``, so a script that
    called it for one broke at its last step)."""
    import tomllib

    import adapters.cli

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"aura": "server.cli:main"}
    assert not hasattr(adapters.cli, "main")
    for script in (root / "bench").glob("*.sh"):
        assert "-m adapters.cli" not in script.read_text(), script.name


def test_every_subcommand_renders_its_help():
    """argparse %-formats help text, so one "%" in a generated description (a Settings or
    TrainConfig field) made `aura train --help` crash; every command's help must render."""
    import argparse

    parser = build_parser()
    assert "usage:" in parser.format_help()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = {name: sub for action in subs for name, sub in action.choices.items()}
    assert {"serve", "train", "eval"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "usage:" in text, name
        for nested in (a for a in sub._actions if isinstance(a, argparse._SubParsersAction)):
            for inner in nested.choices.values():
                assert "usage:" in inner.format_help()
