"""The ranks (`Dist`, `init_distributed`: torchrun's environment and its process group), how a long
stage's work is split over them, and which process finishes the artifact.

A sharded stage (`score`, `generate`, `eval`'s held-out loss) describes its work as a `ShardedWork`
— numbered shards, the same plan for any world size so that the artifact does not depend on the
ranks; which are done; how to do some; how to finish the artifact — and `run_sharded` drives it, the
one place the protocol is written: it runs the shards this rank owns (`owns`) that are not done yet
(each marked done on disk by the stage's format: `artifacts.write_shard`), and then one process
finishes the artifact from every shard's data (`finish_by_last_rank`):

- under torchrun (a rendezvous), every rank waits for the others and rank 0 finishes;
- ranks started by hand (RANK/WORLD_SIZE, no rendezvous) each try, and the one that finds every
  shard done finishes — the last to finish, or a plain rerun, which finishes whatever was left.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from predistill.core.artifacts import PredistillError

# --- the ranks: torchrun's environment, the process group -------------------------------------


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise PredistillError("LOCAL_RANK must be an integer") from None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment (1 process without it)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise PredistillError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise PredistillError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


@dataclass
class Dist:
    """This process's place among the ranks; `group` when a process group is up (collectives work)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.group:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled between the ranks of this run only)."""
        if not self.group:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: torch.device, *, need_group: bool = True) -> Dist:
    """Ranks from torchrun's environment; the process group (nccl on GPU, gloo on CPU) is started
    when there is more than one rank and a rendezvous (MASTER_ADDR). Without one, `need_group`
    stages refuse, and the others (sharded scoring) run their share independently."""
    rank, world = rank_and_world()
    if world == 1:
        return Dist()
    if "MASTER_ADDR" not in os.environ:
        if need_group:
            raise PredistillError(
                f"WORLD_SIZE={world} without a rendezvous (MASTER_ADDR): start the ranks with torchrun"
            )
        return Dist(rank, world, local_rank())
    if device.type == "cuda":  # NCCL's collectives run on the current device: this rank's own
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 alone may work for long while the others wait in a barrier (lm-eval, assembling a
        # store, finishing a logits store): far longer than the default 10-minute collective timeout
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank(), group=True)


# --- the work plan -----------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """The file stem of shard `index` of a sharded stage's work (`shard-00042`)."""
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class Shard:
    index: int
    ids: np.ndarray  # int64 instance ids, ascending

    @property
    def name(self) -> str:
        return shard_name(self.index)


def plan_shards(n_instances: int, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise PredistillError(f"--shard-size must be ≥ 1, got {shard_size}")
    return [
        Shard(s, np.arange(start, min(start + shard_size, n_instances), dtype=np.int64))
        for s, start in enumerate(range(0, n_instances, shard_size))
    ]


def owns(d: Dist, index: int, group: int = 1) -> bool:
    """Is shard `index` this rank's? Shards go round-robin over the ranks in runs of `group` (a
    rank that writes one shard of a coarser artifact owns every shard that feeds it)."""
    return (index // group) % d.world == d.rank


def finish_by_last_rank(d: Dist, finish: Callable[[bool], bool], stage: str, artifact: str) -> bool:
    """Finish the artifact once every rank's shards are in; True in the process that did.

    `finish(others_may_be_writing)` finishes it from the shards on disk and returns False when a
    shard is missing — which, while other ranks may still be writing, means "not yet", and is an
    error otherwise. Call it on every rank after the rank's own shards are marked done."""
    if d.group:
        d.barrier()
        if d.main and not finish(False):
            raise PredistillError(f"{stage}: shards of {artifact} missing after every rank finished")
        d.barrier()
        return d.main
    if finish(d.world > 1):
        return True
    if d.world == 1:  # nobody else will write them
        raise PredistillError(f"{stage}: shards of {artifact} missing after the run")
    print(
        f"predistill {stage}: rank {d.rank} done; other ranks' shards remain (the last one to finish, "
        f"or a rerun, writes {artifact})",
        file=sys.stderr,
    )
    return False


# --- the driver ---------------------------------------------------------------------------------


class ShardedWork(Protocol):
    """A sharded stage's work, as `run_sharded` sees it."""

    @property
    def shards(self) -> Sequence[Shard]:
        """The plan: every shard of the artifact, the same for any world size."""
        ...

    def done(self, shard: Shard) -> bool:
        """Is the shard done: its marker on disk vouches for its data (always False for work kept in memory)."""
        ...

    def run(self, shards: Sequence[Shard]) -> None:
        """Do these shards (this rank's, not done yet), marking each done as it is finished."""
        ...

    def finish(self, others_may_be_writing: bool) -> bool:
        """Finish the artifact from every shard's data; False when a shard is missing (see
        `finish_by_last_rank`)."""
        ...


@dataclass(frozen=True)
class Work:
    """A `ShardedWork` made of a stage's own functions (for a stage whose pass is one function)."""

    shards: Sequence[Shard]
    done: Callable[[Shard], bool]
    run: Callable[[Sequence[Shard]], None]
    finish: Callable[[bool], bool]


def run_sharded(work: ShardedWork, d: Dist, stage: str, artifact: str, *, group: int = 1) -> bool:
    """Run this rank's share of `work` and finish the artifact when every shard is in; True in the
    process that finished it. A rerun after a kill does only the shards without a valid marker, so
    it ends with the same bytes as a run that was never stopped. `group`: see `owns`."""
    mine = [s for s in work.shards if owns(d, s.index, group)]
    todo = [s for s in mine if not work.done(s)]
    if len(todo) < len(mine):
        of_rank = f" of rank {d.rank}" if d.world > 1 else ""
        print(
            f"predistill {stage}: resuming {artifact}: {len(mine) - len(todo)} of {len(mine)} shards{of_rank} "
            "already done",
            file=sys.stderr,
        )
    work.run(todo)
    return finish_by_last_rank(d, work.finish, stage, artifact)
