"""The run's config: `TrainConfig`, what a run directory's `config.json` holds (`formats.rundir`
has the directory's layout), with each setting's declared effect — which of them make the run the
run it is (`result_identity` for a rerun, `configuration_keys` for a comparison of runs) — and the
check of a run manifest's recorded config against those declarations (`check_run_manifest`)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from predistill.core.artifacts import PredistillError
from predistill.core.config import (
    EXECUTION,
    Effect,
    check_ranges,
    check_recorded,
    flat_identity,
    from_flat,
    keys_with_effect,
    leaves,
    option,
    to_flat,
)
from predistill.formats import rundir
from predistill.modeling.models import ATTN_IMPLS
from predistill.training.kd import KDConfig
from predistill.training.losses import DEFAULT_CHUNK
from predistill.training.positions import KD_POSITION_RULES, check_token_rule
from predistill.training.positions import RULES as POSITION_RULES
from predistill.training.schedules import ALPHA_SCHEDULES, LR_SCHEDULES

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    model: str = option(
        "preset:tiny", 'model spec: preset:NAME (from scratch), an HF directory or hub id, smollm2-135m'
    )
    tokenizer: str | None = option(None, "tokenizer spec (default: the token store's own tokenizer)")
    store: str = option("", 'token store to train on')
    val_store: str | None = option(
        None, 'held-out token store for val loss (default: STORE/val when it exists)', effect=Effect.MEASURE
    )
    heldout: list[str] = option(
        default_factory=list,
        help="NAME=DIR: a held-out token store scored on all its "
        "instances after the last step, its loss recorded under NAME in the manifest's "
        "heldout_losses (repeatable: a pool-mixture set and target sets)",
        flag="--heldout",
        metavar="NAME=DIR",
        effect=Effect.MEASURE,
    )
    selection: str | None = option(None, 'selection directory from `predistill sample`: train only on those instances')
    token_rule: str | None = option(
        None,
        "token-level selection (docs/positions.md): the LM loss trains on --token-fraction of each instance's "
        "positions — difference: the top ones by log p_teacher − log p_ref per token (--teacher-record, "
        "--reference-record from `score --token-record`); excess: RHO-1's, the top ones by the student's own loss "
        "minus the reference's, chosen at each step (--reference-record); random: a seeded subset of the same size "
        "(the control)",
        choices=POSITION_RULES,
    )
    token_fraction: float = option(
        1.0, "--token-rule: fraction of each instance's target positions kept", interval="(0, 1]"
    )
    teacher_record: str | None = option(None, "--token-rule difference: the teacher's token record", metavar="TDIR")
    reference_record: str | None = option(
        None, "--token-rule difference, excess: the reference's token record", metavar="TDIR"
    )
    out: str = option("", 'run directory', effect=Effect.NONE)
    name: str | None = option(None, 'method label shown in reports (default: derived from the KD settings)')
    steps: int = option(100, 'optimizer steps', interval="[1, inf)")
    flops_budget: float | None = option(
        None, 'training FLOPs budget; sets --steps from it (6·N·D, + 2·N_teacher·D online)', interval="(0, inf)"
    )
    epochs: float | None = option(
        None,
        'passes over the training instances (the data-limited regime, data repeated); '
        'sets --steps = ⌈epochs · instances / batch size⌉',
        interval="(0, inf)",
    )
    batch_size: int = option(8, 'global batch size in sequences (all ranks, all micro-batches)', interval="[1, inf)")
    micro_batch_size: int | None = option(
        None,
        'sequences per forward pass on one rank (default: the whole per-rank batch)',
        interval="[1, inf)",
        effect=Effect.ROUNDING,
    )
    seq_len: int = option(
        1024, 'training context; longer instances are truncated to seq-len+1 tokens', interval="[1, inf)"
    )
    lr: float = option(6e-4, 'peak learning rate', interval="(0, inf)")
    # WSD with a 20% decay, and WSD-α below: PD's configuration as the studies measured it (docs/study-web-analysis.md)
    lr_schedule: str = option(
        "wsd",
        'wsd (PD: warmup, stable, cosine decay over --decay-ratio), cosine (MiniPLM: '
        'warmup, cosine to lr·min-lr-ratio) or constant',
        choices=LR_SCHEDULES,
    )
    warmup: int = option(0, 'warmup steps for cosine and constant schedules', interval="[0, inf)")
    min_lr_ratio: float = option(0.1, 'final lr as a fraction of --lr', interval="[0, 1]")
    warmup_ratio: float = option(0.1, 'WSD warmup fraction (LR and alpha)', interval="[0, 1]")
    decay_ratio: float = option(0.2, 'WSD decay fraction (LR and alpha)', interval="[0, 1]")
    weight_decay: float = option(0.01, 'AdamW weight decay (on matrices only)', interval="[0, inf)")
    beta1: float = option(0.9, 'AdamW beta1', interval="[0, 1)")
    beta2: float = option(0.98, 'AdamW beta2', interval="[0, 1)")
    eps: float = option(1e-6, 'AdamW epsilon', interval="(0, inf)")
    grad_clip: float = option(1.0, 'gradient-norm clip (0 disables)', interval="[0, inf)")
    seed: int = option(0, 'seed for initialisation and data order', interval="[0, 4294967295]")
    save_every: int = option(
        0, 'checkpoint every N steps (0: only the final export)', interval="[0, inf)", effect=Effect.NONE
    )
    export_every: int = option(
        0,
        'also write an HF export every N steps to OUT/exports/step-N (accuracy over '
        'training: `eval --exports`); 0: only the final OUT/hf',
        interval="[0, inf)",
        effect=Effect.NONE,
    )
    keep_checkpoints: int = option(2, 'checkpoints to keep', interval="[1, inf)", effect=Effect.NONE)
    eval_every: int = option(0, 'val loss every N steps (0: only at the end)', interval="[0, inf)", effect=Effect.NONE)
    eval_instances: int = option(256, 'val instances used for the val loss', interval="[1, inf)", effect=Effect.MEASURE)
    log_every: int = option(1, 'metrics.jsonl line every N steps', interval="[1, inf)", effect=Effect.NONE)
    alpha: float = option(0.0, 'KD weight α (the maximum for scheduled α)', interval="[0, 1]")
    alpha_schedule: str = option(
        "wsd",
        'wsd (PD: α warms up from 0, holds, decays with the LR), constant, linear-inc, linear-dec, period, wsd-beta',
        choices=ALPHA_SCHEDULES,
    )
    kd_logits: str | None = option(None, 'offline teacher logits store (from `predistill score --logits-out`): PD')
    kd_teacher: str | None = option(
        None, 'online teacher model spec, full-vocabulary KD (Vanilla KD); its FLOPs are counted'
    )
    kd: KDConfig = option(default_factory=KDConfig)  # flags --kd-loss, --temperature, --kd-tail, …
    kd_positions: str | None = option(
        None,
        "student-entropy: SE-KD, the KD term only at the --kd-position-fraction of each instance's positions where "
        "the student's own entropy is highest, chosen in each step (the LM term everywhere; docs/positions.md)",
        choices=KD_POSITION_RULES,
    )
    kd_position_fraction: float = option(
        1.0, "--kd-positions: fraction of each instance's positions that get the KD term", interval="(0, 1]"
    )
    # a by-product written step by step: a run cannot resume across it, a comparison of methods ignores it
    save_logits: str | None = option(
        None, "write this model's own top-p-k logits store while it trains (PD's online logits)", effect=Effect.MEASURE
    )
    save_logits_top_p: float = option(
        0.95, "--save-logits: probability mass kept (PD: 0.95)", interval="(0, 1]", effect=Effect.MEASURE
    )
    save_logits_top_k: int = option(
        100,
        "--save-logits: at most this many entries per position (PD §3.1: 100)",
        interval="[1, 65535]",
        effect=Effect.MEASURE,
    )
    minillm: bool = option(
        False, "with --kd-teacher and --kd-loss rkl: MiniLLM, reverse KL on the student's own samples"
    )
    minillm_prefix: int = option(32, "MiniLLM: corpus tokens the student's samples continue", interval="[1, inf)")
    loss_chunk: int = option(
        DEFAULT_CHUNK, 'rows per chunk of the vocabulary projection', interval="[1, inf)", effect=Effect.ROUNDING
    )
    fsdp: bool = option(
        False,
        'shard the model with FSDP2 (fully_shard) and checkpoint with DCP (under torchrun); '
        'its parameters compute in bf16 under --precision bf16 (GPU default), gradients reduce in fp32',
        effect=Effect.ROUNDING,
    )  # its checkpoints are DCP: `train` resumes them only under --fsdp
    attn_impl: str = option(
        "auto",
        "attention kernel: auto (transformers' default, sdpa), sdpa, flash_attention_2, eager",
        choices=ATTN_IMPLS,
        effect=Effect.ROUNDING,
    )
    precision: str = option(
        "auto",
        "bf16: forward and backward under bfloat16 autocast (fp32 weights, optimizer and "
        "losses); fp32: none; auto: bf16 on GPU, fp32 on CPU. On a CPU with avx512_bf16 or AMX, "
        "bf16 is faster too (bench/bench_train.py)",
        choices=PRECISIONS,
    )
    compile: bool = option(
        False, "torch.compile the decoder body (GPU speed; the first steps pay the compilation)", effect=Effect.ROUNDING
    )
    activation_checkpointing: bool = option(
        False,
        "recompute each layer's activations in backward: less memory for large students, ≈ 1/3 more compute",
        effect=Effect.ROUNDING,
    )
    fused_kernels: bool = option(
        True,
        "memory-light RMSNorm and SwiGLU MLP (predistill.modeling.kernels) where the student "
        "has them (--no-fused-kernels: the model's own forwards)",
        flag="--no-fused-kernels",
        action="store_false",
        effect=Effect.ROUNDING,
    )
    tensorboard: bool = option(False, 'also log to OUT/tensorboard (needs the tensorboard package)', effect=Effect.NONE)
    device: str = option("auto", 'auto (cuda if available), cpu or cuda', effect=Effect.ROUNDING)

    def check(self) -> None:
        """What this config's run would refuse, before anything is read (a recipe's dry run calls it)."""
        check_token_rule(self.token_rule, self.token_fraction, self.teacher_record, self.reference_record)
        if self.lr_schedule not in LR_SCHEDULES:
            raise PredistillError(f"unknown --lr-schedule {self.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise PredistillError(
                f"unknown --alpha-schedule {self.alpha_schedule!r}; known: {', '.join(ALPHA_SCHEDULES)}"
            )
        if self.alpha > 0 and not (self.kd_logits or self.kd_teacher):
            raise PredistillError("--alpha > 0 needs a KD source: --kd-logits DIR or --kd-teacher MODEL")
        if self.kd_logits and self.kd_teacher:
            raise PredistillError("give one KD source: --kd-logits or --kd-teacher, not both")
        if self.minillm and not self.kd_teacher:
            raise PredistillError("--minillm needs an online teacher: --kd-teacher MODEL")
        if self.kd_position_fraction < 1 and not self.kd_positions:
            raise PredistillError("--kd-position-fraction < 1 needs --kd-positions student-entropy")
        if self.kd_positions and not (self.kd_logits or self.kd_teacher):
            raise PredistillError(
                "--kd-positions chooses where the KD term applies: it needs --kd-logits or --kd-teacher"
            )
        if self.kd_positions and self.minillm:
            raise PredistillError("--kd-positions is for KD on the corpus's positions, not MiniLLM's samples")
        if (self.kd_logits or self.kd_teacher) and self.alpha == 0:
            raise PredistillError("a KD source with --alpha 0 would be ignored; set --alpha")
        check_ranges(self)  # every declared interval (the CLI checked them too; a config built in code is checked here)
        if self.epochs is not None and self.flops_budget is not None:
            raise PredistillError("give --epochs or --flops-budget, not both (each sets --steps)")
        if self.minillm and self.fsdp:
            raise PredistillError("--minillm samples from the whole student; use it without --fsdp (DDP)")
        if self.minillm and self.kd.loss != "rkl":
            raise PredistillError(f"MiniLLM optimises the reverse KL; use --kd-loss rkl (got {self.kd.loss})")
        if self.attn_impl == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise PredistillError(
                "--attn-impl flash_attention_2 needs the flash-attn package (a CUDA build): "
                "pip install flash-attn; or use --attn-impl sdpa"
            )
        if self.kd_logits or self.kd_teacher:
            dataclasses.replace(self.kd, chunk_size=self.loss_chunk).validate()


def result_identity(cfg: TrainConfig) -> dict:
    """What makes a run's weights and records what they are (`Effect.RESULT` and `MEASURE`
    settings): a rerun that matches it finds the run complete, or resumes it."""
    result = flat_identity(to_flat(cfg), TrainConfig)
    if not (cfg.kd_logits or cfg.kd_teacher):  # no KD source: no KD setting (or its default) changes the run
        for leaf in leaves(TrainConfig):
            if leaf.path[0] == "kd":
                result.pop(leaf.key, None)
    return result


def same_result(saved: dict, cfg: TrainConfig) -> bool:
    """Does a saved config (a run's config.json) train the same weights as `cfg`?"""
    return result_identity(from_flat(TrainConfig, saved)) == result_identity(cfg)


# The axes of a study's design: runs whose configs differ only in these are one configuration, at
# several budgets and seeds (`report` groups them; a method's label is not a setting of the training).
BUDGET_KEYS = ("steps", "flops_budget", "epochs")
DESIGN_AXES = ("name", "seed", *BUDGET_KEYS)


def configuration_keys(keep: tuple[str, ...] = ()) -> list[str]:
    """The keys of a run's config.json that say which configuration it is (`report`): what changes
    the weights (`Effect.RESULT`), without the design axes (but with those in `keep`)."""
    return [k for k in keys_with_effect(TrainConfig, EXECUTION | {Effect.MEASURE}) if k not in DESIGN_AXES or k in keep]


def check_run_manifest(manifest: dict, where: str | Path) -> None:
    """A complete run's manifest as `train` writes it; the first field that is not is named."""
    rundir.check_manifest(manifest, where)
    try:  # the recorded settings, by their declared types, choices and ranges (report and resume read them)
        check_recorded(TrainConfig, manifest["config"], f"{where}: config")
    except PredistillError as e:
        raise PredistillError(f"{e} (corrupted run)") from None
