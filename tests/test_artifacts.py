"""The output-directory protocol and the shard markers every resumable stage shares."""

import pytest

from predistill.core.artifacts import (
    PredistillError,
    check_output,
    check_plan,
    read_marker,
    write_manifest,
    write_shard,
)


def test_a_marker_vouches_for_its_data_only_as_written(tmp_path):
    data, marker = tmp_path / "s.bin", tmp_path / "s.done"
    write_shard(data, marker, b"abc", n=3)
    assert read_marker(marker, data, n=3)["n"] == 3
    assert read_marker(marker, data, n=4) is None  # the caller's expectation differs
    data.write_bytes(b"abd")  # same size, other bytes
    assert read_marker(marker, data) is None
    marker.write_text("{not json")
    assert read_marker(marker, data) is None


def test_check_plan_pins_a_directory_to_one_plan(tmp_path):
    check_plan(tmp_path / "w", {"a": 1}, "thing")
    check_plan(tmp_path / "w", {"a": 1}, "thing")  # same plan: resume
    with pytest.raises(PredistillError, match=r"another plan — a: 1 → 2"):
        check_plan(tmp_path / "w", {"a": 2}, "thing")


def test_check_output_nothing_to_do_refuse_or_go_on(tmp_path):
    out = tmp_path / "out"
    identity_of = lambda m: {"config": m["config"]}  # noqa: E731
    assert check_output(out, "fmt", "thing", {"config": 1}, identity_of) is False  # absent
    out.mkdir()
    assert check_output(out, "fmt", "thing", {"config": 1}, identity_of) is False  # empty
    (out / "junk").write_text("x")
    with pytest.raises(PredistillError, match="is not a thing"):
        check_output(out, "fmt", "thing", {"config": 1}, identity_of)
    assert check_output(out, "fmt", "thing", {"config": 1}, identity_of, resumable=lambda o: True) is False
    write_manifest(out, {"format": "fmt", "config": 1})
    assert check_output(out, "fmt", "thing", {"config": 1}, identity_of) is True
    with pytest.raises(PredistillError, match="other settings .*config: 1 → 2"):
        check_output(out, "fmt", "thing", {"config": 2}, identity_of)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PredistillError, match="not a directory"):
        check_output(tmp_path / "file", "fmt", "thing", {}, identity_of)


def test_a_resumed_staging_directory_loses_the_temporaries_a_kill_left(tmp_path):
    """A SIGKILL in the middle of `write_json_atomic` leaves `NAME.PID.tmp`; resuming must not carry it
    into OUT (prepare's rerun was not byte-identical when the kill hit its progress file)."""
    from predistill.core.artifacts import STAGING_MARK, staged_dir

    out = tmp_path / "out"
    staging = tmp_path / "out.partial"
    staging.mkdir()
    (staging / STAGING_MARK).write_text("fmt")  # this tool's own unfinished "fmt" artifact
    (staging / "progress.json").write_text("{}")
    (staging / "progress.json.4194999.tmp").write_text("{")  # a dead writer's (no such pid)
    with staged_dir(out, "fmt", resume=lambda s: (s / "progress.json").is_file()) as tmp:
        assert (tmp / "progress.json").is_file()  # resumed, not discarded
        assert not (tmp / "progress.json.4194999.tmp").exists()


def test_staging_replaces_only_what_this_tool_wrote(tmp_path):
    """OUT is replaced only when it is this tool's artifact of the same format; OUT.partial only when
    it carries this tool's staging mark for that format; anything else is refused before any work."""
    from predistill.core.artifacts import MANIFEST, staged_dir, write_manifest

    def stage(out):
        with staged_dir(out, "fmt") as tmp:
            write_manifest(tmp, {"format": "fmt"})

    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(PredistillError, match="is not a fmt this tool wrote"):
        stage(users)
    assert (users / "thesis.tex").read_text() == "years of work"

    other = tmp_path / "other"
    other.mkdir()
    write_manifest(other, {"format": "token_store"})  # this tool's, but another kind of artifact
    with pytest.raises(PredistillError, match="is not a fmt this tool wrote"):
        stage(other)

    partial = tmp_path / "mine.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(PredistillError, match="is not this tool's unfinished fmt"):
        stage(tmp_path / "mine")
    assert (partial / "notes.txt").read_text() == "mine"

    ours = tmp_path / "ours"
    stage(ours)
    stage(ours)  # a rerun replaces its own artifact
    assert sorted(p.name for p in ours.iterdir()) == [MANIFEST]  # the staging mark never reaches OUT


def test_temporaries_are_created_exclusively_never_through_a_link(tmp_path):
    import os

    from predistill.core.artifacts import write_bytes_atomic

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "out.json"
    os.symlink(victim, target.with_name(f"out.json.{os.getpid()}.tmp"))  # planted at the temporary's name
    write_bytes_atomic(target, b"new")
    assert victim.read_bytes() == b"keep" and target.read_bytes() == b"new"
