"""What every benchmark shares: one JSON line per result, stamped with the date and the machine.

    BENCH_RESULTS=bench/results.jsonl python bench/bench_train.py   # also append the lines there
    python bench/readme_table.py bench/results.jsonl                # the README's performance table

A result that belongs in the README carries `readme={"what", "result", "goal"}`; the table is
rebuilt from the latest line of each (bench, what), so no number is typed by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__.split('+')[0]}"


def command() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def emit(bench: str, readme: dict | None = None, **fields) -> dict:
    """Print one JSON line (and append it to $BENCH_RESULTS when set)."""
    record = {"bench": bench, **fields, "command": command(), "date": datetime.date.today().isoformat(),
              "machine": machine()}
    if readme is not None:
        missing = {"what", "result", "goal"} - set(readme)
        if missing:
            raise ValueError(f"readme entry lacks {sorted(missing)}")
        record["readme"] = readme
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("BENCH_RESULTS"):
        with open(os.environ["BENCH_RESULTS"], "a") as f:
            f.write(line + "\n")
    return record
