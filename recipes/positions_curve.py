"""docs/positions.json from the positions study's report: one row per run of the curve.

    python recipes/positions_curve.py docs/positions-study.json docs/positions.json

`rule`: `full` (the RS-KD store at every position), a position-selected store's rule (`entropy`,
`difference`) or its control `random-positions`, SE-KD's `student-entropy` (the full store, the KD
term where the student is least sure), a token rule (`token-difference`, RHO-1's
`token-excess`) or their control `random-tokens`; runs without either (Pre-Train w/o KD) go to
`baseline`. `store_bytes_per_token` is what the run reads per token of the corpus: the logits
store's bytes over all positions, the token records' (two for `token-difference`, the reference's
for `token-excess`), 0 for `random-tokens`. `flops` are the
run's training FLOPs; the teacher passes' are in `teacher_flops_offline` (one pass for every store).
`samples`: the RS-KD draws per position the run's store keeps (`select-positions --samples`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STORE_RULES = {"entropy": "entropy", "difference": "difference", "random": "random-positions"}
TOKEN_RULES = {"difference": "token-difference", "excess": "token-excess", "random": "random-tokens"}
TOKEN_RECORD_BYTES = 4.0  # per position, each of the teacher's and the reference's records


def _draws(logits_store: str | None) -> int | None:
    """RS-KD draws per position of the run's logits store (None: none, or not readable here)."""
    manifest = Path(logits_store or "/nonexistent") / "manifest.json"
    return json.loads(manifest.read_text())["config"].get("samples") if manifest.is_file() else None


def curve(report: dict) -> dict:
    runs, baseline = [], []
    for r in report["runs"]:
        chosen = r.get("positions") or {}
        row = {"seed": r["seed"], "heldout_loss": r["heldout_loss"], "flops": r["flops"]}
        if "kd" in chosen:  # SE-KD: the KD term at positions chosen in the step, from the full store
            rule, fraction, stored = chosen["kd"]["rule"], chosen["kd"]["fraction"], None
        elif "store" in chosen:
            rule, fraction, stored = STORE_RULES[chosen["store"]["rule"]], chosen["store"]["fraction"], None
        elif "token" in chosen:
            rule, fraction = TOKEN_RULES[chosen["token"]["rule"]], chosen["token"]["fraction"]
            stored = {"token-difference": 2, "token-excess": 1}.get(rule, 0) * TOKEN_RECORD_BYTES
        elif r.get("kd_logits"):
            rule, fraction, stored = "full", 1.0, None
        else:
            baseline.append(row)
            continue
        bytes_per_token = r["logits_bytes_per_token"] if stored is None else stored
        runs.append({"rule": rule, "fraction": fraction, **row, "store_bytes_per_token": bytes_per_token,
                     "samples": _draws(r.get("kd_logits")), "teacher_flops_offline": r.get("teacher_flops_offline")})  # fmt: skip
    runs.sort(key=lambda x: (x["rule"], -x["fraction"], x["seed"]))
    return {"source": "recipes/positions.toml (docs/positions-study.json)", "runs": runs, "baseline": baseline}


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as f:
        data = curve(json.load(f))
    with open(target, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {target}: {len(data['runs'])} runs, {len(data['baseline'])} baseline runs")
