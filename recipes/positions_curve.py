"""docs/positions.json from the positions study's report: one row per run of the curve, and each
rule read against its control, the full store and Pre-Train w/o KD (paired by seed).

    python recipes/positions_curve.py docs/positions-study.json docs/positions.json

`rule`: `full` (the RS-KD store at every position), a position-selected store's rule (`entropy`,
`difference`) or its control `random-positions`, SE-KD's `student-entropy` (the full store, the KD
term where the student is least sure), a token rule (`token-difference`, RHO-1's
`token-excess`) or their control `random-tokens`; runs without either (Pre-Train w/o KD) go to
`baseline`. `store_bytes_per_token` is what the run reads per token of the corpus: the logits
store's bytes over all positions, the token records' (two for `token-difference`, the reference's
for `token-excess`), 0 for `random-tokens`. `flops` are the
run's training FLOPs; the teacher passes' are in `teacher_flops_offline` (one pass for every store).
`samples`: the RS-KD draws per position the run's store keeps (`select-positions --samples`);
`compute_matched`: the run's FLOPs are the baseline's (within 2%) — the study's diagnostics that give
the in-step rules the others' step count are not, and are compared as such.
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
    budget = [r["flops"] for r in report["runs"] if not r.get("positions") and not r.get("kd_logits")]
    budget_mean = sum(budget) / len(budget) if budget else None
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
        alpha = json.loads(r.get("identity") or "{}").get("alpha")
        matched = budget_mean is None or abs(r["flops"] / budget_mean - 1) < 0.02  # the baseline's FLOPs
        runs.append({"rule": rule, "fraction": fraction, **row, "store_bytes_per_token": bytes_per_token,
                     "samples": _draws(r.get("kd_logits")), "alpha": alpha, "compute_matched": matched,
                     "teacher_flops_offline": r.get("teacher_flops_offline")})  # fmt: skip
    runs.sort(key=lambda x: (x["rule"], -x["fraction"], x["seed"]))
    out = {"source": "recipes/positions.toml (docs/positions-study.json)", "runs": runs, "baseline": baseline}
    return out | {"comparisons": comparisons(out)}


CONTROLS = {"entropy": "random-positions", "difference": "random-positions", "student-entropy": "random-positions",
            "token-difference": "random-tokens", "token-excess": "random-tokens"}  # fmt: skip


def _losses(rows) -> dict:
    return {r["seed"]: r["heldout_loss"] for r in rows}


def paired(a: dict, b: dict) -> dict | None:
    """Mean over the seeds both have of a − b, its standard error and the seeds (None: fewer than 2)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return {"delta": mean, "se": se, "seeds": seeds, "beyond_2se": abs(mean) > 2 * se}


def comparisons(curve_data: dict) -> list[dict]:
    """Each (rule, fraction, draws) against its control at the same fraction, the full store and the
    baseline: Δ held-out loss (negative: the rule is better), paired by seed."""
    groups: dict[tuple, list] = {}
    for r in curve_data["runs"]:
        key = (r["rule"], r["fraction"], r.get("samples"), r.get("alpha"), r.get("compute_matched", True))
        groups.setdefault(key, []).append(r)
    # the reference store and controls: the study's α (the most common one), compute-matched
    alphas = [k[3] for k in groups if k[3] is not None]
    usual = max(set(alphas), key=alphas.count) if alphas else None
    full = next((rows for (rule, _, _, a, m), rows in groups.items() if rule == "full" and m and a == usual), [])
    out = []
    for (rule, fraction, samples, alpha, matched), rows in sorted(
        groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2] or 0, -(kv[0][3] or 0), not kv[0][4])
    ):
        control = CONTROLS.get(rule)
        control_rows = next(
            (v for (r, f, _, a, m), v in groups.items() if r == control and f == fraction and m and a == alpha), []
        )
        out.append({
            "rule": rule, "fraction": fraction, "samples": samples, "alpha": alpha, "compute_matched": matched,
            "n": len(rows),
            "heldout_loss": sum(r["heldout_loss"] for r in rows) / len(rows),
            "store_bytes_per_token": rows[0]["store_bytes_per_token"],
            "vs_control": {"control": control, **(paired(_losses(rows), _losses(control_rows)) or {})} if control else None,
            "vs_full": paired(_losses(rows), _losses(full)),
            "vs_baseline": paired(_losses(rows), _losses(curve_data["baseline"])),
        })  # fmt: skip
    return out


def _alpha(alpha: float | None) -> str:
    return "–" if alpha is None else f"{alpha:g}"


def table(curve_data: dict) -> str:
    """The comparisons as a Markdown table."""

    def cell(p):
        return (
            "–"
            if not p or "delta" not in p
            else f"{p['delta']:+.3f} ± {p['se']:.3f}" + (" *" if p["beyond_2se"] else "")
        )

    lines = ["| rule | fraction | draws | α | B/token | compute-matched | held-out loss | Δ vs control | Δ vs full store | Δ vs Pre-Train |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in curve_data["comparisons"]:
        control = c["vs_control"]
        lines.append(
            f"| {c['rule']} | {c['fraction']:g} | {c['samples'] or '–'} | {_alpha(c['alpha'])} | "
            f"{c['store_bytes_per_token']:.2f} | "
            f"{'yes' if c['compute_matched'] else 'no (more FLOPs)'} | "
            f"{c['heldout_loss']:.3f} | {cell(control) + (' (' + control['control'] + ')' if control else '')} | "
            f"{cell(c['vs_full'])} | {cell(c['vs_baseline'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    with open(source) as f:
        data = curve(json.load(f))
    with open(target, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {target}: {len(data['runs'])} runs, {len(data['baseline'])} baseline runs")
    print(table(data))
