"""The console script: one subcommand per built stage, documented flags."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from predistill import cli


def test_help_lists_exactly_the_built_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    section = out.split("COMMAND\n", 1)[1].split("\noptions:")[0]
    listed = set(re.findall(r"^    (\S+)", section, flags=re.M))
    assert listed == set(cli.COMMANDS) and {"tokenizer", "prepare"} <= listed
    for name, (module, _) in cli.COMMANDS.items():  # no placeholders: each is a real module
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.main), name


def test_prepare_help_documents_the_required_flags():
    out = subprocess.run(
        [sys.executable, "-m", "predistill", "prepare", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--source",
        "--tokenizer",
        "--out",
        "--max-len",
        "--val-fraction",
        "--workers",
        "--skip-bad",
        "--max-tokens-per-domain",
    ):
        assert flag in out
    assert "builtin:shakespeare" in out and "jsonl:PATH[:FIELD]" in out


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", "--source", "builtin:python"])
    assert info.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err


def ranged_settings():
    """(command, leaf) for every setting of every stage that declares an interval."""
    from predistill.core.config import leaves

    for command in cli.COMMANDS:
        parser = cli.build_parser(command).command_parsers[command]
        cls = parser.get_default("config_class")
        for leaf in leaves(cls) if cls else ():
            if leaf.field.metadata.get("interval"):
                yield command, leaf


def outside(interval: str, integer: bool) -> list[str]:
    """Values just outside an interval, and the non-finite ones."""
    from predistill.core.config import _bounds

    low, high = _bounds(interval)
    step = 1 if integer else 1e-9 * max(1.0, abs(low))
    bad = [] if low == float("-inf") else [low - step if interval[0] == "[" else low]
    bad += [] if high == float("inf") else [high + (1 if integer else 1e-9) if interval[-1] == "]" else high]
    bad = [str(int(v)) if integer else repr(float(v)) for v in bad]
    return bad + ([] if integer else ["nan", "inf", "-inf"])


def test_the_class_declares_ranges_on_every_numeric_setting():
    from predistill.core.config import leaves

    unranged = []
    for command in cli.COMMANDS:
        cls = cli.build_parser(command).command_parsers[command].get_default("config_class")
        unranged += [
            f"{command} {leaf.flag}"
            for leaf in (leaves(cls) if cls else ())
            if leaf.type in (int, float) and not leaf.field.metadata.get("interval")
        ]
    assert unranged == []


@pytest.mark.parametrize("command,leaf", list(ranged_settings()), ids=lambda x: getattr(x, "flag", x))
def test_every_declared_range_refuses_what_lies_outside_it_on_the_cli_and_in_a_config_file(
    command, leaf, tmp_path, capsys
):
    for value in outside(leaf.field.metadata["interval"], leaf.type is int):
        with pytest.raises(SystemExit) as info:
            cli.main([command, f"{leaf.flag}={value}"])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 1 and err.count("\n") == 0 and f"{leaf.flag} must be" in err, (value, err)
        config = tmp_path / "c.toml"  # the same check for a config file's value (TOML has nan and inf)
        config.write_text(f"{leaf.key} = {value.replace('inf', 'inf').lower()}\n")
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--config", str(config)])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 1 and f"{leaf.flag} must be" in err, (value, err)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("x = " + "9" * 5000 + "\n", "unreadable"),
        ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", "unreadable|invalid"),
    ],
)
def test_a_pathological_config_file_is_one_line(tmp_path, capsys, text, reason):
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(reason, err), err
