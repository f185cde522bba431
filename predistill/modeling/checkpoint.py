"""A training checkpoint (`RUN/checkpoints/step-NNNNNNNN`, `formats.rundir`): written
(`save_checkpoint`), found (`checkpoint_dirs`), and read back as untrusted input (`resume_state`,
`load_checkpoint`) — never running code from the checkpoint.

`torch.distributed.checkpoint`'s file reader unpickles `dcp/.metadata` with plain `pickle`, so a
crafted file there would run arbitrary code on resume. predistill never unpickles user files with
plain pickle: `SafeFileSystemReader` reads the metadata with `RestrictedUnpickler`, which resolves
only the classes DCP's metadata is made of (the dataclasses and enums of
`torch.distributed.checkpoint.metadata`, storage info, `torch.Size`, dtypes, layouts, paths) and
refuses every other global. Its data files hold tensors and, for the non-tensor parts of a state
(an optimizer's param groups), pickled "bytes items", which DCP's default planner loads with
`torch.load(weights_only=False)` — code execution again; `SafeLoadPlanner` loads them with
`weights_only=True` (plain containers, numbers, strings, tensors) and refuses anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pathlib
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from predistill.core.artifacts import (
    COUNT,
    NUMBER,
    PredistillError,
    check_fields,
    read_json_object,
    reason_of,
    write_json_atomic,
)
from predistill.core.sharding import Dist
from predistill.formats import rundir

METADATA_FILE = ".metadata"
_ALLOWED_EXACT = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name → layout lookup
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # a dataclass
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only DCP metadata classes; anything else is a PredistillError."""

    def find_class(self, module: str, name: str):
        if module == dcp_metadata.__name__:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED_EXACT:
            if module == "pathlib":
                return getattr(pathlib, name)
            return super().find_class(module, name)
        raise PredistillError(
            f"checkpoint metadata refers to {module}.{name}, which is not part of a DCP checkpoint; "
            "refusing to load it (the file may have been crafted to run code)"
        )


def load_metadata(stream) -> dcp_metadata.Metadata:
    try:
        metadata = RestrictedUnpickler(stream).load()
    except PredistillError:
        raise
    except Exception as e:  # noqa: BLE001 — any malformed pickle is the same one-line refusal
        raise PredistillError(f"checkpoint metadata is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise PredistillError(f"checkpoint metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by `RestrictedUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        path: str | os.PathLike
        if hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path(rank)
        else:  # older torch: one metadata file per checkpoint
            path = self.fs.concat_path(self.path, METADATA_FILE)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        assert metadata.storage_meta is not None  # set just above where it was missing
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with bytes items unpickled by `torch.load(weights_only=True)` only (the
    rest of DefaultLoadPlanner.load_bytes, unchanged)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 — an UnpicklingError names the global a crafted payload needed
            raise PredistillError(
                f"checkpoint item {read_item.dest_index.fqn!r} is not plain data ({reason_of(e, 200)}); "
                "refusing to load it (the file may have been crafted to run code)"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict, directory: str | pathlib.Path) -> None:
    """`dcp.load` of `state` from `directory` with the safe reader and planner; a failure on any rank
    (DCP gathers them into a CheckpointException, a BaseException) becomes one PredistillError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=SafeLoadPlanner())
    except CheckpointException as e:
        causes = [exc for exc, _ in e.failures.values()]
        ours = next((c for c in causes if isinstance(c, PredistillError)), None)
        if ours is not None:
            raise PredistillError(str(ours)) from None
        first = causes[0] if causes else e
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
        raise PredistillError(f"{directory}: unreadable checkpoint ({type(first).__name__}: {reason})") from None


# --- a training checkpoint: written, found, read back -----------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    """The run's whole checkpoints (their trainer state written: the last file), by step."""
    return [p for p in rundir.step_dirs(out / rundir.CHECKPOINTS) if (p / rundir.TRAINER_STATE).is_file()]


def save_checkpoint(out: Path, step: int, model, optimizer, state: dict, d: Dist, fsdp: bool, keep: int) -> None:
    """RUN/checkpoints/step-NNNNNNNN: the model and optimizer (DCP under FSDP, else safetensors and a
    tensors-only optimizer state), the RNG, then the trainer state; renamed into place whole. The
    `keep` newest are kept."""
    final = rundir.step_dir(out / rundir.CHECKPOINTS, step)
    tmp = final.with_name(final.name + ".partial")
    if d.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    d.barrier()
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    elif d.main:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if d.main:
        torch.save(
            {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            tmp / "rng.pt",
        )
        write_json_atomic(tmp / rundir.TRAINER_STATE, state)  # its presence marks the checkpoint whole
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    d.barrier()


def resume_state(path: Path, model, optimizer, fsdp: bool, steps: int) -> dict:
    """A checkpoint is untrusted input: its files load only as tensors (weights_only, safetensors, the
    restricted DCP reader) and its state is checked before use; anything else is one line naming it."""
    state = read_json_object(path / rundir.TRAINER_STATE, "the run directory")
    check_fields(state, path / rundir.TRAINER_STATE, {"step": COUNT, "tokens": COUNT, "flops": NUMBER})
    if not 0 < state["step"] <= steps or state["step"] != rundir.step_of(path):
        raise PredistillError(
            f"{path}: trainer_state step {state['step']} is not this checkpoint's step of a "
            f"{steps}-step run; the run directory is damaged"
        )
    try:
        load_checkpoint(path, model, optimizer, fsdp)
    except PredistillError:
        raise
    except Exception as e:  # noqa: BLE001 — torch, safetensors and pickle raise many types for a damaged file
        raise PredistillError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {reason_of(e, 200)}); remove it to resume "
            "from an earlier one, or the run directory to start over"
        ) from None
    return state


def load_checkpoint(path: Path, model, optimizer, fsdp: bool) -> dict:
    """The checkpoint's weights, optimizer state and RNG into `model`, `optimizer` and torch; its trainer state."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        # DCP's own reader and planner would unpickle dcp/.metadata and bytes items with plain pickle
        # (code execution on a crafted file)
        load_dcp(state, path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from safetensors.torch import load_model as load_safetensors

        load_safetensors(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / rundir.TRAINER_STATE).read_text())
