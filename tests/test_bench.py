"""bench/gpu_check.sh --dry: the GPU check's every path (prepare, scoring with a logits store, LM-only,
offline-KD and online-KD training) runs on CPU with tiny sizes, and writes its table and JSON lines."""

import json
import subprocess

import pytest
from conftest import REPO, subprocess_env


@pytest.mark.slow  # about a minute: SmolLM2-135M scores and teaches on CPU
@pytest.mark.teacher
def test_gpu_check_dry_run_writes_its_table(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["phase"].split(":")[0] for r in rows] == ["score", "score", "train", "train", "train"]
    assert all(r["dry"] and r["tokens_per_s"] > 0 for r in rows)
    assert rows[3]["step_time_over_lm_only"] > 0 and rows[4]["step_time_over_lm_only"] > 0
    assert "| phase | tokens/s | MFU |" in proc.stdout
