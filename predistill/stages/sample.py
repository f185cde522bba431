"""`predistill sample`: choose the instances a student pre-trains on (MiniPLM's Difference Sampling).

Methods (all give the same output):
- `difference` (MiniPLM): score = mean log p_teacher − mean log p_reference per instance; one
  global descending sort; keep the first ⌊ratio·N⌋; store them in corpus order.
- `teacher-ppl`: keep the ⌊ratio·N⌋ instances of lowest teacher loss (`--keep low-loss`, the
  usual perplexity filter) or of highest (`--keep high-loss`).
- `random`: a uniformly random ⌊ratio·N⌋ subset (seeded).
- `proxy` (MiniPLM_prx, see proxy.py): teacher and reference score a small random subset, a proxy
  learns the difference and predicts it for every instance; then as `difference`.
Ties are broken by instance id (lower first); instances with no predicted token (NaN score) rank last.
`--per-domain` sorts each domain apart and keeps ⌊ratio·N_d⌋ of each: the corpus' domain mix is
kept (one global sort can keep almost all of a domain the teacher knows well and little of another).
`--complement` keeps the other instances instead: `random --ratio 0.2 --complement` with the seed of
a `random --ratio 0.2` selection is the rest of the corpus, disjoint from it (e.g. MiniPLM's
reference LM trains on the one, the students' pool is the other).

The selection format is defined in `predistill.formats.selection`.

`--materialize DIR --tokenizer T` also writes the kept instances as a new token store tokenised
with T (cross-family students): each instance's text is re-encoded with T, documents ending with
T's EOS; `--materialize-max-len` re-cuts the result into instances of ≤ max_len+1 tokens the way
`prepare` does. The store's held-out `val/` split, if any, is re-tokenised whole into DIR/val.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from predistill.core.artifacts import (
    PredistillError,
    read_manifest,
    sha256_file,
    write_manifest,
)
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.formats.scores import ScoreTable
from predistill.formats.selection import (
    FORMAT,
    IDS_FILE,
    VERSION,
    load_selection,
    read_selection_manifest,
    top_fraction,
)
from predistill.formats.store import FORMAT as STORE_FORMAT
from predistill.formats.store import IDENTITY_AT, TokenStore
from predistill.modeling.models import load_tokenizer, tokenizer_hash
from predistill.text.retokenize import write_retokenized
from predistill.training.proxy import ProxyConfig, run_proxy

KEEP_ENDS = ("low-loss", "high-loss")
EXCERPT_CHARS = 300


# ------------------------------------------------------------------------------------------------
# sampling methods: a registry (name → SamplingMethod; its score per instance, higher = kept first)
# ------------------------------------------------------------------------------------------------
# A new method is one scoring function here taking (n, teacher, reference, keep, seed) and one
# entry in METHODS; `--method`'s choices, the score tables it needs and its report come from that
# entry. `proxy` (MiniPLM_prx) is the one method that runs models itself (proxy.py).


def difference_scores(teacher: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """MiniPLM's score: mean log p_T − mean log p_ref (= NLL_ref − NLL_T), fp32."""
    return np.asarray(teacher, dtype=np.float32) - np.asarray(reference, dtype=np.float32)


def _difference(n, teacher, reference, keep, seed):
    return difference_scores(teacher, reference)


def _teacher_ppl(n, teacher, reference, keep, seed):
    t = np.asarray(teacher, dtype=np.float32)
    return t if keep == "low-loss" else -t  # high mean log-prob = low loss


def _random(n, teacher, reference, keep, seed):
    return np.random.default_rng(seed).random(n).astype(np.float32)


@dataclass(frozen=True)
class SamplingMethod:
    """One way to rank a corpus's instances for selection."""

    score: Callable[[int, np.ndarray, np.ndarray, str, int], np.ndarray] | None  # None: the proxy's own models
    tables: tuple[str, ...]  # the score tables it reads (`--teacher`, `--reference`)
    score_name: str  # what report.md calls its score
    difference: bool = False  # its score is MiniPLM's difference (report.md reads kept/dropped as hard/easy/noisy)
    keeps_either_end: bool = False  # `--keep high-loss` negates its score (teacher-ppl)


METHODS: dict[str, SamplingMethod] = {
    "difference": SamplingMethod(
        _difference, ("teacher", "reference"), "difference (log p_T − log p_ref)", difference=True
    ),
    "teacher-ppl": SamplingMethod(_teacher_ppl, ("teacher",), "teacher mean log-prob", keeps_either_end=True),
    "random": SamplingMethod(_random, (), "random key"),
    "proxy": SamplingMethod(None, (), "proxy-predicted difference", difference=True),
}


@dataclass
class SampleConfig:
    out: str = option("", "selection directory to write", required=True, effect=Effect.NONE)
    method: str = option(
        "difference", "difference (MiniPLM), teacher-ppl, random, or proxy (MiniPLM_prx)", choices=METHODS
    )
    ratio: float = option(0.5, "fraction α of instances to keep, in (0, 1]", interval="(0, 1]")
    store: str | None = option(
        None, "token store (default: the one the score tables were made from; required for random/proxy without tables)"
    )
    teacher: str | None = option(None, "teacher score table (from `predistill score`)")
    reference: str | None = option(None, "reference score table (from `predistill score`)")
    keep: str = option("low-loss", "teacher-ppl: keep the lowest or highest teacher-loss instances", choices=KEEP_ENDS)
    seed: int = option(0, "seed for random, the proxy subset, and report examples", interval="[0, 4294967295]")
    per_domain: bool = option(
        False, "keep the ratio of each domain separately (the corpus' domain mix is kept) instead of one global sort"
    )
    complement: bool = option(
        False,
        "keep the instances the method drops instead (with random: a held-apart slice "
        "disjoint from the one the same seed and ratio keep)",
    )
    n_examples: int = option(
        3, "top/bottom/random examples shown in report.md (each)", flag="--examples", interval="[0, inf)"
    )
    # materialisation is a by-product (a store with its own identity): it does not change which instances are kept
    materialize: str | None = option(
        None, "also write the kept instances as a new token store in this directory", metavar="DIR", effect=Effect.NONE
    )
    tokenizer: str | None = option(None, "tokenizer spec for --materialize (e.g. another family's)", effect=Effect.NONE)
    materialize_max_len: int | None = option(
        None,
        "re-cut the materialised store into instances of ≤ N+1 tokens (default: one per kept instance)",
        interval="[8, inf)",
        effect=Effect.NONE,
    )
    # --method proxy: --teacher-model, --proxy-fraction, … (in the identity only for that method)
    proxy: ProxyConfig = option(default_factory=ProxyConfig, effect=Effect.NONE)
    progress: bool = option(
        True, "progress bars (--no-progress: none)", flag="--no-progress", action="store_false", effect=Effect.NONE
    )

    def proxy_config(self) -> ProxyConfig:
        """The proxy's settings; its seed and progress are the command's own."""
        return dataclasses.replace(self.proxy, seed=self.seed, progress=self.progress)

    def identity(self) -> dict:
        """The fields that define the selection (what a rerun must match to be a no-op); the proxy's
        settings only when the method is the proxy."""
        return identity(self) | {"proxy": identity(self.proxy_config()) if self.method == "proxy" else None}


def _looks_swapped(teacher: np.ndarray, reference: np.ndarray) -> str | None:
    """A teacher that predicts most instances worse than the small reference is almost always a
    swapped pair of tables (MiniPLM's teacher is the larger, better model)."""
    ok = np.isfinite(teacher) & np.isfinite(reference)
    if ok.sum() < 10:
        return None
    worse = float((teacher[ok] < reference[ok]).mean())
    if worse <= 0.5:
        return None
    return (
        f"the reference scores higher than the teacher on {worse:.0%} of instances: are --teacher and "
        "--reference swapped? (Difference Sampling keeps what the teacher predicts better)"
    )


def domain_keep_rates(store: TokenStore, selection: np.ndarray) -> dict[str, dict]:
    kept = np.zeros(len(store), dtype=bool)
    kept[selection] = True
    lengths = store.lengths
    rates = {}
    for d, name in enumerate(store.domain_names):
        in_domain = store.domain_ids == d
        n, k = int(in_domain.sum()), int((in_domain & kept).sum())
        tokens, kept_tokens = int(lengths[in_domain].sum()), int(lengths[in_domain & kept].sum())
        rates[name] = {
            "n_instances": n,
            "n_kept": k,
            "keep_rate": k / n if n else 0.0,
            "n_tokens": tokens,
            "n_tokens_kept": kept_tokens,
            "token_keep_rate": kept_tokens / tokens if tokens else 0.0,
        }
    return rates


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def _histogram(path: Path, values: np.ndarray, kept_mask: np.ndarray, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = np.isfinite(values)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = np.histogram_bin_edges(values[ok], bins=40).tolist() if ok.any() else 10  # hist types bins a Sequence
    ax.hist(values[ok & ~kept_mask], bins=bins, alpha=0.6, label="dropped", color="tab:gray")
    ax.hist(values[ok & kept_mask], bins=bins, alpha=0.6, label="kept", color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("instances")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _excerpt(store: TokenStore, i: int) -> str:
    text = store.decode(int(i))
    text = text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + " …"
    return text.replace("```", "ʼʼʼ")


def _examples(store, ids, teacher, reference, score, kept_mask, label_fn=None) -> list[str]:
    lines = []
    for i in ids:
        i = int(i)
        label = f" — {label_fn(i)}" if label_fn else ""
        lines.append(
            f"- **#{i}** ({store.domain_names[store.domain_ids[i]]}, {'kept' if kept_mask[i] else 'dropped'}"
            f"): log p_T {_fmt(teacher[i])}, log p_ref {_fmt(reference[i])}, score {_fmt(score[i])}{label}\n\n"
            f"  ```text\n  {_excerpt(store, i).replace(chr(10), chr(10) + '  ')}\n  ```"
        )
    return lines


def write_report(
    out: Path,
    cfg: SampleConfig,
    store: TokenStore,
    selection: np.ndarray,
    score: np.ndarray,
    teacher: np.ndarray,
    reference: np.ndarray,
    rates: dict,
    extra: dict,
) -> None:
    """report.md + histograms: what a user reads before trusting a selection."""
    n = len(store)
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[selection] = True
    method = METHODS[cfg.method]
    score_name = method.score_name + (" (negated)" if method.keeps_either_end and cfg.keep == "high-loss" else "")
    lines = [
        f"# Selection report: `{cfg.method}`, ratio {cfg.ratio}"
        + (", per domain" if cfg.per_domain else "")
        + (", complement" if cfg.complement else ""),
        "",
        f"- token store: `{store.dir}` ({store.hash[:12]}), {n} instances, {int(store.lengths.sum())} tokens",
        f"- kept: {len(selection)} instances ({len(selection) / max(n, 1):.1%}), "
        f"{int(store.lengths[selection].sum())} tokens ({store.lengths[selection].sum() / max(store.lengths.sum(), 1):.1%})",
    ]
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Score distributions", ""]
    panels = [
        ("teacher", teacher, "mean token log p under the teacher"),
        ("reference", reference, "mean token log p under the reference"),
        (
            "difference",
            teacher - reference if cfg.method != "proxy" else score,
            "log p_T − log p_ref" + (" (proxy prediction)" if cfg.method == "proxy" else ""),
        ),
    ]
    for name, values, xlabel in panels:
        if np.isfinite(values).any():
            _histogram(
                out / f"{name}_hist.png", values, kept_mask, f"{name} ({np.isfinite(values).sum()} instances)", xlabel
            )
            lines.append(f"![{name}]({name}_hist.png)")
    lines += [
        "",
        "## Kept fraction per domain",
        "",
        "| domain | instances | kept | keep rate | token keep rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rates.items():
        lines.append(
            f"| {name} | {r['n_instances']} | {r['n_kept']} | {r['keep_rate']:.1%} | {r['token_keep_rate']:.1%} |"
        )
    k = max(cfg.n_examples, 0)
    ok = np.flatnonzero(np.isfinite(score))
    by_score = ok[np.lexsort((ok, -score[ok]))]
    median_t = float(np.nanmedian(teacher)) if np.isfinite(teacher).any() else np.nan

    def kind(i: int) -> str:
        # MiniPLM's picture: high difference = hard and valuable; low difference = easy (both models
        # predict it well) or noisy (hard for the teacher too)
        if not method.difference:
            return ""
        if kept_mask[i]:
            return "hard and valuable (the teacher predicts it far better than the reference)"
        if not np.isfinite(teacher[i]):
            return "low difference"
        return "easy (both models predict it)" if teacher[i] >= median_t else "noisy (hard for the teacher too)"

    rng = np.random.default_rng(cfg.seed)
    random_ids: np.ndarray | list[int] = np.sort(rng.choice(n, size=min(k, n), replace=False)) if n else []
    lines += ["", f"## Top {k} by {score_name}", ""] + _examples(
        store, by_score[:k], teacher, reference, score, kept_mask, kind
    )
    lines += ["", f"## Bottom {k} by {score_name}", ""] + _examples(
        store, by_score[::-1][:k], teacher, reference, score, kept_mask, kind
    )
    lines += ["", f"## {k} random instances", ""] + _examples(
        store, random_ids, teacher, reference, score, kept_mask, kind
    )
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# cross-family materialisation
# ------------------------------------------------------------------------------------------------


@dataclass
class MaterializeConfig:
    selection: str = ""
    tokenizer: str = ""
    out: str = ""
    max_len: int | None = None  # re-cut into instances of ≤ max_len+1 tokens, as prepare does


def materialize(cfg: MaterializeConfig, store: TokenStore, output: Output, progress: bool = True) -> Path:
    """Write the selected instances of `store` as a new token store tokenised with `cfg.tokenizer`
    (staged by `output`, which the caller has judged)."""
    store.refuse_if_masked("materialising a selection of it")
    selection_dir = Path(cfg.selection)
    selection = load_selection(selection_dir, store)
    selection_manifest = read_selection_manifest(selection_dir)
    if cfg.max_len is not None and cfg.max_len < 8:
        raise PredistillError(f"--materialize-max-len {cfg.max_len} is too small (need ≥ 8)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    tok_info = {
        "spec": cfg.tokenizer,
        "hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }
    source = {
        "store_hash": store.hash,
        "store_dir": str(store.dir.resolve()),
        "selection_hash": selection_manifest["selection_sha256"],
        "selection_dir": str(selection_dir.resolve()),
        "method": selection_manifest["config"]["method"],
        "ratio": selection_manifest["config"]["ratio"],
    }
    config = asdict(cfg)
    with output.staged() as tmp:
        # the held-out split first: the top-level manifest (complete) is written last
        if (store.dir / "val").is_dir():
            val = TokenStore(store.dir / "val")
            write_retokenized(
                val,
                np.arange(len(val)),
                tmp / "val",
                tokenizer,
                tok_info,
                split="val",
                config=config,
                extra={"source": source | {"split": "val"}},
                max_len=cfg.max_len,
                progress=progress,
            )
        write_retokenized(
            store,
            selection,
            tmp,
            tokenizer,
            tok_info,
            split="train",
            config=config,
            extra={"source": source | {"split": "train"}},
            max_len=cfg.max_len,
            progress=progress,
        )
    return Path(cfg.out)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def _load_table(path: str | None) -> ScoreTable | None:
    return None if path is None else ScoreTable(path)


def run(cfg: SampleConfig) -> Path:
    out = Path(cfg.out)
    if cfg.method not in METHODS:
        raise PredistillError(f"unknown --method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if not 0 < cfg.ratio <= 1:
        raise PredistillError(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if cfg.keep not in KEEP_ENDS:
        raise PredistillError(f"--keep must be one of {', '.join(KEEP_ENDS)}, got {cfg.keep!r}")
    if (cfg.materialize is None) != (cfg.tokenizer is None):
        raise PredistillError("--materialize DIR and --tokenizer T go together")
    if cfg.materialize_max_len is not None and cfg.materialize_max_len < 8:
        # checked before anything is written: a refused materialisation leaves no selection behind
        raise PredistillError(f"--materialize-max-len {cfg.materialize_max_len} is too small (need ≥ 8)")
    if cfg.n_examples < 0:
        raise PredistillError(f"--examples must be ≥ 0, got {cfg.n_examples}")
    method = METHODS[cfg.method]
    needs = method.tables
    if needs and any(getattr(cfg, role) is None for role in needs):
        raise PredistillError(
            f"--method {cfg.method} needs "
            + " and ".join(f"--{r}" for r in needs)
            + (" score tables" if len(needs) > 1 else " score table")
        )
    if cfg.method != "proxy" and (cfg.proxy.teacher_model or cfg.proxy.reference_model):
        raise PredistillError(
            "--teacher-model/--reference-model are for --method proxy; other methods read score tables"
        )

    teacher_table = _load_table(cfg.teacher)
    reference_table = _load_table(cfg.reference)
    if teacher_table and reference_table and teacher_table.store_hash != reference_table.store_hash:
        raise PredistillError(
            f"score tables from different token stores: teacher {cfg.teacher} is "
            f"{teacher_table.store_hash[:12]}, reference {cfg.reference} is {reference_table.store_hash[:12]}"
        )
    store_dir = cfg.store or next((t.manifest["store_dir"] for t in (teacher_table, reference_table) if t), None)
    if store_dir is None:
        raise PredistillError(f"--method {cfg.method} needs --store (no score table names one)")
    store = TokenStore(store_dir)
    if cfg.materialize:  # refused before the selection is made, not after
        store.refuse_if_masked("materialising a selection of it")
    for table in (teacher_table, reference_table):
        if table is not None:
            table.check_store(store)
    n = len(store)
    if n == 0:
        raise PredistillError(f"{store.dir}: the token store is empty")
    nan = np.full(n, np.nan, dtype=np.float32)
    teacher = teacher_table.logprob if teacher_table else nan
    reference = reference_table.logprob if reference_table else nan
    inputs = {
        "store_hash": store.hash,
        "store_dir": str(store.dir.resolve()),
        "teacher_table": teacher_table
        and {
            "hash": teacher_table.hash,
            "model": teacher_table.model_spec,
            "model_hash": teacher_table.manifest["model"]["hash"],
        },
        "reference_table": reference_table
        and {
            "hash": reference_table.hash,
            "model": reference_table.model_spec,
            "model_hash": reference_table.manifest["model"]["hash"],
        },
    }
    config = cfg.identity()

    output = Output(out, FORMAT, "selection", {"config": config, "inputs": inputs})
    if output.complete():
        _maybe_materialize(cfg, out, store)
        return out

    extra: dict = {}
    proxy_stats = None
    proxy_result = None
    if method.score is None:  # the proxy
        full = difference_scores(teacher, reference) if teacher_table and reference_table else None
        proxy_result = run_proxy(cfg.proxy_config(), store, cfg.ratio, full)
        score = proxy_result.predicted
        proxy_stats = proxy_result.stats
        if not teacher_table:  # show the subset's true scores in the report's histograms
            teacher = nan.copy()
            teacher[proxy_result.train_ids] = proxy_result.train_teacher
        if not reference_table:
            reference = nan.copy()
            reference[proxy_result.train_ids] = proxy_result.train_reference
        s = proxy_stats
        extra = {
            "proxy subset": f"{s['n_train']} instances scored by teacher and reference",
            "agreement checked on": s["check_on"],
            "Spearman(proxy, true difference)": f"{s['spearman']:.3f}",
            "selection overlap with full Difference Sampling": f"{s['selection_overlap']:.1%} "
            f"(random selection: {cfg.ratio:.0%} expected)",
            "FLOPs spent": f"{s['flops_spent']:.3g} vs {s['flops_full_scoring']:.3g} for full scoring "
            f"({s['flops_ratio_full_over_spent']:.1f}× less; teacher alone "
            f"{s['teacher_flops_ratio_full_over_spent']:.1f}× less)",
            "proxy training MSE by epoch (standardised)": ", ".join(f"{x:.3f}" for x in s["epoch_mse"]),
        }
    else:
        score = method.score(n, teacher, reference, cfg.keep, cfg.seed)
        if method.difference and (swapped := _looks_swapped(teacher, reference)):
            print(f"predistill sample: warning: {swapped}", file=sys.stderr)
            extra["warning"] = swapped
        if method.tables:
            unscored = int(np.isnan(score).sum())
            if unscored:
                extra["instances without a predicted token (ranked last)"] = unscored
    if cfg.per_domain:
        ids = [np.flatnonzero(np.asarray(store.domain_ids) == d) for d in range(len(store.domain_names))]
        selection = np.sort(np.concatenate([members[top_fraction(score[members], cfg.ratio)] for members in ids]))
    else:
        selection = top_fraction(score, cfg.ratio)
    if cfg.complement:
        selection = np.setdiff1d(np.arange(n), selection)
        if len(selection) == 0:
            raise PredistillError(f"--complement of --ratio {cfg.ratio} keeps no instance")
    rates = domain_keep_rates(store, selection)

    with output.staged() as tmp:
        np.save(tmp / IDS_FILE, selection, allow_pickle=False)
        np.save(tmp / "scores.npy", np.asarray(score, dtype=np.float32), allow_pickle=False)
        if proxy_result is not None:
            rows = np.zeros(
                len(proxy_result.train_ids), dtype=[("id", "<i8"), ("teacher", "<f4"), ("reference", "<f4")]
            )
            rows["id"], rows["teacher"], rows["reference"] = (
                proxy_result.train_ids,
                proxy_result.train_teacher,
                proxy_result.train_reference,
            )
            np.save(tmp / "proxy_subset.npy", rows, allow_pickle=False)
        write_report(tmp, cfg, store, selection, score, teacher, reference, rates, extra)
        write_manifest(
            tmp,
            {
                "format": FORMAT,
                "version": VERSION,
                "config": config,
                "inputs": inputs,
                "store_hash": store.hash,
                "method": cfg.method,
                "ratio": cfg.ratio,
                "n_instances": n,
                "n_selected": int(len(selection)),
                "n_tokens": int(store.lengths.sum()),
                "n_tokens_selected": int(store.lengths[selection].sum()),
                "domains": rates,
                "selection_sha256": sha256_file(tmp / IDS_FILE),
                "proxy": proxy_stats,
            },
        )
    _maybe_materialize(cfg, out, store)
    return out


def _maybe_materialize(cfg: SampleConfig, out: Path, store: TokenStore) -> None:
    if cfg.materialize is None:
        return
    assert cfg.tokenizer is not None  # run() refuses --materialize without --tokenizer
    mcfg = MaterializeConfig(
        selection=str(out), tokenizer=cfg.tokenizer, out=cfg.materialize, max_len=cfg.materialize_max_len
    )
    target = Path(cfg.materialize)
    wanted = {"config": asdict(mcfg), "selection_hash": read_selection_manifest(out)["selection_sha256"]}
    output = Output(target, STORE_FORMAT, "token store", wanted, located=IDENTITY_AT)
    if output.complete():
        return
    materialize(mcfg, store, output, progress=cfg.progress)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, SampleConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(SampleConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    m = read_manifest(out, FORMAT)
    print(
        f"predistill: wrote {out}: kept {m['n_selected']} of {m['n_instances']} instances "
        f"({m['n_tokens_selected']} of {m['n_tokens']} tokens) by {m['method']}; report in {out / 'report.md'}"
        + (f"; materialised store in {cfg.materialize}" if cfg.materialize else "")
    )
