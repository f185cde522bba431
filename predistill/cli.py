"""The `predistill` console script: one subcommand per pipeline stage, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from predistill import __version__
from predistill.core.artifacts import PredistillError
from predistill.core.config import UsageError

# subcommand → (module, one-line help). A stage appears here only once it is built.
COMMANDS = {
    "tokenizer": ("predistill.stages.tokenizer", "train a byte-level BPE tokenizer on text sources"),
    "prepare": ("predistill.stages.prepare", "turn text sources (or a Megatron dataset) into a token store"),
    "score": ("predistill.stages.score", "mean token log-prob of every instance under a model (MiniPLM scoring)"),
    "sample": (
        "predistill.stages.sample",
        "select instances by Difference Sampling (or a baseline); report; materialise",
    ),
    "sft-data": (
        "predistill.stages.sft",
        "instruction/chat jsonl → a token store whose loss mask marks the responses (SFT)",
    ),
    "generate": (
        "predistill.stages.generate",
        "SeqKD data: teacher continuations of corpus prefixes, as a token store",
    ),
    "train": (
        "predistill.stages.train",
        "pre-train a causal LM (from scratch or not) on a token store, with optional KD",
    ),
    "eval": ("predistill.stages.eval", "held-out LM loss and lm-eval zero-shot accuracy of a model or run"),
    "diversity": (
        "predistill.stages.diversity",
        "how diverse a corpus (or a selection) is: the Vendi score of model embeddings",
    ),
    "select-positions": (
        "predistill.stages.select_positions",
        "a position-selected logits store (by teacher entropy, token difference or at random) from a full one",
    ),
    "export": ("predistill.stages.export", "write a token store in another toolkit's format (Megatron-LM .bin/.idx)"),
    "verify": ("predistill.stages.verify", "check every hash and schema an artifact records, up front"),
    "report": ("predistill.stages.report", "Markdown/HTML comparison table and plots from run directories"),
    "run": ("predistill.stages.recipe", "run a recipe's stages as a DAG, each cached by the hash of its inputs"),
    "demo": (
        "predistill.stages.demo",
        "run the built-in demo recipe (MiniPLM and PD vs baselines) and print the report's path",
    ),
}


class Parser(argparse.ArgumentParser):
    """The top-level parser, which keeps each subcommand's parser (for its usage line in errors)."""

    command_parsers: dict[str, argparse.ArgumentParser]


def build_parser(command: str | None = None) -> Parser:
    """The parser; only `command`'s module is imported (the others' imports cost seconds)."""
    parser = Parser(
        prog="predistill",
        description="Pre-training knowledge distillation: MiniPLM Difference Sampling and "
        "logits-based pre-training distillation (PD). One subcommand per pipeline stage; see docs/<command>.md.",
    )
    parser.add_argument("--version", action="version", version=f"predistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=argparse.ArgumentParser)
    parser.command_parsers = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        parser.command_parsers[name] = p
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args.command_line = "predistill " + shlex.join(argv)  # recorded by stages that save their command
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        module.main(args)
    except UsageError as e:
        parser.command_parsers[args.command].error(str(e))  # exit 2 with the usage line, like argparse's own
    except PredistillError as e:
        print(f"predistill {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a read-only or full disk, a path that is a file: the system's reason, one line
        where = f": {e.filename}" if e.filename else ""
        print(f"predistill {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"predistill {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
