"""DCP checkpoints are read without running code from the checkpoint's metadata."""

import os
import pickle
import warnings

import pytest
import torch

from predistill.core.artifacts import PredistillError
from predistill.modeling.checkpoint import METADATA_FILE, SafeFileSystemReader


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system: what a crafted checkpoint would do
        return os.system, (f"touch {self.marker}",)


def real_checkpoint(path):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    return model


def test_real_metadata_loads_and_the_checkpoint_restores(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = real_checkpoint(tmp_path / "dcp")
    fresh = torch.nn.Linear(3, 2)
    state = {"model": fresh.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=SafeFileSystemReader(str(tmp_path / "dcp")))
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("payload", ["os.system", "a Metadata whose field runs code"])
def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path, payload):
    real_checkpoint(tmp_path / "dcp")
    marker = tmp_path / "pwned"
    if payload == "os.system":
        crafted = RunsCode(marker)
    else:
        crafted = pickle.loads(open(tmp_path / "dcp" / METADATA_FILE, "rb").read())
        crafted.planner_data = RunsCode(marker)
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(pickle.dumps(crafted))
    with pytest.raises(PredistillError, match="posix.system|os.system|refusing"):
        SafeFileSystemReader(str(tmp_path / "dcp")).read_metadata()
    assert not marker.exists()


def test_garbage_metadata_is_a_one_line_error(tmp_path):
    real_checkpoint(tmp_path / "dcp")
    (tmp_path / "dcp" / METADATA_FILE).write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(PredistillError, match="unreadable"):
        SafeFileSystemReader(str(tmp_path / "dcp")).read_metadata()


def test_a_bytes_item_pointed_at_a_pickled_payload_is_refused_and_runs_nothing(tmp_path):
    # the metadata is legitimate; one of its bytes items (non-tensor state, as an optimizer's param
    # groups are saved) now points at a pickle that would run code if unpickled without restriction
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from predistill.modeling.checkpoint import load_dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": torch.nn.Linear(3, 2).state_dict(), "extra": {"lr": 0.1}}, checkpoint_id=str(tmp_path / "dcp")
        )
    meta_path = tmp_path / "dcp" / METADATA_FILE
    metadata = pickle.loads(meta_path.read_bytes())
    marker = tmp_path / "pwned"
    for index, info in list(metadata.storage_data.items()):
        if index.fqn == "extra.lr":
            data = tmp_path / "dcp" / info.relative_path
            offset = data.stat().st_size
            payload = pickle.dumps(RunsCode(marker))
            with open(data, "ab") as f:
                f.write(payload)
            metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    meta_path.write_bytes(pickle.dumps(metadata))

    state = {"model": torch.nn.Linear(3, 2).state_dict(), "extra": {"lr": 0.0}}
    with pytest.raises(PredistillError, match="not plain data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(state, tmp_path / "dcp")
    assert not marker.exists()


def test_plain_bytes_items_still_load(tmp_path):
    import torch.distributed.checkpoint as dcp

    from predistill.modeling.checkpoint import load_dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"extra": {"lr": 0.25, "betas": [0.9, 0.98], "name": "adamw"}}, checkpoint_id=str(tmp_path / "dcp"))
        state = {"extra": {"lr": 0.0, "betas": [0.0, 0.0], "name": ""}}
        load_dcp(state, tmp_path / "dcp")
    assert state["extra"] == {"lr": 0.25, "betas": [0.9, 0.98], "name": "adamw"}
