"""`predistill diversity`: the Vendi score of a corpus sample's embeddings (MiniPLM's diversity table)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from predistill.cli import main as cli_main
from predistill.core.artifacts import sha256_file, write_manifest
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model
from predistill.stages.diversity import DiversityConfig, run, vendi_score


def test_vendi_score_counts_effectively_distinct_items():
    assert vendi_score(torch.ones(5, 8)) == pytest.approx(1.0)  # all alike
    assert vendi_score(torch.eye(6) * 3) == pytest.approx(6.0)  # all orthogonal: the length does not matter
    two_kinds = torch.cat([torch.eye(4)[:1].repeat(3, 1), torch.eye(4)[1:2].repeat(3, 1)])
    assert vendi_score(two_kinds) == pytest.approx(2.0)  # three copies each of two items
    # the definition: exp of the entropy of the eigenvalues of K/n, K the n × n cosine similarities
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(unit @ unit.T / 7).clamp_min(0)
    lam = lam[lam > 1e-12]
    assert vendi_score(x) == pytest.approx(float(torch.exp(-(lam * lam.log()).sum())), rel=1e-9)


def test_diversity_embeds_a_seeded_sample_as_the_plain_model_would(tiny_store, tmp_path):
    out = tmp_path / "d.json"
    result = run(
        DiversityConfig(store=str(tiny_store), model="preset:tiny", out=str(out), sample=12, seed=3, batch_size=5)
    )
    store = TokenStore(tiny_store)
    ids = np.sort(np.random.default_rng(3).choice(np.arange(len(store)), 12, replace=False))
    model, _ = load_model("preset:tiny", store.tokenizer())
    with torch.no_grad():
        plain = torch.stack(
            [
                model.model(input_ids=torch.tensor(np.array(store[i][:512]), dtype=torch.long)[None])
                .last_hidden_state[0]
                .mean(0)
                for i in ids
            ]
        )
    assert result["vendi_score"] == pytest.approx(vendi_score(plain), rel=1e-5)
    assert 1 <= result["vendi_score"] <= 12 and result["n_instances"] == 12
    unit = torch.nn.functional.normalize(plain.double(), dim=1)
    off_diagonal = (unit @ unit.T).sum() - 12
    assert result["mean_cosine_similarity"] == pytest.approx(float(off_diagonal / (12 * 11)), rel=1e-5)
    assert json.loads(out.read_text()) == result
    again = run(
        DiversityConfig(
            store=str(tiny_store), model="preset:tiny", out=str(tmp_path / "e.json"), sample=12, seed=3, batch_size=5
        )
    )
    assert again["vendi_score"] == result["vendi_score"]  # deterministic


def test_a_selection_is_measured_alone(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    sel = tmp_path / "sel"
    sel.mkdir()
    np.save(sel / "selection.npy", np.array([4, 9], dtype=np.int64))
    write_manifest(
        sel, {"format": "selection", "store_hash": store.hash, "selection_sha256": sha256_file(sel / "selection.npy")}
    )
    result = run(
        DiversityConfig(
            store=str(tiny_store), selection=str(sel), model="preset:tiny", out=str(tmp_path / "d.json"), sample=50
        )
    )
    assert result["n_instances"] == 2 and result["pool_instances"] == 2 and 1 <= result["vendi_score"] <= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sample", "1"], "--sample must be ≥ 2"),
        (["--store", "/nonexistent"], "not a token store"),
        (["--out", "TMP"], "is a directory"),
    ],
)
def test_bad_input_is_one_line_error(tiny_store, tmp_path, capsys, args, message):
    base = {"--store": str(tiny_store), "--model": "preset:tiny", "--out": str(tmp_path / "d.json")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.replace("TMP", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli_main(["diversity", *[x for kv in base.items() for x in kv]])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
