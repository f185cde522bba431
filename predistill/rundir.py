"""The run directory's manifest schema (written by `predistill train`, read by `report`, `eval`,
`verify`): the one place that says what a complete run records and of which type.

    RUN/
      manifest.json   format "run": config, method, model, params {total, non_embedding}, steps,
                      tokens, flops (training FLOPs, teacher included), flops_per_token,
                      student_flops_per_token, train_instances, epochs, teacher_flops, store_hash,
                      final_val_loss, heldout_losses {set: loss}; complete: true last
      config.json     the resolved TrainConfig (flat keys) and the command line
      metrics.jsonl   one JSON line per logged step
      hf/             the final export (config.json, *.safetensors, tokenizer)
"""

from __future__ import annotations

from pathlib import Path

from predistill.artifacts import COUNT, NUMBER, PredistillError, check_fields

FORMAT = "run"
SCHEMA = {"config": dict, "method": str, "model": str, "params": dict, "steps": COUNT, "tokens": COUNT,
          "flops": NUMBER, "flops_per_token": NUMBER, "student_flops_per_token": NUMBER, "train_instances": COUNT,
          "epochs": NUMBER, "teacher_flops": NUMBER, "store_hash": str}


def check_run_manifest(manifest: dict, where: str | Path) -> None:
    """A complete run's manifest as `train` writes it; the first field that is not is named."""
    check_fields(manifest, where, SCHEMA)
    check_fields(manifest["params"], f"{where}: params", {"total": COUNT, "non_embedding": COUNT})
    loss = manifest.get("final_val_loss")  # None: a run without a held-out store
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise PredistillError(f"{where}: final_val_loss = {loss!r} is not a number (corrupted run)")
    losses = manifest.get("heldout_losses", {})  # runs before train --heldout have none
    if not isinstance(losses, dict):
        raise PredistillError(f"{where}: heldout_losses is not a table of set → loss (corrupted run)")
    check_fields(losses, f"{where}: heldout_losses", {name: NUMBER for name in losses})
