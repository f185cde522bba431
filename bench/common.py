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
    record = {
        "bench": bench,
        **fields,
        "command": command(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
    }
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


class TensorPeak:
    """Peak bytes of tensor storage allocated inside the `with` block and alive at once: the CPU
    analogue of torch.cuda.max_memory_allocated. Process RSS on CPU also holds what glibc malloc
    keeps after a free (it grows step after step with fragmentation), so benchmarks report both.
    Storages that existed before the block (parameters; views of them) are not counted."""

    def __init__(self, model_tensors=()):
        self.current = self.peak = 0
        self.live: dict[int, int] = {}
        self.before = {t.untyped_storage().data_ptr() for t in model_tensors}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in out if isinstance(out, (tuple, list)) else (out,):
                    tracker.track(tensor)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def track(self, tensor) -> None:
        import weakref

        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or key in self.before or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.free, key)  # torch keeps one Python object per storage

    def free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
