"""Held-out loss per domain of every student of a study (recipes/study.toml), mean ± std over seeds:
where a method's overall difference to Pre-Train w/o KD comes from (e.g. a selection that keeps
one domain's instances and drops another's). First, per domain of the pool, the teacher's and the
reference's mean log-probs and the share the selection kept.

    python bench/study_domains.py --root study-out --out docs/study-domains.json

Each run is evaluated with `predistill eval` on the study's held-out store (written to
ROOT/analysis/RUN.json, not into the run, so the report's numbers stay the runs' own); one JSON
line per (method, size, domain) is printed and the Markdown table goes to stdout's end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from predistill.stages.eval import EvalConfig  # noqa: E402
from predistill.stages.eval import run as evaluate  # noqa: E402
from predistill.stages.report import BASELINE, summarize_run  # noqa: E402


def selection_by_domain(root: Path) -> None:
    """Per domain of the pool: mean teacher and reference log-probs, their difference, and the share
    of instances the study's selection kept (why Difference Sampling keeps what it keeps)."""
    from predistill.formats.scores import ScoreTable
    from predistill.formats.selection import load_selection
    from predistill.formats.store import TokenStore

    selection = load_selection(root / "selection")
    teacher = ScoreTable(root / "teacher" / "scores")
    reference = ScoreTable(root / "reference_scores")
    store = TokenStore(teacher.manifest["store_dir"])
    kept = np.zeros(len(store), dtype=bool)
    kept[selection] = True
    domains = np.asarray(store.domain_ids)
    print("| domain | teacher log p | reference log p | difference (mean ± std) | kept |\n|---|---|---|---|---|")
    for d, name in enumerate(store.domain_names):
        m = domains == d
        diff = teacher.logprob[m] - reference.logprob[m]
        emit(
            "study_selection",
            domain=name,
            teacher=float(teacher.logprob[m].mean()),
            reference=float(reference.logprob[m].mean()),
            difference=float(diff.mean()),
            difference_std=float(diff.std()),
            kept=float(kept[m].mean()),
            n_instances=int(m.sum()),
        )
        print(
            f"| {name} | {teacher.logprob[m].mean():.2f} | {reference.logprob[m].mean():.2f} | "
            f"{diff.mean():.2f} ± {diff.std():.2f} | {kept[m].mean():.1%} of {int(m.sum())} |"
        )


def unigram_heldout(pool_dir: Path, heldout_dir: str) -> float:
    """The held-out loss (per-instance mean token NLL) of the pool's unigram distribution (add-0.01
    smoothing): the level a student must get well below to have learned anything past token counts."""
    from predistill.formats.store import TokenStore

    pool, held = TokenStore(pool_dir), TokenStore(heldout_dir)
    counts = np.zeros(pool.vocab_size)
    for i in range(len(pool)):
        np.add.at(counts, np.asarray(pool[i][1:], dtype=np.int64), 1)
    p = (counts + 0.01) / (counts.sum() + 0.01 * pool.vocab_size)
    loss = float(np.mean([-np.log(p[np.asarray(held[i][1:], dtype=np.int64)]).mean() for i in range(len(held))]))
    emit("study_unigram", heldout_loss=loss)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="study-out", help="the study's root (its stage directories)")
    ap.add_argument("--heldout", default=None, help="held-out store (default: ROOT/heldout/store)")
    ap.add_argument("--out", default=None, help="also write every run's per-domain losses here (JSON)")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["*-seed*"],
        metavar="GLOB",
        help="run directories of ROOT to evaluate (default: every seeded run)",
    )
    args = ap.parse_args()
    root = Path(args.root)
    heldout = args.heldout or str(root / "heldout" / "store")
    if (root / "selection" / "manifest.json").is_file():
        selection_by_domain(root)
    if (root / "pool" / "store" / "manifest.json").is_file():
        print(f"unigram held-out loss: {unigram_heldout(root / 'pool' / 'store', heldout):.3f}")
    rows = []
    chosen = sorted({p for pattern in args.runs for p in root.glob(pattern)})
    for run_dir in [p for p in chosen if (p / "manifest.json").is_file() and (p / "hf").is_dir()]:
        out = root / "analysis" / f"{run_dir.name}.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            evaluate(EvalConfig(model=str(run_dir), store=heldout, out=str(out), tasks=None))
        result = json.loads(out.read_text())
        s = summarize_run(str(run_dir))
        rows.append(
            {
                "run": run_dir.name,
                "method": s.method,
                "size": s.size,
                "seed": s.seed,
                "heldout_loss": result["heldout_loss"],
                "by_domain": result["heldout_loss_by_domain"],
            }
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"heldout": heldout, "runs": rows}, indent=1) + "\n")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    domains = sorted({d for r in rows for d in r["by_domain"]})
    lines = [
        "| method | size | seeds | "
        + " | ".join(f"{d}: loss (mean ± std) | {d}: Δ vs {BASELINE} (± s.e.)" for d in domains)
        + " |",
        "|---|---|---|" + "---|---|" * len(domains),
    ]
    for (method, size), members in groups.items():
        base = {m["seed"]: m for m in groups.get((BASELINE, size), [])}
        cells = []
        for d in domains:
            values = [m["by_domain"][d] for m in members]
            diffs = [
                m["by_domain"][d] - base[m["seed"]]["by_domain"][d]
                for m in members
                if m["seed"] in base and method != BASELINE
            ]
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            d_mean = float(np.mean(diffs)) if diffs else None
            d_se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
            emit(
                "study_domains",
                method=method,
                size=size,
                domain=d,
                n_seeds=len(values),
                mean=mean,
                std=std,
                paired_diff=d_mean,
                paired_diff_se=d_se,
            )
            cells += [
                f"{mean:.3f} ± {std:.3f}",
                "–" if d_mean is None else f"{d_mean:+.3f}" + ("" if d_se is None else f" ± {d_se:.3f}"),
            ]
        lines.append(f"| {method} | {size} | {len(members)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
