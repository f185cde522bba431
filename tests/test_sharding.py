"""The sharded-stage driver (`sharding.run_sharded`), on a toy stage: each shard's data is its ids'
squares, marked done on disk; the artifact is every shard's data joined, written by one process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from predistill.core.artifacts import PredistillError, read_marker, write_shard
from predistill.core.sharding import Dist, Shard, owns, plan_shards, run_sharded


class Squares:
    """A ShardedWork: shard k's data is its ids squared; `finish` joins them into OUT/artifact.bin."""

    def __init__(self, root: Path, n: int, shard_size: int):
        self.root, self.shards = root, plan_shards(n, shard_size)
        self.ran: list[int] = []
        root.mkdir(exist_ok=True)

    def paths(self, shard: Shard) -> tuple[Path, Path]:
        return self.root / f"{shard.name}.bin", self.root / f"{shard.name}.done"

    def done(self, shard: Shard) -> bool:
        return read_marker(self.paths(shard)[1], self.paths(shard)[0], n=len(shard.ids)) is not None

    def run(self, shards: Sequence[Shard]) -> None:
        for shard in shards:
            self.ran.append(shard.index)
            write_shard(*self.paths(shard), (shard.ids**2).tobytes(), n=len(shard.ids))

    def finish(self, others_may_be_writing: bool) -> bool:
        if not all(self.done(s) for s in self.shards):
            if others_may_be_writing:
                return False
            raise PredistillError("a shard is missing")
        joined = b"".join(self.paths(s)[0].read_bytes() for s in self.shards)
        (self.root / "artifact.bin").write_bytes(joined)
        return True


def expected(n: int) -> bytes:
    return (np.arange(n, dtype=np.int64) ** 2).tobytes()


def test_one_process_runs_every_shard_and_finishes(tmp_path):
    work = Squares(tmp_path / "out", 10, 3)
    assert run_sharded(work, Dist(), "toy", "the artifact")
    assert work.ran == [0, 1, 2, 3]
    assert (tmp_path / "out" / "artifact.bin").read_bytes() == expected(10)


def test_a_rerun_does_only_the_shards_without_a_valid_marker(tmp_path, capsys):
    first = Squares(tmp_path / "out", 10, 3)
    first.run(first.shards[:2])  # a run killed after two shards
    (tmp_path / "out" / "shard-00001.bin").write_bytes(b"changed")  # its marker no longer vouches for it
    again = Squares(tmp_path / "out", 10, 3)
    assert run_sharded(again, Dist(), "toy", "the artifact")
    assert again.ran == [1, 2, 3]
    assert "toy: resuming the artifact: 1 of 4 shards already done" in capsys.readouterr().err
    assert (tmp_path / "out" / "artifact.bin").read_bytes() == expected(10)


def test_ranks_started_by_hand_split_the_shards_and_the_last_one_finishes(tmp_path, capsys):
    ranks = [Squares(tmp_path / "out", 10, 3) for _ in range(2)]
    assert not run_sharded(ranks[0], Dist(0, 2), "toy", "the artifact")  # rank 1's shards are not in yet
    assert "rank 0 done; other ranks' shards remain" in capsys.readouterr().err
    assert not (tmp_path / "out" / "artifact.bin").exists()
    assert run_sharded(ranks[1], Dist(1, 2), "toy", "the artifact")
    assert (ranks[0].ran, ranks[1].ran) == ([0, 2], [1, 3])
    assert (tmp_path / "out" / "artifact.bin").read_bytes() == expected(10)


def test_a_plain_rerun_finishes_what_ranks_left(tmp_path):
    rank0 = Squares(tmp_path / "out", 10, 3)
    assert not run_sharded(rank0, Dist(0, 2), "toy", "the artifact")
    rerun = Squares(tmp_path / "out", 10, 3)
    assert run_sharded(rerun, Dist(), "toy", "the artifact")
    assert rerun.ran == [1, 3]
    assert (tmp_path / "out" / "artifact.bin").read_bytes() == expected(10)


def test_a_rank_owns_whole_groups_of_shards(tmp_path):
    ranks = [Squares(tmp_path / "out", 16, 2) for _ in range(2)]
    for r, work in enumerate(ranks):
        run_sharded(work, Dist(r, 2), "toy", "the artifact", group=2)
    assert (ranks[0].ran, ranks[1].ran) == ([0, 1, 4, 5], [2, 3, 6, 7])
    assert all(owns(Dist(1, 2), s, 2) for s in (2, 3, 6, 7))


def test_one_process_that_cannot_finish_is_an_error_not_a_wait(tmp_path):
    class Lost(Squares):
        def finish(self, others_may_be_writing: bool) -> bool:
            return False  # a finish that finds a shard missing with nobody else writing

    with pytest.raises(PredistillError, match="missing after the run"):
        run_sharded(Lost(tmp_path / "out", 4, 2), Dist(), "toy", "the artifact")
