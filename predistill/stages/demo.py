"""`predistill demo`: the main job — runs recipes/demo.toml and says where the report is.

The recipe (see its comments) compares Pre-Train w/o KD, Vanilla KD, MiniPLM, PD and MiniPLM + PD
with the real SmolLM2-135M teacher on the built-in corpus, compute-matched, in ≤ 10 minutes on two
CPU cores. Stages are cached: rerunning after a change redoes only what the change affects.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from predistill.core.artifacts import PredistillError
from predistill.stages.recipe import RECIPES_DIR, execute, load_recipe

DEMO_RECIPE = RECIPES_DIR / "demo.toml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="demo-out", help="directory for every stage's output and the report (default demo-out)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")


def main(args: argparse.Namespace) -> None:
    if not DEMO_RECIPE.is_file():
        raise PredistillError(f"{DEMO_RECIPE}: missing (the demo runs from a checkout of the repository)")
    recipe = load_recipe(DEMO_RECIPE, args.out)
    started = time.perf_counter()
    execute(recipe, args.dry_run)
    if args.dry_run:
        return
    # the report stage writes OUT/report/; put the pages where a reader looks first
    out = Path(args.out)
    report = out / "report"
    for name in ("report.md", "report.html"):
        shutil.copyfile(report / name, out / name)
    if (report / "plots").is_dir():
        shutil.copytree(report / "plots", out / "plots", dirs_exist_ok=True)
    print(
        f"predistill demo: done in {time.perf_counter() - started:.0f} s\n"
        f"  report: {out / 'report.md'}\n  html:   {out / 'report.html'}"
    )
