"""bench/gpu_check.sh --dry: the GPU check's every path (prepare, scoring with a logits store, LM-only,
offline-KD and online-KD training, `predistill score` against the plain HF loop) runs on CPU with tiny
sizes, and writes its table and JSON lines."""

import json
import subprocess

import pytest
from conftest import REPO, subprocess_env


@pytest.mark.slow  # a minute or two: SmolLM2-135M scores (also as two subprocesses) and teaches on CPU
@pytest.mark.teacher
def test_gpu_check_dry_run_writes_its_table(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["phase"].split(" ")[0].rstrip(":") for r in rows] == [
        "score",
        "score",
        "train",
        "train",
        "train",
        "score",
    ]
    assert all(r["dry"] and r["tokens_per_s"] > 0 for r in rows)
    assert rows[3]["step_time_over_lm_only"] > 0 and rows[4]["step_time_over_lm_only"] > 0
    # the two scorers compute the same scores (fp32 on CPU), and the ratio is in the table
    assert rows[5]["over_plain_loop"] > 0 and rows[5]["max_abs_score_diff"] < 1e-3
    assert "| phase | tokens/s | MFU | step time / LM-only | × plain loop |" in proc.stdout


def test_readme_table_keeps_the_latest_result_of_each_row(tmp_path):
    """bench/readme_table.py: the README table comes from the benches' JSON lines, the latest line
    of each (bench, what) winning, pipes inside cells escaped, only between the markers."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import readme_table

    def line(bench, what, result, date="2026-12-01"):
        return json.dumps(
            {
                "bench": bench,
                "command": "python bench/x.py",
                "date": date,
                "machine": "m",
                "readme": {"what": what, "result": result, "goal": "g"},
            }
        )

    results = tmp_path / "results.jsonl"
    results.write_text(
        "\n".join(
            [
                line("a", "speed", "1.0×"),
                "not json",
                json.dumps({"bench": "raw"}),
                line("b", "memory", "max |Δ| 1e-6"),
                line("a", "speed", "1.3×", "2026-12-02"),
            ]
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_table.START}\nold table\n{readme_table.END}\nrest\n")
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "readme_table.py"), str(results), "--readme", str(readme)],
        check=True,
        capture_output=True,
    )
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text
    rows = [r for r in text.splitlines() if r.startswith("| ") and "what" not in r]
    assert len(rows) == 2 and "1.3×" in rows[0] and "2026-12-02" in rows[0] and "1.0×" not in text
    assert "max \\|Δ\\| 1e-6" in rows[1]
    readme.write_text("no markers\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "readme_table.py"), str(results), "--readme", str(readme)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "markers" in proc.stderr


def test_tensor_peak_counts_the_largest_set_of_tensors_alive_at_once():
    """bench/common.TensorPeak, the benches' allocator-independent memory measure: what is alive
    together counts, what was freed before does not, nor do tensors that existed before the block."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from common import TensorPeak

    weight = torch.zeros(1 << 20)  # 4 MiB, allocated before: not counted, nor are views of it
    with TensorPeak([weight]) as peak:
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 19)  # 2 MiB: 3 MiB alive
        del a, b
        view = weight.t()  # a view of a tensor from before: nothing new
        c = view[: 1 << 19].clone()  # 2 MiB alive
    assert peak.peak == 3 << 20 and peak.current == 2 << 20
    del c
    assert peak.current == 0
