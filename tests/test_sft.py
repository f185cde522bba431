"""`predistill sft-data` and `train` on its store: the loss counts the responses and nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from predistill import cli
from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model, load_tokenizer
from predistill.stages.sft import SFTDataConfig, encode_chat, encode_plain
from predistill.stages.sft import run as sft_data
from predistill.stages.train import TrainConfig, make_batch
from predistill.stages.train import run as train

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Green, and red."},
        ]
    },
    {"prompt": "Add two and two.", "response": "Four."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"text": "Plain pre-training text is trained on in full."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_template_masks_exactly_the_responses_and_their_eos(tmp_path, bpe_tokenizer):
    store = TokenStore(
        sft_data(
            SFTDataConfig(
                data=[str(write_jsonl(tmp_path / "d.jsonl", RECORDS))],
                tokenizer=str(bpe_tokenizer),
                out=str(tmp_path / "sft"),
                template="plain",
                max_len=256,
            )
        )
    )
    tok = load_tokenizer(str(bpe_tokenizer))
    assert len(store) == 4 and store.has_loss_mask
    targets = [tok.decode(store[i][store.loss_mask(i).astype(bool)]) for i in range(4)]
    eos = tok.eos_token
    assert targets[0] == f"Blue.{eos}Green, and red.{eos}"  # both assistant turns, nothing of the user's
    assert targets[1] == f"Four.{eos}" and targets[2] == f"chat{eos}"
    assert targets[3] == f"Plain pre-training text is trained on in full.{eos}"
    assert tok.decode(store[1]) == f"User: Add two and two.\nAssistant: Four.{eos}"
    assert store.manifest["n_target_tokens"] == sum(int(store.loss_mask(i).sum()) for i in range(4))


def test_chat_template_spans_are_what_each_assistant_turn_adds(bpe_tokenizer):
    tok = load_tokenizer(str(bpe_tokenizer))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = RECORDS[0]["messages"]
    ids, mask = encode_chat(tok, messages, "test")
    assert ids == tok.apply_chat_template(messages, tokenize=True)
    spans = tok.decode([i for i, m in zip(ids, mask) if m])
    assert spans == "Blue.</s>Green, and red.</s>"  # the role header is context, the end of turn a target
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"  # not turn by turn
    with pytest.raises(PredistillError, match="turn by turn"):
        encode_chat(tok, messages, "test")
    plain_ids, plain_mask = encode_plain(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert len(plain_ids) == len(plain_mask) and plain_mask[-1] == 1 and plain_ids[-1] == tok.eos_token_id


def test_training_on_the_store_counts_only_response_tokens(tmp_path, bpe_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3] * 4)
    store_dir = sft_data(
        SFTDataConfig(
            data=[str(data)], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "sft"), template="plain", max_len=64
        )
    )
    store = TokenStore(store_dir)
    ids = np.arange(4)
    inputs, targets, mask = make_batch(store, ids, 64, "cpu")
    assert int(mask.sum()) == sum(int(store.loss_mask(i)[1:].sum()) for i in ids)
    # the first step's loss is the mean NLL over the response targets of the first batch, by hand
    out = train(
        TrainConfig(
            model="preset:tiny",
            tokenizer=str(bpe_tokenizer),
            store=str(store_dir),
            out=str(tmp_path / "run"),
            steps=1,
            batch_size=4,
            seq_len=64,
            lr=1e-9,
            warmup=0,
            eval_instances=4,
            seed=0,
        )
    )
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    from predistill.stages.train import DataOrder

    batch = DataOrder(np.arange(len(store)), 0).global_batch(0, 4)
    inputs, targets, mask = make_batch(store, batch, 64, "cpu")
    model, _ = load_model("preset:tiny", load_tokenizer(str(bpe_tokenizer)), seed=0)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inputs).logits.float(), -1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    assert first["lm_loss"] == pytest.approx(float(nll[mask].mean()), rel=1e-4)


def test_bad_data_is_one_line_and_leaves_nothing(tmp_path, bpe_tokenizer, capsys):
    cases = [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "nothing to train on"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role"),
        ('{"prompt": "x"}', "must be strings"),
        ('{"foo": 1}', "needs messages"),
        ('not json', "not a JSON record"),
        ('[1, 2]', "JSON object"),
    ]
    for k, (line, message) in enumerate(cases):
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        out = tmp_path / f"out{k}"
        with pytest.raises(SystemExit) as exit_info:
            cli.main(
                [
                    "sft-data",
                    "--data",
                    str(tmp_path / "bad.jsonl"),
                    "--tokenizer",
                    str(bpe_tokenizer),
                    "--out",
                    str(out),
                ]
            )
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and message in err and "\n" not in err, (line, err)
        assert not out.exists() and not (tmp_path / f"out{k}.partial").exists()
    with pytest.raises(PredistillError, match="no chat template"):
        sft_data(
            SFTDataConfig(
                data=[str(write_jsonl(tmp_path / "d.jsonl", RECORDS))],
                tokenizer=str(bpe_tokenizer),
                out=str(tmp_path / "x"),
                template="chat",
            )
        )


def test_a_changed_mask_file_is_refused_on_read(tmp_path, bpe_tokenizer):
    store_dir = sft_data(
        SFTDataConfig(
            data=[str(write_jsonl(tmp_path / "d.jsonl", RECORDS))],
            tokenizer=str(bpe_tokenizer),
            out=str(tmp_path / "sft"),
            template="plain",
        )
    )
    mask = store_dir / "loss_mask.bin"
    data = bytearray(mask.read_bytes())
    data[3] ^= 1
    mask.write_bytes(bytes(data))
    with pytest.raises(PredistillError, match="sha256 mismatch"):
        TokenStore(store_dir).loss_mask(0)
    with pytest.raises(PredistillError, match="sha256 mismatch"):
        TokenStore(store_dir).verify_all()  # predistill verify
    # rerunning with the same data and settings is a no-op; other data under the same --out is refused
    mask.write_bytes(bytes(data[:3]) + bytes([data[3] ^ 1]) + bytes(data[4:]))
    assert (
        sft_data(
            SFTDataConfig(
                data=[str(tmp_path / "d.jsonl")], tokenizer=str(bpe_tokenizer), out=str(store_dir), template="plain"
            )
        )
        == store_dir
    )
    with pytest.raises(PredistillError, match="other settings"):
        sft_data(
            SFTDataConfig(
                data=[str(write_jsonl(tmp_path / "e.jsonl", RECORDS[:2]))],
                tokenizer=str(bpe_tokenizer),
                out=str(store_dir),
                template="plain",
            )
        )


def test_a_masked_store_is_never_copied_without_its_mask(tmp_path, bpe_tokenizer, capsys):
    # re-tokenising (prepare --source store:), materialising a selection, exporting to Megatron:
    # none can carry the mask, so each is refused in one line and leaves nothing behind
    masked = sft_data(
        SFTDataConfig(
            data=[str(write_jsonl(tmp_path / "d.jsonl", RECORDS))],
            tokenizer=str(bpe_tokenizer),
            out=str(tmp_path / "s"),
        )
    )
    commands = {
        "derived": ["prepare", "--source", f"store:{masked}", "--tokenizer", str(bpe_tokenizer), "--out"],
        "materialized": [
            "sample",
            "--method",
            "random",
            "--store",
            str(masked),
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path / "sel"),
            "--tokenizer",
            str(bpe_tokenizer),
            "--materialize",
        ],
        "exported": ["export", "--store", str(masked), "--out"],
    }
    for name, command in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, str(tmp_path / name)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and "carries a loss mask" in err and "\n" not in err, (name, err)
        assert not any(p.name.startswith(name) for p in tmp_path.iterdir()), name
    assert not (tmp_path / "sel").exists()  # the selection is refused before it is made
