"""Rebuild the README's performance table from benchmark JSON lines (bench/common.py).

    python bench/readme_table.py bench/results.jsonl [--readme README.md]

Keeps the latest line of each (bench, readme.what) that has a `readme` entry, in order of first
appearance, and replaces the README text between the `<!-- bench-table:start -->` and
`<!-- bench-table:end -->` markers. Lines that are not JSON objects are skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def rows_of(paths: list[Path]) -> list[dict]:
    latest: dict[tuple[str, str], dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("readme"), dict):
                latest[(record["bench"], record["readme"]["what"])] = record  # dicts keep first-insertion order
    return list(latest.values())


def cell(text: str) -> str:
    return str(text).replace("|", "\\|")  # a pipe inside a cell would end it


def table(rows: list[dict]) -> str:
    machines = {r["machine"] for r in rows}
    one_machine = len(machines) == 1
    out = ["| what | command | result | goal | measured |", "|---|---|---|---|---|"]
    for r in rows:
        m = r["readme"]
        when = r["date"] if one_machine else f"{r['date']}, {r['machine']}"
        out.append(
            f"| {cell(m['what'])} | `{cell(r['command'])}` | {cell(m['result'])} | {cell(m['goal'])} | {cell(when)} |"
        )
    if one_machine:
        out.append(f"\nMachine: {machines.pop()}.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} … {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    rows = rows_of(args.results)
    if not rows:
        raise SystemExit("no result with a readme entry in " + ", ".join(map(str, args.results)))
    args.readme.write_text(f"{head}{START}\n{table(rows)}\n{END}{tail}")
    print(f"{args.readme}: {len(rows)} rows")


if __name__ == "__main__":
    main()
