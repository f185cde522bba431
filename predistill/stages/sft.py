"""`predistill sft-data`: instruction / chat data → a token store whose loss mask marks the responses.

    predistill sft-data --data chat.jsonl --tokenizer RUN/hf --out sft-store [--template auto|chat|plain]
    predistill train --model RUN --store sft-store --out RUN-sft --lr 4e-5 ...   # loss on responses only

The PD paper evaluates its students after supervised fine-tuning, with the LM loss on the responses
only. This stage writes that data as a token store with `loss_mask.bin` (predistill.formats.store), and
`train` honours any store's mask: fine-tuning is `train` on this store, with everything `train` has
(resume, DDP/FSDP, KD, FLOPs, exports, reports).

Records (jsonl, one per line), in any of three shapes:
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: every assistant
  message is a response;
- `{"prompt": "...", "response": "..."}` (or Alpaca's `instruction` [+ `input`] and `output`): one
  user turn and its response;
- `{"text": "..."}`: plain text trained on in full (the PD paper mixes pre-training text into SFT).

Templates: `chat` renders with the tokenizer's chat template; a response's tokens are what
rendering the conversation up to it adds after rendering the turns before it with the generation
prompt (so the template's own role headers are context, its end-of-turn tokens are targets).
`plain` writes `User: …` / `Assistant: …` lines (`System: …` first), each response followed by
EOS, which is a target; pieces are encoded separately, so a mask boundary is a token boundary.
`auto`: `chat` when the tokenizer has a chat template, else `plain`.

One instance per record, cut to `--max-len` + 1 tokens (the count cut is reported); records with
no target token left are skipped and counted. The store is written in one go, in the data's order.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predistill.core.artifacts import PredistillError, parse_json, sha256_file
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.formats.store import FORMAT, IDENTITY_AT, TokenStoreWriter

TEMPLATES = ("auto", "chat", "plain")
ROLES = ("system", "user", "assistant")
PLAIN_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


@dataclass
class SFTDataConfig:
    data: list[str] = option(
        default_factory=list,
        help="jsonl file of records (messages / prompt+response / "
        "instruction+output / text); repeatable, read in order",
        flag="--data",
        required=True,
        metavar="FILE",
        effect=Effect.NONE,
    )  # what counts is their content, `inputs`
    tokenizer: str = option(
        "", "the student's tokenizer: a run directory's hf/, an HF directory, or a model spec", required=True
    )
    out: str = option("", "token store directory to write", required=True, effect=Effect.NONE)
    template: str = option(
        "auto",
        "chat: the tokenizer's chat template; plain: User:/Assistant: lines; auto: chat "
        "when the tokenizer has a template",
        choices=TEMPLATES,
    )
    max_len: int = option(
        2048, "training context; instances hold ≤ max-len+1 tokens (longer records are cut)", interval="[8, inf)"
    )


def messages_of(record, where: str) -> list[dict] | None:
    """The record as a conversation ([{role, content}]), or None for plain text ({"text": ...})."""
    if not isinstance(record, dict):
        raise PredistillError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
            )
        ):
            raise PredistillError(
                f"{where}: messages must be a non-empty list of {{role: {'/'.join(ROLES)}, content: string}}"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise PredistillError(f"{where}: a conversation without an assistant message has nothing to train on")
        return messages
    prompt = record.get("prompt", record.get("instruction"))
    response = record.get("response", record.get("output"))
    if prompt is not None or response is not None:
        extra = record.get("input") or ""
        if not isinstance(prompt, str) or not isinstance(response, str) or not isinstance(extra, str):
            raise PredistillError(f"{where}: prompt/instruction, response/output (and input) must be strings")
        return [
            {"role": "user", "content": prompt + (f"\n\n{extra}" if extra else "")},
            {"role": "assistant", "content": response},
        ]
    if isinstance(record.get("text"), str):
        return None
    raise PredistillError(f"{where}: a record needs messages, prompt+response, instruction+output, or text")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_plain(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) with the plain template: headers and user turns are context; each response and
    the EOS after it are targets."""
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = _encode(tokenizer, PLAIN_HEADERS[m["role"]])
        ids += head
        mask += [0] * len(head)
        if m["role"] == "assistant":
            body = _encode(tokenizer, m["content"]) + [tokenizer.eos_token_id]
            ids += body
            mask += [1] * len(body)
        else:
            body = _encode(tokenizer, m["content"] + "\n")
            ids += body
            mask += [0] * len(body)
    return ids, mask


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(ids, mask) with the tokenizer's chat template; a response's span is what its turn adds to
    the rendering of the turns before it (with the generation prompt)."""
    ids = _chat_ids(tokenizer, messages)
    mask = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:k], generation_prompt=True)
        upto = _chat_ids(tokenizer, messages[: k + 1])
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise PredistillError(
                f"{where}: the tokenizer's chat template does not render this conversation turn by "
                "turn (a later turn changes an earlier one); use --template plain"
            )
        mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    return ids, mask


def records(paths: list[str]):
    """Yield (where, record) over the jsonl files, in order; an unreadable line is one clear error."""
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise PredistillError(f"--data {path}: cannot read it ({e.strerror or e})") from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", parse_json(line)
                except ValueError as e:
                    raise PredistillError(f"{path}:{n}: not a JSON record ({e})") from None
                except UnicodeDecodeError:
                    raise PredistillError(f"{path}:{n}: not UTF-8 text") from None


def run(cfg: SFTDataConfig) -> Path:
    from predistill.modeling.models import load_tokenizer, tokenizer_hash

    if not cfg.data:
        raise PredistillError("sft-data needs at least one --data FILE")
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.tokenizer)
    tok_info = {
        "spec": cfg.tokenizer,
        "hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }
    template = cfg.template if cfg.template != "auto" else ("chat" if tokenizer.chat_template else "plain")
    if template == "chat" and not tokenizer.chat_template:
        raise PredistillError(
            f"--template chat: the tokenizer {cfg.tokenizer} has no chat template; use --template plain"
        )
    if tokenizer.eos_token_id is None:
        raise PredistillError(f"the tokenizer {cfg.tokenizer} has no EOS token")
    config = identity(cfg, blank=True) | {"template": template}
    inputs = []  # the data's content: the same records under another path are the same store
    for path in cfg.data:
        try:
            inputs.append(sha256_file(path))
        except OSError as e:
            raise PredistillError(f"--data {path}: cannot read it ({e.strerror or e})") from None
    wanted = {"config": config, "tokenizer_hash": tok_info["hash"], "inputs": inputs}
    output = Output(out, FORMAT, "token store", wanted, located=IDENTITY_AT)
    if output.complete():
        return out
    counts = {"n_records": 0, "n_text": 0, "n_cut": 0, "n_skipped_no_target": 0}
    with output.staged() as tmp:
        writer = TokenStoreWriter(tmp, len(tokenizer), loss_mask=True)
        for where, record in records(cfg.data):
            messages = messages_of(record, where)
            counts["n_records"] += 1
            if messages is None:
                ids = _encode(tokenizer, record["text"]) + [tokenizer.eos_token_id]
                mask = [1] * len(ids)
                counts["n_text"] += 1
            else:
                ids, mask = (
                    encode_chat(tokenizer, messages, where) if template == "chat" else encode_plain(tokenizer, messages)
                )
            if len(ids) > cfg.max_len + 1:
                ids, mask = ids[: cfg.max_len + 1], mask[: cfg.max_len + 1]
                counts["n_cut"] += 1
            if not any(mask[1:]):  # the first token is never a target
                counts["n_skipped_no_target"] += 1
                continue
            writer.append(np.asarray(ids, dtype=np.int64), 0, np.asarray(mask, dtype=np.uint8))
        if writer.n_instances == 0:
            raise PredistillError("no record with a target token to train on")
        tokenizer.save_pretrained(tmp / "tokenizer")
        manifest = writer.finish(
            {
                "split": "train",
                "config": config,
                "tokenizer": tok_info,
                "eos_id": tokenizer.eos_token_id,
                "inputs": inputs,
                "domains": [{"name": "sft", "kind": "sft", **counts}],
                **counts,
            }
        )
    print(
        f"predistill: wrote {out}: {manifest['n_instances']} instances, {manifest['n_tokens']} tokens of which "
        f"{manifest['n_target_tokens']} are targets ({template} template); {counts['n_cut']} cut to --max-len, "
        f"{counts['n_skipped_no_target']} skipped (no target left)"
    )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, SFTDataConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(SFTDataConfig, args)
    if cfg is not None:
        run(cfg)
