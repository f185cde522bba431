"""`predistill generate`: the SeqKD baseline's data: teacher continuations of corpus prefixes.

For every chosen instance of a token store, the first `prefix_len` tokens are the prompt and the
teacher writes up to `max_new_tokens` more (HF `model.generate`: batched, KV-cached, left-padded
prompts; temperature / top-p / top-k sampling, or greedy). The output instance is the prompt
followed by the generated tokens, up to and including the first EOS the teacher writes; a student
pre-trained on the output learns the teacher's sequences (sequence-level KD, the MiniPLM paper's
SeqKD baseline). The output is an ordinary token store (see store.py) that `predistill train
--store OUT` trains on directly; its `val/` split is the source store's held-out split (copied, or
re-tokenised for a teacher with another tokenizer), so students are evaluated on real text.

When the teacher's tokenizer is not the store's, each prompt (the store's first `prefix_len` ids)
is decoded to text and re-encoded with the teacher's tokenizer, and the output store is in the
teacher's tokenizer (saved to OUT/tokenizer).

Determinism and resume. The chosen instances are cut into shards of `shard_size`, and each shard
into batches of `batch_size` consecutive instances. Sampling in a batch is seeded from (seed,
the batch's first instance id) alone, so a shard's tokens do not depend on which shards ran
before it. Work goes to the sibling directory `OUT.shards/`:

    OUT.shards/
      plan.json                 what is being generated (settings, teacher weights hash, store
                                hash, instance ids); a rerun with another plan is refused
      shard-00000.bin           the shard's output instances back to back (store dtype)
      shard-00000.done          completion marker: JSON with ids, lengths, prompt lengths, the
                                .bin's sha256 and the shard's teacher FLOPs; written last

Each file is written atomically (temp name + rename), so a killed run resumes at the first shard
without a valid marker. When every shard is done the store is assembled in `OUT.partial/`,
renamed to `OUT`, and `OUT.shards/` is removed. A rerun of a finished output is a no-op, and a
run killed at any point and rerun gives the same bytes as an uninterrupted one.

Output extras beside the token-store files: `source_ids.npy` (int64: the source instance of each
output instance) and `prompt_lengths.npy` (int64: how many leading tokens of each output instance
are the prompt). Teacher cost: `flops` = 2 · N · (tokens fed to the teacher), N = non-embedding
parameters + output projection (train.py's flops_per_token / 6); a row of P prompt and G
generated tokens feeds P + G − 1 tokens (the last one generated is never fed back). Padding and
the steps a finished row idles through while its batch completes are not counted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predistill.core import artifacts
from predistill.core.artifacts import (
    PredistillError,
    check_plan,
    claim_work,
    is_complete,
    read_manifest,
    read_marker,
    refuse_foreign_work,
    remove_owned_work,
)
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.core.sharding import Shard, Work, init_distributed, rank_and_world, run_sharded
from predistill.formats.selection import load_selection, read_selection_manifest
from predistill.formats.store import FORMAT as STORE_FORMAT
from predistill.formats.store import TokenStore, TokenStoreWriter, token_dtype
from predistill.modeling.models import (
    DTYPES,
    forward_params,
    load_model,
    model_hash,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from predistill.text.retokenize import retokenize, write_retokenized

PLAN = "plan.json"
PLAN_FORMAT = "generate_plan"


@dataclass
class GenerateConfig:
    model: str = option(
        "",
        "teacher spec: smollm2-135m, an HF directory or hub id, a run directory, or preset:NAME (random weights)",
        required=True,
    )
    store: str = option("", "source token store whose instances' prefixes are the prompts", required=True)
    out: str = option("", "token store to write (work in OUT.shards/ is resumed)", required=True, effect=Effect.NONE)
    prefix_len: int = option(
        32, "store tokens of each instance used as the prompt (shorter instances: all of it)", interval="[1, inf)"
    )
    max_new_tokens: int | None = option(
        None,
        "tokens the teacher writes at most per instance (default: fill up to "
        "the store's instance length, max_len + 1 − prefix-len)",
        interval="[1, inf)",
    )
    temperature: float = option(1.0, "sampling temperature", interval="(0, inf)")
    top_p: float = option(1.0, "nucleus sampling mass (1.0: off)", interval="(0, 1]")
    top_k: int = option(0, "sample among the k likeliest tokens (0: off)", interval="[0, inf)")
    greedy: bool = option(False, "argmax decoding (ignores temperature/top-p/top-k)")
    seed: int = option(
        0,
        "sampling seed (each batch is seeded from it and its first instance id) and the weight seed "
        "of preset: teachers",
        interval="[0, 4294967295]",
    )
    batch_size: int = option(8, "prompts generated together", interval="[1, inf)")
    shard_size: int = option(64, "instances per shard, the unit of resume", interval="[1, inf)")
    max_instances: int | None = option(
        None,
        "continue only N instances, evenly spaced over the store (or the selection) (default: all)",
        metavar="N",
        interval="[1, inf)",
    )
    selection: str | None = option(
        None, "continue only the instances of a `predistill sample` selection of this store", metavar="DIR"
    )
    device: str = option("auto", "auto (this rank's GPU if any), cpu, cuda, cuda:N", effect=Effect.ROUNDING)
    dtype: str = option("auto", "teacher weights/activations; auto = float32 on CPU, bfloat16 on GPU", choices=DTYPES)
    progress: bool = option(
        True, "progress bar (--no-progress: none)", flag="--no-progress", action="store_false", effect=Effect.NONE
    )

    def identity(self) -> dict:
        """The settings that change the output (recorded as the store's `config`; a finished store
        is reused only when they match)."""
        out = identity(self)
        if self.greedy:  # sampling knobs mean nothing for greedy decoding
            out.update(temperature=None, top_p=None, top_k=None)
        return out


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------


def validate(cfg: GenerateConfig) -> None:
    if not cfg.model:
        raise PredistillError("generate needs --model")
    if not cfg.store:
        raise PredistillError("generate needs --store")
    if not cfg.out:
        raise PredistillError("generate needs --out")
    if cfg.prefix_len < 1:
        raise PredistillError(f"--prefix-len must be ≥ 1, got {cfg.prefix_len}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise PredistillError(f"--max-new-tokens must be ≥ 1, got {cfg.max_new_tokens}")
    if not cfg.greedy:
        if not cfg.temperature > 0:
            raise PredistillError(
                f"--temperature must be > 0 (use --greedy for argmax decoding), got {cfg.temperature}"
            )
        if not 0 < cfg.top_p <= 1:
            raise PredistillError(f"--top-p must be in (0, 1], got {cfg.top_p}")
        if cfg.top_k < 0:
            raise PredistillError(f"--top-k must be ≥ 0 (0 = off), got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise PredistillError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    if cfg.shard_size < 1:
        raise PredistillError(f"--shard-size must be ≥ 1, got {cfg.shard_size}")
    if cfg.max_instances is not None and cfg.max_instances < 1:
        raise PredistillError(f"--max-instances must be ≥ 1, got {cfg.max_instances}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PredistillError(f"{out} exists and is not a directory; refusing to overwrite it")
    if out.resolve() == Path(cfg.store).resolve():
        raise PredistillError("--out must not be the source --store")


def choose_instances(n_store: int, selection: np.ndarray | None, max_instances: int | None) -> np.ndarray:
    """The source instances to continue, ascending: the selection (default: all), thinned to
    `max_instances` evenly spaced ones (k·n // N for k < N), so every domain of the corpus keeps
    its share without any randomness."""
    ids = np.arange(n_store, dtype=np.int64) if selection is None else selection
    if max_instances is not None and max_instances < len(ids):
        ids = ids[(np.arange(max_instances, dtype=np.int64) * len(ids)) // max_instances]
    return ids


def store_instance_len(store: TokenStore) -> int:
    """The longest instance the store was cut to hold: max_len + 1 from prepare's config, else the
    longest instance present."""
    max_len = (store.manifest.get("config") or {}).get("max_len")
    if isinstance(max_len, int) and max_len > 0:
        return max_len + 1
    return int(store.lengths.max()) if len(store) else 0


def batch_seed(seed: int, first_id: int) -> int:
    """The sampling seed of a batch: a function of the run's seed and the batch's first instance."""
    digest = hashlib.sha256(f"predistill-generate:{seed}:{first_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------------


def read_shard(work: Path, shard: Shard, dtype: np.dtype) -> dict | None:
    """A finished shard (marker + tokens) if its marker vouches for its .bin as it is on disk."""
    done, data = work / f"{shard.name}.done", work / f"{shard.name}.bin"
    marker = read_marker(done, data, ids=shard.ids.tolist())
    if marker is None:
        return None
    tokens = np.fromfile(data, dtype=dtype)
    if len(tokens) != sum(marker["lengths"]):
        return None
    marker["tokens"] = tokens
    return marker


def write_shard(
    work: Path,
    shard: Shard,
    rows: list[np.ndarray],
    prompt_lengths: list[int],
    dtype: np.dtype,
    flops: int,
) -> None:
    data = np.concatenate(rows).astype(dtype).tobytes() if rows else b""
    artifacts.write_shard(
        work / f"{shard.name}.bin",
        work / f"{shard.name}.done",
        data,
        ids=shard.ids.tolist(),
        lengths=[len(r) for r in rows],
        prompt_lengths=prompt_lengths,
        flops=flops,
    )


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


class Prompter:
    """The teacher-token prompt of a source instance: its first `prefix_len` store ids, re-encoded
    as text when the teacher's tokenizer is not the store's."""

    def __init__(self, store: TokenStore, tokenizer, prefix_len: int, retokenized: bool):
        self.store, self.tokenizer, self.prefix_len, self.retokenized = store, tokenizer, prefix_len, retokenized

    def __call__(self, i: int) -> np.ndarray:
        ids = np.asarray(self.store[int(i)][: self.prefix_len], dtype=np.int64)
        if self.retokenized:
            ids = retokenize(ids, self.store.tokenizer(), self.store.eos_id, self.tokenizer)
            if len(ids) == 0:  # the prefix spelled nothing in the teacher's vocabulary
                ids = np.asarray([self.tokenizer.eos_token_id], dtype=np.int64)
        return ids


def generate_batch(
    model, prompts: list[np.ndarray], gen_config, seed: int, pad_id: int, eos_id: int, device
) -> list[np.ndarray]:
    """Continue each prompt (left-padded into one batch); return the generated ids of each row,
    cut after the first EOS (kept)."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p) :] = torch.from_numpy(p)
        attention[b, width - len(p) :] = 1
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=gen_config,
            use_model_defaults=False,
        )
    new = out[:, width:].cpu().numpy().astype(np.int64)
    rows = []
    for row in new:
        ends = np.flatnonzero(row == eos_id)
        rows.append(row[: ends[0] + 1] if len(ends) else row)
    return rows


def make_generation_config(cfg: GenerateConfig, max_new_tokens: int, eos_id: int, pad_id: int, suppress: list[int]):
    from transformers import GenerationConfig

    sampling = (
        {"temperature": None, "top_p": None, "top_k": None}
        if cfg.greedy
        else {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
    )
    return GenerationConfig(
        do_sample=not cfg.greedy,
        **sampling,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        num_beams=1,
        suppress_tokens=suppress or None,
    )


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def _paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".shards"), out.with_name(out.name + ".partial")


def run(cfg: GenerateConfig) -> Path:
    validate(cfg)
    out = Path(cfg.out)
    work, _ = _paths(out)
    store = TokenStore(cfg.store)  # one-line error when missing or incomplete
    config = cfg.identity()

    output = Output(out, STORE_FORMAT, "token store", {"config": config, "source_store_hash": store.hash})
    if output.complete():
        remove_owned_work(work, PLAN_FORMAT)  # left behind by a run killed after its rename (a user's folder stays)
        return out

    refuse_foreign_work(work, PLAN_FORMAT, "generation")  # a user's OUT.shards is never written into or removed
    selection = load_selection(cfg.selection, store) if cfg.selection else None
    ids = choose_instances(len(store), selection, cfg.max_instances)
    if len(ids) == 0:
        raise PredistillError(f"{cfg.store} has no instances to continue")
    instance_len = store_instance_len(store)
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else instance_len - cfg.prefix_len
    if max_new < 1:
        raise PredistillError(
            f"--prefix-len {cfg.prefix_len} leaves nothing to generate: the store's instances hold "
            f"≤ {instance_len} tokens; lower --prefix-len or set --max-new-tokens"
        )

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_model(cfg.model, preset_tokenizer=store.tokenizer(), seed=cfg.seed, dtype=dtype)
    model.to(device).eval()
    teacher_tok_hash = tokenizer_hash(tokenizer)
    retokenized = teacher_tok_hash != store.tokenizer_hash
    if retokenized:
        vocab_size = len(tokenizer)
        tok_info = {
            "spec": cfg.model,
            "hash": teacher_tok_hash,
            "vocab_size": vocab_size,
            "eos_id": tokenizer.eos_token_id,
        }
    else:
        vocab_size = store.vocab_size
        tok_info = dict(store.manifest["tokenizer"])
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    n_embeddings = model.get_output_embeddings().weight.shape[0]
    if n_embeddings < vocab_size:
        raise PredistillError(
            f"model '{cfg.model}' predicts {n_embeddings} tokens, fewer than the {vocab_size} of its tokenizer"
        )
    # ids the model can emit but the tokenizer has no token for (padded embedding rows) are never sampled
    suppress = list(range(vocab_size, n_embeddings))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    dtype_out = token_dtype(vocab_size)
    n_params = forward_params(model, vocab_size)  # suppressed padding rows are not tokens
    gen_config = make_generation_config(cfg, max_new, eos_id, pad_id, suppress)
    prompter = Prompter(store, tokenizer, cfg.prefix_len, retokenized)

    plan = {
        "format": PLAN_FORMAT,
        "version": 1,
        "config": config,
        "max_new_tokens": max_new,
        "store_hash": store.hash,
        "teacher_hash": model_hash(model),
        "tokenizer_hash": tok_info["hash"],
        "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
        "n_instances": len(ids),
    }
    claim_work(work, PLAN_FORMAT, "generation")
    check_plan(work, plan, "generation")

    shards = [Shard(k, ids[s : s + cfg.shard_size]) for k, s in enumerate(range(0, len(ids), cfg.shard_size))]
    # under torchrun (or RANK/WORLD_SIZE by hand) rank r generates shards r, r+W, …: a shard's
    # tokens depend on its ids and the seed alone, so the output does not depend on the ranks
    rank, world = rank_and_world()
    ranks = init_distributed(device, need_group=False)
    if world == 1:  # one process assembles whatever is done; a lock of killed ranks means nothing now
        (work / "assemble.lock").unlink(missing_ok=True)

    def generate_shards(todo: Sequence[Shard]) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(len(shard.ids) for shard in todo),
            unit="inst",
            desc=f"generate {Path(cfg.model).name}",
            dynamic_ncols=True,
            disable=not cfg.progress or rank > 0,
            file=sys.stderr,
        )
        n_new, t0 = 0, time.perf_counter()
        try:
            for shard in todo:
                rows, prompt_lengths, flops = [], [], 0
                for start in range(0, len(shard.ids), cfg.batch_size):
                    batch_ids = shard.ids[start : start + cfg.batch_size]
                    prompts = [prompter(i) for i in batch_ids]
                    if max_pos is not None and max(len(p) for p in prompts) + max_new > max_pos:
                        raise PredistillError(
                            f"prompt + --max-new-tokens ({max(len(p) for p in prompts)} + {max_new}) "
                            f"exceeds the model's {max_pos} positions"
                        )
                    generated = generate_batch(
                        model, prompts, gen_config, batch_seed(cfg.seed, int(batch_ids[0])), pad_id, eos_id, device
                    )
                    for p, g in zip(prompts, generated):
                        rows.append(np.concatenate([p, g]))
                        prompt_lengths.append(len(p))
                        flops += 2 * n_params * (len(p) + len(g) - 1)
                        n_new += len(g)
                    bar.update(len(batch_ids))
                    bar.set_postfix_str(f"{n_new / max(time.perf_counter() - t0, 1e-9):.0f} gen tok/s")
                write_shard(work, shard, rows, prompt_lengths, dtype_out, flops)
        finally:
            bar.close()

    def assemble(others_may_be_writing: bool) -> bool:
        if others_may_be_writing and not _claim_assembly(work, shards, dtype_out):
            return False
        names = store.domain_names
        counts = [
            {"n_documents": 0, "n_instances": 0, "n_tokens": 0, "n_prompt_tokens": 0, "n_generated_tokens": 0}
            for _ in names
        ]
        total_flops = 0
        source_ids: list[int] = []
        all_prompt_lengths = []
        with output.staged() as tmp:
            writer = TokenStoreWriter(tmp, vocab_size)
            for shard in shards:
                done = read_shard(work, shard, dtype_out)
                if done is None:
                    raise PredistillError(f"{work}: shard {shard.index} vanished or changed while assembling; rerun")
                total_flops += done["flops"]
                bounds = np.concatenate([[0], np.cumsum(done["lengths"])])
                for j, i in enumerate(shard.ids):
                    row = done["tokens"][bounds[j] : bounds[j + 1]]
                    d = int(store.domain_ids[int(i)])
                    writer.append(row, d)
                    c = counts[d]
                    c["n_instances"] += 1
                    c["n_tokens"] += len(row)
                    c["n_documents"] += int((row == eos_id).sum())
                    c["n_prompt_tokens"] += done["prompt_lengths"][j]
                    c["n_generated_tokens"] += len(row) - done["prompt_lengths"][j]
                source_ids.extend(int(i) for i in shard.ids)
                all_prompt_lengths.extend(done["prompt_lengths"])
            np.save(tmp / "source_ids.npy", np.asarray(source_ids, dtype=np.int64))
            np.save(tmp / "prompt_lengths.npy", np.asarray(all_prompt_lengths, dtype=np.int64))
            if retokenized:
                tokenizer.save_pretrained(tmp / "tokenizer")
            else:
                shutil.copytree(store.dir / "tokenizer", tmp / "tokenizer")
            source_val = store.dir / "val"
            if source_val.is_dir():  # before the top-level manifest: that one is written last
                _write_val(TokenStore(source_val), tmp / "val", retokenized, tokenizer, tok_info)
            meta = store.manifest["domains"]
            domains = [
                {"name": name, "kind": "generated", "location": (meta[d] or {}).get("location"), **counts[d]}
                for d, name in enumerate(names)
            ]
            generation = {
                "prefix_len": cfg.prefix_len,
                "max_new_tokens": max_new,
                "greedy": cfg.greedy,
                "temperature": config["temperature"],
                "top_p": config["top_p"],
                "top_k": config["top_k"],
                "seed": cfg.seed,
                "batch_size": cfg.batch_size,
                "shard_size": cfg.shard_size,
                "dtype": str(dtype).removeprefix("torch."),
                "suppressed_ids": len(suppress),
            }
            writer.finish(
                {
                    "split": "train",
                    "config": config,
                    "tokenizer": tok_info,
                    "eos_id": eos_id,
                    "domains": domains,
                    "n_documents": sum(c["n_documents"] for c in counts),
                    "source_store_hash": store.hash,
                    "source": {
                        "store_hash": store.hash,
                        "store_dir": str(store.dir.resolve()),
                        "selection": cfg.selection,
                        "selection_hash": (
                            read_selection_manifest(cfg.selection).get("selection_sha256") if cfg.selection else None
                        ),
                        "n_instances": len(store),
                        "retokenized": retokenized,
                    },
                    "generation": generation,
                    "teacher": {"spec": cfg.model, "weights_hash": plan["teacher_hash"], "forward_params": n_params},
                    "n_prompt_tokens": sum(c["n_prompt_tokens"] for c in counts),
                    "n_generated_tokens": sum(c["n_generated_tokens"] for c in counts),
                    "flops": total_flops,
                }
            )
        remove_owned_work(work, PLAN_FORMAT)
        return True

    continuations = Work(
        shards, lambda shard: read_shard(work, shard, dtype_out) is not None, generate_shards, assemble
    )
    run_sharded(continuations, ranks, "generate", f"the store {out}")
    return out


def _claim_assembly(work: Path, shards: list[Shard], dtype: np.dtype) -> bool:
    """Ranks started by hand without a rendezvous: does this one assemble the store? The first to
    find every shard done and take the lock does (a plain rerun assembles whatever is left)."""
    if any(read_shard(work, shard, dtype) is None for shard in shards):
        return False
    try:
        os.close(os.open(work / "assemble.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _write_val(val: TokenStore, directory: Path, retokenized: bool, tokenizer, tok_info: dict) -> None:
    """The source's held-out split beside the generated store: copied as is, or re-tokenised with
    the teacher's tokenizer, so that `train --store OUT` evaluates students on real text."""
    if not retokenized:
        shutil.copytree(val.dir, directory)
        return
    write_retokenized(
        val,
        np.arange(len(val)),
        directory,
        tokenizer,
        tok_info,
        split="val",
        config=val.manifest.get("config"),
        extra={"source_store_hash": val.hash},
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, GenerateConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(GenerateConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    if not is_complete(out, STORE_FORMAT):  # another rank writes the store
        return
    m = read_manifest(out, STORE_FORMAT)
    print(
        f"predistill: wrote {out}: {m['n_instances']} instances, {m['n_tokens']} tokens "
        f"({m['n_generated_tokens']} generated by the teacher), {m['flops']:.3e} teacher FLOPs"
    )
