"""The run directory's layout (`predistill.formats.rundir`): which directory is a run, and its steps."""

from __future__ import annotations

import json

import pytest

from predistill.core.artifacts import PredistillError
from predistill.core.config import to_flat
from predistill.formats import rundir
from predistill.modeling.models import resolve_model
from predistill.training.config import TrainConfig


def test_every_run_config_holds_the_keys_that_mark_it_and_an_hf_config_does_not(tmp_path):
    from transformers import LlamaConfig

    assert set(rundir.RUN_CONFIG_KEYS) <= set(to_flat(TrainConfig(store="s", out="o")))
    run, hf = tmp_path / "run", tmp_path / "hf"
    run.mkdir()
    (run / rundir.CONFIG).write_text(json.dumps(to_flat(TrainConfig(store="s", out="o"))))
    LlamaConfig().save_pretrained(hf)
    assert rundir.holds_run_config(run) and not rundir.holds_run_config(hf)
    (run / rundir.CONFIG).write_text("[1, 2]")  # not an object: not a run's
    assert not rundir.holds_run_config(run)


def test_a_started_run_is_not_taken_for_a_model(tmp_path):
    for marker in (rundir.CONFIG, rundir.METRICS, rundir.CHECKPOINTS):
        run = tmp_path / marker.replace(".", "_")
        run.mkdir()
        if marker == rundir.CHECKPOINTS:
            (run / marker).mkdir()
        else:
            (run / marker).write_text(json.dumps(to_flat(TrainConfig(store="s", out="o"))))
        assert rundir.is_unfinished_run(run)
        with pytest.raises(PredistillError, match="unfinished run directory"):
            resolve_model(str(run))


def test_step_directories_are_listed_by_step_and_only_whole_names_count(tmp_path):
    root = tmp_path / rundir.EXPORTS
    for step in (100, 7, 20):
        rundir.step_dir(root, step).mkdir(parents=True)
    (root / "step-00000030.partial").mkdir()  # a step being written
    (root / "step-x").mkdir()
    (root / "step-00000040").write_text("")  # a file, not a step directory
    assert [p.name for p in rundir.step_dirs(root)] == ["step-00000007", "step-00000020", "step-00000100"]
    assert [rundir.step_of(p) for p in rundir.run_exports(tmp_path)] == [7, 20, 100]
    assert rundir.step_dirs(tmp_path / "absent") == []
    with pytest.raises(PredistillError, match="not a step directory"):
        rundir.step_of(root / "step-00000030.partial")
