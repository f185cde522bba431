"""How a long stage's work is split over ranks, and which process finishes the artifact.

A sharded stage (`score`, `generate`, `eval`'s held-out loss) plans its work as numbered shards —
the same plan for any world size, so the artifact does not depend on the ranks — runs the shards
this rank owns (`owns`), marks each done on disk (`artifacts.write_shard`), and then one process
finishes the artifact from every shard's data (`finish_by_last_rank`):

- under torchrun (a rendezvous), every rank waits for the others and rank 0 finishes;
- ranks started by hand (RANK/WORLD_SIZE, no rendezvous) each try, and the one that finds every
  shard done finishes — the last to finish, or a plain rerun, which finishes whatever was left.
"""

from __future__ import annotations

import sys
from typing import Callable

from predistill.artifacts import PredistillError
from predistill.models import Dist


def shard_name(index: int) -> str:
    """The file stem of shard `index` of a sharded stage's work (`shard-00042`)."""
    return f"shard-{index:05d}"


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
    print(f"predistill {stage}: rank {d.rank} done; other ranks' shards remain (the last one to finish, "
          f"or a rerun, writes {artifact})", file=sys.stderr)
    return False
