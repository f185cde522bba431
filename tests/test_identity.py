"""What makes an artifact the one asked for is declared once, on each setting (`config.Effect`), and
read by one function (`config.identity`): a rerun that changes only where things are written or how
the same thing is computed reuses (or resumes) the output; any other change is another artifact."""

import dataclasses
import json

import pytest

from predistill.core.config import (
    EXECUTION,
    Effect,
    flat_identity,
    from_flat,
    identity,
    keys_with_effect,
    leaves,
    option,
    to_flat,
)
from predistill.training.config import DESIGN_AXES, TrainConfig, configuration_keys, result_identity


@dataclasses.dataclass
class Inner:
    size: int = option(4)
    chunk: int = option(64, effect=Effect.ROUNDING)


@dataclasses.dataclass
class Side:
    path: str = option("")


@dataclasses.dataclass
class Outer:
    lr: float = option(0.1)
    out: str = option("", effect=Effect.NONE)
    device: str = option("cpu", effect=Effect.ROUNDING)
    heldout: list[str] = option(default_factory=list, effect=Effect.MEASURE)
    inner: Inner = option(default_factory=Inner)
    side: Side = option(default_factory=Side, effect=Effect.NONE)  # a by-product: all of it ignored


def test_identity_keeps_what_changes_the_artifact_shaped_like_asdict():
    cfg = Outer(heldout=["a=b"])
    assert identity(cfg) == {"lr": 0.1, "heldout": ["a=b"], "inner": {"size": 4}}
    assert identity(cfg, ignore={Effect.NONE}) == {
        "lr": 0.1,
        "device": "cpu",
        "heldout": ["a=b"],
        "inner": {"size": 4, "chunk": 64},
    }
    assert identity(cfg, ignore={Effect.ROUNDING})["side"] == {"path": ""}
    assert identity(cfg, ignore=()) == dataclasses.asdict(cfg)
    identity(cfg)["heldout"].append("c=d")  # a copy: the config is not changed through it
    assert cfg.heldout == ["a=b"]


def test_flat_identity_follows_the_enclosing_fields_effect():
    assert keys_with_effect(Outer) == ["lr", "heldout", "size"]  # side's `path` goes with `side`
    flat = {"lr": 0.2, "out": "x", "device": "cuda", "heldout": [], "size": 8, "path": "p", "command": "train"}
    assert flat_identity(flat, Outer, ignore=EXECUTION | {Effect.MEASURE}) == {"lr": 0.2, "size": 8}


def _other_value(leaf, value):
    """A value of the leaf's type that differs from `value` (for the table test below)."""
    choices = leaf.field.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != value)
    base = leaf.type
    if base is bool:
        return not value
    if base is int:
        return (value or 0) + 3
    if base is float:
        return (value or 0.0) * 0.5 + 0.125
    if base is list:
        return ["x=y"]
    return f"{value}-other"


def _effect(leaf) -> Effect:
    return next((e for e in leaf.effects if e in EXECUTION), leaf.effects[-1])


@pytest.mark.parametrize("leaf", list(leaves(TrainConfig)), ids=lambda leaf: leaf.key)
def test_a_train_rerun_resumes_across_execution_settings_and_nothing_else(leaf):
    # with a KD source, every KD setting changes the run
    base = to_flat(TrainConfig(store="s", out="o", kd_logits="l", alpha=0.5))
    changed = from_flat(TrainConfig, base | {leaf.key: _other_value(leaf, base[leaf.key])})
    same = result_identity(changed) == result_identity(from_flat(TrainConfig, base))
    assert same == (_effect(leaf) in EXECUTION), f"{leaf.key}: declared {_effect(leaf).value}"


def test_the_execution_settings_of_train_are_the_ones_that_move_only_rounding_or_bookkeeping():
    execution = {leaf.key for leaf in leaves(TrainConfig) if _effect(leaf) in EXECUTION}
    assert {
        "out",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "eval_every",
        "loss_chunk",
        "fused_kernels",
        "micro_batch_size",
        "fsdp",
        "compile",
        "attn_impl",
        "device",
        "kd_online_chunk",
    } <= execution
    assert not execution & {"lr", "batch_size", "seq_len", "seed", "steps", "precision", "kd_loss", "store"}


def test_a_report_groups_runs_by_what_trains_them_not_by_budget_seed_or_measurement():
    keys = {leaf.key for leaf in leaves(TrainConfig)}
    assert set(DESIGN_AXES) <= keys  # every axis the report names is a setting
    config = set(configuration_keys())
    assert config <= keys and not config & set(DESIGN_AXES)
    assert not config & {"heldout", "val_store", "eval_instances", "save_logits", "device", "out"}
    assert {"lr", "batch_size", "model", "selection", "kd_logits", "kd_loss", "precision"} <= config
    assert set(configuration_keys(keep=("steps",))) == config | {"steps"}


def _config_classes() -> list[type]:
    import argparse

    from predistill import cli

    classes = []
    for module, _ in cli.COMMANDS.values():
        parser = argparse.ArgumentParser()
        __import__(module, fromlist=["add_arguments"]).add_arguments(parser)
        if (cls := parser.get_default("config_class")) is not None:
            classes.append(cls)
    return classes


def test_every_command_declares_its_settings_effects_and_its_identity_is_json():
    classes = _config_classes()
    assert TrainConfig in classes and len(classes) >= 10
    for cls in classes:
        for leaf in leaves(cls):
            assert all(isinstance(e, Effect) for e in leaf.effects), (cls.__name__, leaf.key)
        json.dumps(identity(cls()), sort_keys=True)
