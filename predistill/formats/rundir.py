"""The run directory: what `predistill train` writes, and where — read by `eval`, `report`,
`verify`, and by `models.resolve_model` (a run directory is a model spec: its `hf/` export).

    RUN/
      manifest.json   format "run": config, method, model, params {total, non_embedding}, steps,
                      tokens, flops (training FLOPs, teacher included), flops_per_token,
                      student_flops_per_token, train_instances, epochs, teacher_flops, store_hash,
                      final_val_loss, heldout_losses {set: loss}; complete: true last
      config.json     the resolved TrainConfig (flat keys; `training.config`) and the command line
      metrics.jsonl   one JSON line per logged step
      checkpoints/step-NNNNNNNN/   model, optimizer, RNG and trainer_state.json (written last: whole)
      exports/step-NNNNNNNN/       HF exports during training (`train --export-every`), each with
                                   export.json (step, tokens, FLOPs, val loss) and, once evaluated,
                                   eval.json
      hf/             the final export (config.json, *.safetensors, tokenizer)
      eval.json       `predistill eval RUN`'s result

The manifest's fields are checked here (`check_manifest`); the recorded config against
`TrainConfig`'s declarations by `training.config.check_run_manifest`, which owns that class.
"""

from __future__ import annotations

import re
from pathlib import Path

from predistill.core.artifacts import COUNT, NUMBER, PredistillError, check_fields, parse_json

FORMAT = "run"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: its presence marks the checkpoint whole
EXPORTS = "exports"
EXPORT_INFO = "export.json"
EXPORT = "hf"
EVAL = "eval.json"
RUN_CONFIG_KEYS = ("store", "lr_schedule", "seq_len")  # in every run's config.json, in no HF model's

SCHEMA = {
    "config": dict,
    "method": str,
    "model": str,
    "params": dict,
    "steps": COUNT,
    "tokens": COUNT,
    "flops": NUMBER,
    "flops_per_token": NUMBER,
    "student_flops_per_token": NUMBER,
    "train_instances": COUNT,
    "epochs": NUMBER,
    "teacher_flops": NUMBER,
    "store_hash": str,
}
_STEP_DIR = re.compile(r"step-(\d+)")


def check_manifest(manifest: dict, where: str | Path) -> None:
    """A complete run's manifest fields as `train` writes them; the first that is not is named."""
    check_fields(manifest, where, SCHEMA)
    check_fields(manifest["params"], f"{where}: params", {"total": COUNT, "non_embedding": COUNT})
    loss = manifest.get("final_val_loss")  # None: a run without a held-out store
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise PredistillError(f"{where}: final_val_loss = {loss!r} is not a number (corrupted run)")
    losses = manifest.get("heldout_losses")
    if not isinstance(losses, dict):
        raise PredistillError(f"{where}: heldout_losses is not a table of set → loss (corrupted run)")
    check_fields(losses, f"{where}: heldout_losses", {name: NUMBER for name in losses})


def step_dir(root: Path, step: int) -> Path:
    """A checkpoint's or a step export's directory under `root`."""
    return Path(root) / f"step-{step:08d}"


def step_dirs(root: Path) -> list[Path]:
    """The step directories under `root` (checkpoints or exports), by step."""
    if not Path(root).is_dir():
        return []
    found = [(int(m[1]), p) for p in Path(root).iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    """The step a step directory was written at."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    if m is None:
        raise PredistillError(f"{path}: not a step directory (step-NNNNNNNN)")
    return int(m[1])


def run_exports(run: Path) -> list[Path]:
    """A run's exports during training, by step (each renamed into place whole: present = complete)."""
    return step_dirs(Path(run) / EXPORTS)


def holds_run_config(path: Path) -> bool:
    """Does `path` hold a config.json that `train` wrote (a run's settings, not an HF model's
    config.json)? What `train` resumes in place, and nothing else."""
    try:
        saved = parse_json((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and set(RUN_CONFIG_KEYS) <= set(saved)


def is_unfinished_run(path: Path) -> bool:
    """Does `path` look like a run `train` started and did not finish (so: no model to load yet)?"""
    return holds_run_config(path) or (Path(path) / METRICS).is_file() or (Path(path) / CHECKPOINTS).is_dir()
