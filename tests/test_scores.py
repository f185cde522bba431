"""The score table format's one reader: nothing a manifest or shard says is used before it is checked."""

import json

import numpy as np
import pytest

from predistill.core.artifacts import PredistillError, sha256_file
from predistill.core.sharding import plan_shards
from predistill.formats.scores import SHARD_DIR, ScoreTable, finish_table, table_hash, write_score_shard

PLAN = {"model": {"spec": "preset:tiny", "forward_params": 10}, "store_hash": "s" * 64, "n_instances": 10}


def make_table(out, logprob=None):
    logprob = np.linspace(-3, -1, 10, dtype=np.float32) if logprob is None else logprob
    shards = plan_shards(10, 4)
    (out / SHARD_DIR).mkdir(parents=True)
    for shard in shards:
        write_score_shard(out / SHARD_DIR, shard, logprob[shard.ids], np.full(len(shard.ids), 5, dtype=np.int32))
    finish_table(out, PLAN, shards)
    return out


def rewrite(out, **changes):
    """Edit the manifest as a hostile user would, keeping it self-consistent where asked."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_a_table_reads_back_what_was_written(tmp_path):
    table = ScoreTable(make_table(tmp_path / "t"))
    assert len(table) == 10 and table.logprob[3] == pytest.approx(np.linspace(-3, -1, 10)[3])
    assert table.n_tokens.tolist() == [5] * 10


def test_a_shard_named_outside_the_table_is_refused(tmp_path):
    out = make_table(tmp_path / "t")
    victim = tmp_path / "elsewhere.npy"
    victim.write_bytes((out / SHARD_DIR / "shard-00000.npy").read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../elsewhere.npy"
    rewrite(out, shards=manifest["shards"])
    with pytest.raises(PredistillError, match="inside shards/"):
        ScoreTable(out)


def test_an_infinite_log_prob_is_refused_even_with_recomputed_hashes(tmp_path):
    out = make_table(tmp_path / "t", logprob=np.array([-1, np.inf, -2, -1, -1, -1, -1, -1, -1, -1], dtype=np.float32))
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:  # the hashes vouch for the files: only the values can tell
        entry["sha256"] = sha256_file(out / SHARD_DIR / entry["file"])
    rewrite(out, shards=manifest["shards"], table_hash=table_hash([e["sha256"] for e in manifest["shards"]]))
    with pytest.raises(PredistillError, match="cannot be one"):
        ScoreTable(out)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"shards": []}, "0 rows for 10 instances"),
        ({"n_instances": 10**12}, "rows for 1000000000000 instances"),
        ({"n_instances": "10"}, "is not a count"),
        ({"version": 99}, "version 99"),
        ({"table_hash": "0" * 64}, "table_hash does not match"),
        ({"model": None}, "model.spec is missing"),
        ({"shards": [{"file": "shard-00000.npy"}]}, "must list"),
    ],
)
def test_a_manifest_that_cannot_be_this_table_is_one_line(tmp_path, changes, message):
    out = make_table(tmp_path / "t")
    rewrite(out, **changes)
    with pytest.raises(PredistillError, match=message) as info:
        ScoreTable(out)
    assert "\n" not in str(info.value)
