"""`predistill diversity`: how diverse a corpus is, for MiniPLM's comparison of the original corpus,
the teacher-generated one (SeqKD) and the Difference-Sampled one.

    predistill diversity --store out/store [--selection out/sel] --model out/reference/hf \
        --sample 1000 --out out/diversity.json

A seeded random sample of the store's instances (of the selected ones, with `--selection`) is
embedded by a model: the mean of its final hidden states over each instance's tokens, scaled to unit
length. The diversity is the Vendi score (Friedman & Dieng, 2023) of their cosine similarities K
(n × n): exp of the Shannon entropy of the eigenvalues of K/n, the effective number of distinct
instances — 1 when all are alike, n when all are orthogonal. K/n has the non-zero eigenvalues of
XᵀX/n (d × d), which is what is decomposed: memory stays d², whatever n.

MiniPLM reports a semantic-diversity number per corpus without (in the text available here) naming
its embedding model or sample size; compare corpora with one model and one `--sample`, never numbers
across models. Output: one JSON file (format "diversity"), written atomically.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from predistill.core.artifacts import PredistillError, write_json_atomic
from predistill.core.config import add_config_arguments, config_from_args, option
from predistill.formats.selection import load_selection
from predistill.formats.store import TokenStore
from predistill.modeling.models import (
    DTYPES,
    final_hidden,
    load_model,
    model_body,
    model_hash,
    resolve_device,
    resolve_dtype,
)
from predistill.training.forward import ModelInputs

FORMAT = "diversity"


@dataclass
class DiversityConfig:
    store: str = option("", "token store whose instances are measured", required=True)
    model: str = option(
        "",
        "embedding model: a run directory, an HF directory or hub id, smollm2-135m "
        "(use one model for every corpus you compare)",
        required=True,
    )
    out: str = option("", "JSON file to write", required=True)
    selection: str | None = option(None, "measure only these instances (a `predistill sample` selection)")
    sample: int = option(1000, "instances embedded (all when fewer); drawn with --seed", interval="[2, inf)")
    seed: int = option(0, "seed of the sample", interval="[0, 4294967295]")
    max_len: int = option(512, "tokens of each instance embedded (longer ones are truncated)", interval="[1, inf)")
    batch_size: int = option(16, "instances per forward pass", interval="[1, inf)")
    device: str = option("auto", "auto (a GPU if any), cpu, cuda, cuda:N")
    dtype: str = option(
        "auto", "auto = float32 on CPU, bfloat16 on GPU (the embeddings are averaged in fp32)", choices=DTYPES
    )


def vendi_score(embeddings: torch.Tensor) -> float:
    """exp(H(λ)), λ the eigenvalues of K/n with K the cosine similarities of the rows."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).clamp_min(0)
    eigenvalues = eigenvalues[eigenvalues > 0]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


@torch.no_grad()
def embed(model, inputs: ModelInputs, ids: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Mean final hidden state over each instance's tokens (padding excluded), fp32, on the CPU."""
    body = model_body(model)
    out = []
    for start in range(0, len(ids), batch_size):
        tokens, lengths = inputs.batch([inputs.row(i) for i in ids[start : start + batch_size]])
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).to(device)
        # right padding under a causal model: no real token sees a pad, so no attention mask is needed
        hidden = final_hidden(body, tokens.to(device)).float()
        out.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu())
    return torch.cat(out)


def run(cfg: DiversityConfig) -> dict:
    if cfg.sample < 2 or cfg.max_len < 1 or cfg.batch_size < 1:
        raise PredistillError("--sample must be ≥ 2, --max-len and --batch-size ≥ 1")
    out = Path(cfg.out)
    if out.is_dir():
        raise PredistillError(f"--out {out} is a directory; give the JSON file to write")
    store = TokenStore(cfg.store)
    pool = load_selection(cfg.selection, store) if cfg.selection else np.arange(len(store))
    pool = pool[store.lengths[pool] > 0]
    if len(pool) < 2:
        raise PredistillError(f"{cfg.store}: fewer than 2 non-empty instances to compare")
    rng = np.random.default_rng(cfg.seed)
    ids = np.sort(rng.choice(pool, size=min(cfg.sample, len(pool)), replace=False))

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    preset_tokenizer = store.tokenizer() if cfg.model.startswith("preset:") else None
    model, tokenizer = load_model(cfg.model, preset_tokenizer=preset_tokenizer, dtype=dtype)
    model.to(device).eval()
    inputs = ModelInputs(store, tokenizer, cfg.max_len)
    embeddings = embed(model, inputs, ids, cfg.batch_size, device)
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    n = len(ids)
    result = {
        "format": FORMAT,
        "version": 1,
        "vendi_score": vendi_score(embeddings),
        "n_instances": n,
        # off-diagonal mean: Σ_ij K_ij = |Σ_i x_i|² for unit rows
        "mean_cosine_similarity": float(((unit.sum(0) ** 2).sum() - n) / (n * (n - 1))),
        "store": {"path": str(store.dir), "store_hash": store.hash, "n_instances": len(store)},
        "selection": cfg.selection,
        "pool_instances": int(len(pool)),
        "model": {"spec": cfg.model, "hash": model_hash(model)},
        "retokenized": inputs.retokenized,
        "config": asdict(cfg),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DiversityConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(DiversityConfig, args)
    if cfg is None:
        return
    r = run(cfg)
    print(
        f"predistill: wrote {cfg.out}: Vendi score {r['vendi_score']:.2f} over {r['n_instances']} instances "
        f"(mean cosine similarity {r['mean_cosine_similarity']:.3f})"
    )
