"""Reading distributed (DCP) checkpoints without running code from the checkpoint.

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
import os
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from predistill.core.artifacts import PredistillError

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
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise PredistillError(
                f"checkpoint item {read_item.dest_index.fqn!r} is not plain data ({reason}); "
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
