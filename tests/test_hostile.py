"""Hostile and broken input, table-driven: every case ends in one line on stderr naming the problem,
a non-zero exit, no traceback, no artifact that claims completion, and foreign files untouched.

Each row is (case id, the command line built from the shared assets, the words the error must
contain). The assets are built once: a copy of the test token store, two score tables, a logits
store and a finished run, each corrupted per case in a copy of its own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from predistill import cli
from predistill.core.artifacts import sha256_file, write_manifest
from predistill.formats import megatron
from predistill.formats.logits import LogitsConfig
from predistill.formats.store import TokenStore
from predistill.stages.score import ScoreConfig
from predistill.stages.score import run as score
from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train

# α held constant: 2 steps of the default WSD-α would both have α = 0 (warmup, decay) and never read the logits
TRAIN = [
    "--model",
    "preset:tiny",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-instances",
    "4",
    "--alpha-schedule",
    "constant",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_store):
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    shutil.copytree(tiny_store, store)
    tables = {}
    for role, seed in (("teacher", 1), ("reference", 2)):
        tables[role] = score(
            ScoreConfig(
                model="preset:tiny",
                seed=seed,
                store=str(store),
                out=str(root / role),
                progress=False,
                shard_size=64,
                logits_out=str(root / "logits") if role == "teacher" else None,
                logits=LogitsConfig(mode="topk"),
            )
        )
    run_dir = train(
        TrainConfig(
            store=str(store),
            out=str(root / "run"),
            model="preset:tiny",
            steps=2,
            batch_size=2,
            seq_len=32,
            eval_instances=4,
        )
    )
    return {
        "root": root,
        "store": store,
        "teacher": tables["teacher"],
        "reference": tables["reference"],
        "logits": root / "logits",
        "run": run_dir,
    }


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def store_with(t: Path, a, corrupt) -> str:
    store = copy(a["store"], t / "store")
    corrupt(store)
    return str(store)


def overwrite_tokens(store: Path, first_id: int) -> None:
    data = bytearray((store / "tokens.bin").read_bytes())
    data[:2] = np.array([first_id], dtype=np.uint16).tobytes()  # same size, other content
    (store / "tokens.bin").write_bytes(bytes(data))


def edited_selection(t: Path, a) -> str:
    sel = t / "sel"
    sel.mkdir()
    np.save(sel / "selection.npy", np.arange(0, 10, dtype=np.int64))
    write_manifest(
        sel,
        {
            "format": "selection",
            "store_hash": json.loads((a["store"] / "manifest.json").read_text())["store_hash"],
            "selection_sha256": sha256_file(sel / "selection.npy"),
        },
    )
    np.save(sel / "selection.npy", np.arange(10, 20, dtype=np.int64))  # edited after "sampling"
    return str(sel)


def logits_with(t: Path, a, corrupt) -> str:
    ldir = copy(a["logits"], t / "logits")
    corrupt(ldir / "shards")
    return str(ldir)


def swap_first_ids(order: Path) -> None:
    data = order.read_bytes()
    order.write_bytes(data[4:8] + data[:4] + data[8:])  # same size: only the checksum can tell


def truncated_megatron(t: Path, a) -> str:
    store = TokenStore(a["store"])
    megatron.write(t / "mm", [store[0][:16]], store.vocab_size)  # 16 uint16 ids: 32 bytes
    (t / "mm.bin").write_bytes((t / "mm.bin").read_bytes()[:-2])
    return str(t / "mm")


def file_at(t: Path) -> str:
    (t / "a-file").write_text("not a directory")
    return str(t / "a-file")


def foreign_dir(t: Path) -> str:
    (t / "foreign").mkdir()
    (t / "foreign" / "config.json").write_text('{"model_type": "llama"}')  # an HF model dir, say
    (t / "foreign" / "notes.txt").write_text("mine")
    return str(t / "foreign")


def symlink_to(t: Path, target: Path) -> str:
    target.mkdir()
    (t / "link").symlink_to(target, target_is_directory=True)
    return str(t / "link")


def json_file(t: Path, text: str) -> str:
    (t / "c.json").write_text(text)
    return str(t / "c.json")


def recipe(t: Path, extra: str) -> str:
    (t / "r.toml").write_text('[[stage]]\nname = "a"\ncommand = "prepare"\nargs = { out = "{self}" }\n' + extra)
    return str(t / "r.toml")


def t5_config(t: Path) -> Path:
    from transformers import T5Config

    T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(t / "t5")
    return t / "t5"


def toml(t: Path, text: str) -> str:
    (t / "c.toml").write_text(text)
    return str(t / "c.toml")


def incomplete_run(t: Path, a) -> str:
    run = copy(a["run"], t / "run")
    (run / "manifest.json").unlink()  # killed before it finished
    return str(run)


def just_started_run(t: Path, a) -> str:
    """A run killed right after writing its config.json: no metrics, no checkpoint, no model."""
    run = t / "run"
    run.mkdir()
    (run / "config.json").write_bytes((a["run"] / "config.json").read_bytes())
    return str(run)


CASES = [
    # --- outputs that cannot be written ---
    (
        "prepare --out under a file",
        lambda t, a: [
            "prepare",
            "--source",
            "builtin:python",
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--out",
            file_at(t) + "/x",
        ],
        "Not a directory",
    ),
    (
        "train --out FILE",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", file_at(t), *TRAIN],
        "not a directory",
    ),
    (
        "train --out a foreign directory",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", foreign_dir(t), *TRAIN],
        "is not a run",
    ),
    (
        "eval --out DIR",
        lambda t, a: ["eval", "--model", str(a["run"]), "--store", str(a["store"]), "--out", str(t)],
        "is a directory",
    ),
    ("report --out FILE", lambda t, a: ["report", str(a["run"]), "--out", file_at(t)], "not a directory"),
    (
        "run --root FILE",
        lambda t, a: ["run", "recipes/demo.toml", "--root", file_at(t), "--dry-run"],
        "not a directory",
    ),
    # --- numbers that would train into NaN ---
    (
        "train --lr nan",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--lr", "nan"],
        "--lr must be finite",
    ),
    (
        "train --lr inf",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--lr", "inf"],
        "--lr must be finite",
    ),
    (
        "train --eps nan",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--eps", "nan"],
        "--eps must be finite",
    ),
    (
        "train --beta1 2",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--beta1", "2"],
        "--beta1 must be finite and in [0, 1)",
    ),
    (
        "train --weight-decay nan",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--weight-decay", "nan"],
        "--weight-decay must be finite",
    ),
    (
        "train --flops-budget nan",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--flops-budget", "nan"],
        "--flops-budget must be finite",
    ),
    (
        "train --flops-budget 0",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(t / "o"), *TRAIN, "--flops-budget", "0"],
        "--flops-budget must be finite and in (0, inf)",
    ),
    (
        "--config with a string for an integer",
        lambda t, a: ["train", "--config", toml(t, 'steps = "three"\n'), "--store", "S", "--out", "O"],
        "is not an integer",
    ),
    (
        "--config JSON that is not an object",
        lambda t, a: ["train", "--config", json_file(t, "[1, 2]")],
        "expected a table of settings",
    ),
    (
        "--config with an unknown choice",
        lambda t, a: [
            "score",
            "--config",
            toml(t, 'logits_mode = "all"\n'),
            "--model",
            "m",
            "--store",
            "s",
            "--out",
            "o",
        ],
        "choose from",
    ),
    # --- artifacts changed or broken after they were written ---
    (
        "tokens.bin changed in place",
        lambda t, a: [
            "train",
            "--store",
            store_with(t, a, lambda s: overwrite_tokens(s, 7)),
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "changed since the store was written",
    ),
    (
        "store manifest without dtype",
        lambda t, a: [
            "train",
            "--store",
            store_with(t, a, lambda s: edit_json(s / "manifest.json", dtype=None)),
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "lacks dtype",
    ),
    (
        "selection.npy edited after sampling",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--selection",
            edited_selection(t, a),
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "changed since the selection was made",
    ),
    (
        "logits shard with zeroed bytes",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-logits",
            logits_with(
                t, a, lambda d: (d / "00000.bin").write_bytes(bytes(300) + (d / "00000.bin").read_bytes()[300:])
            ),
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "changed since the logits store was written",
    ),
    (
        "logits shard truncated",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-logits",
            logits_with(t, a, lambda d: (d / "00000.bin").write_bytes((d / "00000.bin").read_bytes()[:-50])),
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "missing or truncated",
    ),
    (
        "logits id ranking edited (two ids swapped)",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-logits",
            logits_with(t, a, lambda d: swap_first_ids(d.parent / "id_order.bin")),
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "id_order.bin: changed since the logits store was written",
    ),
    (
        "logits marker corrupt",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-logits",
            logits_with(t, a, lambda d: (d / "00000.json").write_text("{not json")),
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "changed since the logits store was written",
    ),
    (
        "an unfinished run given to eval",
        lambda t, a: ["eval", "--model", incomplete_run(t, a), "--store", str(a["store"]), "--out", str(t / "e.json")],
        "unfinished run directory",
    ),
    (
        "a run killed right after its config.json, given to eval",
        lambda t, a: [
            "eval",
            "--model",
            just_started_run(t, a),
            "--store",
            str(a["store"]),
            "--out",
            str(t / "e.json"),
        ],
        "unfinished run directory",
    ),
    (
        "a directory without a model given to eval",
        lambda t, a: ["eval", "--model", str(a["store"]), "--store", str(a["store"]), "--out", str(t / "e.json")],
        "no config.json",
    ),
    (
        "prepare --checkpoint-tokens 0",
        lambda t, a: [
            "prepare",
            "--source",
            "builtin:python",
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--out",
            str(t / "o"),
            "--checkpoint-tokens",
            "0",
        ],
        "--checkpoint-tokens must be ≥ 1",
    ),
    (
        "prepare from a Megatron dataset whose .bin is cut short",
        lambda t, a: [
            "prepare",
            "--source",
            "megatron:" + truncated_megatron(t, a),
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--out",
            str(t / "o"),
        ],
        "holds 30 bytes, the index's lengths say 32",
    ),
    (
        "prepare --source store: of a store whose tokens changed",
        lambda t, a: [
            "prepare",
            "--source",
            "store:" + store_with(t, a, lambda s: overwrite_tokens(s, 7)),
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--out",
            str(t / "o"),
        ],
        "changed since the store was written",
    ),
    (
        "prepare --source store: beside a text source",
        lambda t, a: [
            "prepare",
            "--source",
            f"store:{a['store']}",
            "--source",
            "builtin:python",
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--out",
            str(t / "o"),
        ],
        "cannot be mixed with other --source specs",
    ),
    (
        "train --kd-logits with a store neither its own nor re-tokenised from it",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"] / "val"),
            "--kd-logits",
            str(a["logits"]),
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "is neither that store nor re-tokenised from it",
    ),
    # --- position-selected logits stores ---
    (
        "select-positions into a folder that is not a logits store",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["logits"]),
            "--store",
            str(a["store"]),
            "--rule",
            "random",
            "--out",
            foreign_dir(t),
        ],  # fmt: skip
        "is not a logits store; refusing to write into it",
    ),
    (
        "select-positions through a symlinked --out",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["logits"]),
            "--store",
            str(a["store"]),
            "--rule",
            "random",
            "--out",
            symlink_to(t, t / "elsewhere"),
        ],  # fmt: skip
        "is a symbolic link; refusing to write through it",
    ),
    (
        "select-positions from a score table",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["teacher"]),
            "--store",
            str(a["store"]),
            "--rule",
            "random",
            "--out",
            str(t / "o"),
        ],  # fmt: skip
        "is a 'score_table' artifact, expected 'logits_store'",
    ),
    (
        "select-positions --rule entropy without the teacher's record",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["logits"]),
            "--store",
            str(a["store"]),
            "--rule",
            "entropy",
            "--out",
            str(t / "o"),
        ],  # fmt: skip
        "add --teacher-record",
    ),
    (
        "select-positions --teacher-record that is a score table",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["logits"]),
            "--store",
            str(a["store"]),
            "--rule",
            "entropy",
            "--teacher-record",
            str(a["teacher"]),
            "--out",
            str(t / "o"),
        ],  # fmt: skip
        "is a 'score_table' artifact, expected 'token_record'",
    ),
    (
        "select-positions --samples from a top-p-k store",
        lambda t, a: [
            "select-positions",
            "--logits",
            str(a["logits"]),
            "--store",
            str(a["store"]),
            "--rule",
            "random",
            "--samples",
            "2",
            "--out",
            str(t / "o"),
        ],  # fmt: skip
        "holds top-p-k entries, not draws",
    ),
    (
        "train --token-rule excess without the reference's record",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--token-rule",
            "excess",
            "--token-fraction",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],  # fmt: skip
        "--token-rule excess needs --reference-record",
    ),
    (
        "train --kd-positions without a KD source",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-positions",
            "student-entropy",
            "--kd-position-fraction",
            "0.2",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],  # fmt: skip
        "needs --kd-logits or --kd-teacher",
    ),
    (
        "score --logits-positions without --logits-out",
        lambda t, a: [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(a["store"]),
            "--out",
            str(t / "o"),
            "--logits-positions",
            "entropy",
        ],  # fmt: skip
        "add --logits-out",
    ),
    (
        "score --logits-positions difference without the reference's record",
        lambda t, a: [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(a["store"]),
            "--out",
            str(t / "o"),
            "--logits-out",
            str(t / "l"),
            "--logits-positions",
            "difference",
        ],  # fmt: skip
        "reference model's token record",
    ),
    (
        "score --logits-position-fraction without a rule",
        lambda t, a: [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(a["store"]),
            "--out",
            str(t / "o"),
            "--logits-out",
            str(t / "l"),
            "--logits-position-fraction",
            "0.5",
        ],  # fmt: skip
        "need --logits-positions RULE",
    ),
    (
        "train --kd-loss uld with a temperature",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--kd-logits",
            str(a["logits"]),
            "--kd-loss",
            "uld",
            "--temperature",
            "2",
            "--alpha",
            "0.5",
            "--out",
            str(t / "o"),
            *TRAIN,
        ],
        "--kd-loss uld compares probabilities at τ = 1",
    ),
    (
        "a recipe matrix stage referred to as one path",
        lambda t, a: [
            "run",
            recipe(
                t,
                'matrix = { seed = [1, 2] }\n[[stage]]\nname = "b"\ncommand = "report"\nargs = { _ = "{a}", out = "{self}" }\n',
            ),
            "--dry-run",
        ],
        "names 2 instances of a matrix stage",
    ),
    (
        "eval --num-fewshot -1",
        lambda t, a: [
            "eval",
            "--model",
            str(a["run"]),
            "--store",
            str(a["store"]),
            "--out",
            str(t / "e.json"),
            "--num-fewshot",
            "-1",
        ],
        "--num-fewshot must be ≥ 0",
    ),
    (
        "run --nproc-per-node 0",
        lambda t, a: ["run", "recipes/demo.toml", "--root", str(t / "r"), "--dry-run", "--nproc-per-node", "0"],
        "--nproc-per-node must be ≥ 1",
    ),
    (
        "a recipe stage with nproc_per_node = 0",
        lambda t, a: ["run", recipe(t, "nproc_per_node = 0\n"), "--dry-run"],
        "nproc_per_node must be an integer ≥ 1",
    ),
    (
        "train --epochs -1",
        lambda t, a: ["train", "--store", str(a["store"]), "--epochs", "-1", "--out", str(t / "o"), *TRAIN],
        "--epochs must be finite and in (0, inf)",
    ),
    (
        "train --export-every -2",
        lambda t, a: ["train", "--store", str(a["store"]), "--export-every", "-2", "--out", str(t / "o"), *TRAIN],
        "--export-every must be ≥ 0",
    ),
    (
        "eval --exports of a model that is not a run",
        lambda t, a: [
            "eval",
            "--model",
            str(a["run"] / "hf"),
            "--store",
            str(a["store"]),
            "--out",
            str(t / "e.json"),
            "--exports",
        ],
        "--exports needs a `predistill train` run directory",
    ),
    (
        "diversity of a store whose tokens changed",
        lambda t, a: [
            "diversity",
            "--store",
            store_with(t, a, lambda s: overwrite_tokens(s, 7)),
            "--model",
            "preset:tiny",
            "--out",
            str(t / "d.json"),
        ],
        "changed since the store was written",
    ),
    (
        "train --model preset:PATH of a config that is no causal LM",
        lambda t, a: [
            "train",
            "--store",
            str(a["store"]),
            "--out",
            str(t / "o"),
            *TRAIN[2:],
            "--model",
            f"preset:{t5_config(t)}",
        ],
        "is not a causal LM architecture",
    ),
    (
        "a recipe stage with a misspelt flag",
        lambda t, a: [
            "run",
            toml(t, '[[stage]]\nname = "b"\ncommand = "train"\nargs = { store = "s", out = "{self}", stepz = 2 }\n'),
            "--dry-run",
        ],
        "stage 'b': predistill: error: unrecognized arguments: --stepz 2",
    ),
    # --- silent acceptances, now refused ---
    (
        "sample --examples -1",
        lambda t, a: [
            "sample",
            "--teacher",
            str(a["teacher"]),
            "--reference",
            str(a["reference"]),
            "--out",
            str(t / "sel"),
            "--examples",
            "-1",
        ],
        "--examples must be ≥ 0",
    ),
    (
        "sample --materialize-max-len 0",
        lambda t, a: [
            "sample",
            "--teacher",
            str(a["teacher"]),
            "--reference",
            str(a["reference"]),
            "--out",
            str(t / "sel"),
            "--materialize",
            str(t / "mat"),
            "--tokenizer",
            str(a["store"] / "tokenizer"),
            "--materialize-max-len",
            "0",
        ],
        "--materialize-max-len must be ≥ 8",
    ),
    # --- data loss: a directory or file this tool did not write is never removed, overwritten or written through ---
    (
        "eval --tasks-dir at a token store",
        lambda t, a: [
            "eval",
            "--model",
            str(a["run"]),
            "--store",
            str(a["store"] / "val"),
            "--tasks",
            "local_lastword",
            "--out",
            str(t / "e.json"),
            "--tasks-dir",
            str(copy(a["store"], t / "victim")),
        ],
        "is not a local tasks",
    ),
    (
        "eval --out at a store's manifest.json",
        lambda t, a: [
            "eval",
            "--model",
            str(a["run"]),
            "--store",
            str(a["store"] / "val"),
            "--out",
            str(copy(a["store"], t / "victim") / "manifest.json"),
        ],
        "is not an eval result",
    ),
    (
        "report --out at a folder holding the user's own plots/",
        lambda t, a: ["report", str(a["run"]), "--out", str(users_folder(t / "docs", "plots/figure.png"))],
        "no report made it",
    ),
    (
        "run: a user's folder with a stage's name under the root",
        lambda t, a: [
            "run",
            toml(
                t,
                '[[stage]]\nname = "corpus"\ncommand = "tokenizer"\n'
                f'args = {{ source = ["store:{a["store"]}"], out = "{{self}}" }}\n',
            ),
            "--root",
            str(users_folder(t / "root", "corpus/notes.txt")),
        ],
        "no predistill run made it",
    ),
    (
        "run: a stage's output path climbing out of its directory",
        lambda t, a: [
            "run",
            toml(
                t, '[[stage]]\nname = "a"\ncommand = "tokenizer"\nargs = { source = ["x"], out = "{self}/../../x" }\n'
            ),
            "--root",
            str(t / "root"),
            "--dry-run",
        ],
        "leaves its own directory",
    ),
    (
        "train resumed through a planted metrics.jsonl link",
        lambda t, a: ["train", "--store", str(a["store"]), "--out", str(linked_run(t, a)), *TRAIN],
        "is a symbolic link inside",
    ),
    (
        "prepare with a tokenizer directory whose tokenizer.json is damaged",
        lambda t, a: [
            "prepare",
            "--source",
            "builtin:plays",
            "--tokenizer",
            str(damaged_tokenizer(t, a)),
            "--out",
            str(t / "o"),
        ],
        "cannot load tokenizer",
    ),
    (
        "sample over a user's OUT.partial folder",
        lambda t, a: [
            "sample",
            "--teacher",
            str(a["teacher"]),
            "--reference",
            str(a["reference"]),
            "--out",
            str(users_folder(t / "sel.partial", "mine.txt").with_name("sel")),
        ],
        "is not this tool's unfinished",
    ),
    (
        "report --out a link to a user's folder",
        lambda t, a: ["report", str(a["run"]), "--out", str(linked_folder(t))],
        "is a symbolic link",
    ),
    (
        "generate over a user's OUT.shards folder",
        lambda t, a: [
            "generate",
            "--model",
            "preset:tiny",
            "--store",
            str(a["store"]),
            "--out",
            str(users_folder(t / "gen.shards", "mine.txt").with_name("gen")),
        ],
        "is not this tool's unfinished generation",
    ),
]


def damaged_tokenizer(t: Path, a) -> Path:
    tokenizer = copy(a["store"] / "tokenizer", t / "tok")
    (tokenizer / "tokenizer.json").write_text("{garbage")
    return tokenizer


def users_folder(folder: Path, file: str) -> Path:
    """A folder of the user's, holding one file of theirs."""
    (folder / file).parent.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text("the user's own work\n")
    return folder


def linked_folder(t: Path) -> Path:
    """A link to a folder of the user's."""
    import os

    os.symlink(users_folder(t / "docs", "notes.txt"), t / "out")
    return t / "out"


def linked_run(t: Path, a) -> Path:
    """An unfinished copy of the run whose metrics.jsonl is a link to a file outside it."""
    import os

    run = copy(a["run"], t / "run")
    (run / "manifest.json").unlink()
    (run / "metrics.jsonl").unlink()
    (t / "victim.txt").write_text("not the run's\n")
    os.symlink(t / "victim.txt", run / "metrics.jsonl")
    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, make, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_leaves_nothing_complete(case, make, message, assets, tmp_path, capsys):
    argv = make(tmp_path, assets)
    before = snapshot(tmp_path)
    shared_before = {k: sha256_file(v / "manifest.json") for k, v in assets.items() if k != "root"}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("predistill")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before  # what was there is untouched
    for name, data in after.items():  # nothing new claims to be complete
        if name not in before and name.endswith("manifest.json"):
            assert json.loads(data).get("complete") is not True, name
    assert not any(name.endswith(".tmp") for name in after)
    assert {k: sha256_file(v / "manifest.json") for k, v in assets.items() if k != "root"} == shared_before


def test_an_export_never_writes_through_a_link_planted_at_its_temporary_name(assets, tmp_path, capsys):
    import os

    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"the user's own bytes")
    os.symlink(victim, tmp_path / "exp.bin.tmp")
    cli.main(["export", "--store", str(assets["store"]), "--out", str(tmp_path / "exp")])
    assert victim.read_bytes() == b"the user's own bytes"
    assert megatron.IndexedDataset(str(tmp_path / "exp")).n_documents > 0


def test_a_corrupt_metrics_line_does_not_break_the_report(assets, tmp_path, capsys):
    run = copy(assets["run"], tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "loss": \xff\xfe}\n')
    cli.main(["report", str(run), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "report.md").is_file()


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(assets, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import predistill.core.artifacts as artifacts

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, "fsync", no_space)  # every atomic write fails as on a full disk
    out = tmp_path / "scores"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["score", "--model", "preset:tiny", "--store", str(assets["store"]), "--out", str(out), "--no-progress"]
        )
    assert exit_info.value.code == 1
    errors = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("predistill")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()


def unfinished_run(t: Path, a) -> Path:
    """An unfinished copy of the run (a killed `train` leaves no manifest)."""
    run = copy(a["run"], t / "run")
    (run / "manifest.json").unlink()
    return run


def unfinished_table(t: Path, a) -> Path:
    """An unfinished copy of the teacher's score table (a killed `score` leaves its plan and shards, no manifest)."""
    table = copy(a["teacher"], t / "table")
    (table / "manifest.json").unlink()
    return table


# (case, the output another writer holds, the command that must be refused while it does)
LOCKED = [
    (
        "train into a fresh OUT",
        lambda t, a: t / "o",
        lambda t, a, o: ["train", "--store", str(a["store"]), "--out", str(o), *TRAIN],
    ),
    (
        "train resuming OUT",
        unfinished_run,
        lambda t, a, o: ["train", "--store", str(a["store"]), "--out", str(o), *TRAIN],
    ),
    pytest.param(
        "score into a fresh OUT",
        lambda t, a: t / "o",
        lambda t, a, o: [
            "score",
            "--model",
            "preset:tiny",
            "--seed",
            "1",
            "--store",
            str(a["store"]),
            "--out",
            str(o),
            "--shard-size",
            "64",
            "--no-progress",
        ],
        marks=pytest.mark.slow,
    ),  # a whole scoring pass once the lock is released
    ("report into a fresh OUT", lambda t, a: t / "o", lambda t, a, o: ["report", str(a["run"]), "--out", str(o)]),
    (
        "score resuming OUT",
        unfinished_table,
        lambda t, a, o: [
            "score",
            "--model",
            "preset:tiny",
            "--seed",
            "1",
            "--store",
            str(a["store"]),
            "--out",
            str(o),
            "--shard-size",
            "64",
            "--no-progress",
        ],
    ),
]


@pytest.mark.parametrize(
    "case, output, command", LOCKED, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in LOCKED]
)
def test_a_second_writer_of_an_output_written_in_place_is_refused_and_changes_nothing(
    case, output, command, assets, tmp_path, capsys
):
    import os

    from predistill.core.artifacts import lock_dir

    out = output(tmp_path, assets)
    out.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    held = lock_dir(out, out)  # what the first writer (another process) holds while it works
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(command(tmp_path, assets, out))
    finally:
        os.close(held)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("predistill")]
    assert len(errors) == 1 and "being written by another predistill process" in errors[0], err[-2000:]
    assert snapshot(tmp_path) == before  # the first writer's work is untouched
    cli.main(command(tmp_path, assets, out))  # once it is released, the output is written (or resumed) as usual
    assert (
        (out / "report.json").is_file()
        if command(tmp_path, assets, out)[0] == "report"
        else json.loads((out / "manifest.json").read_text())["complete"] is True
    )
