"""Every artifact kind's reader, fed a manifest mutated at random (a key deleted, a value of another
type, a huge number, a deep nesting): one line and exit 1, or — when the mutation touches nothing
the reader relies on — a clean pass; never a traceback, never a write."""

import copy
import json
import random
import shutil

import pytest
from test_logits import make_store, write_store
from test_scores import make_table
from test_selection import make_selection

from predistill import cli
from predistill.formats.store import TokenStore
from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train

N_MUTATIONS = 40


DEEP = "__nested_100000_deep__"  # written as text: the encoder itself cannot nest that deep


REPLACEMENTS = [None, True, -1, 0, 10**30, 1e308, float("nan"), "x", "", [], {}, [1, "a"], {"a": 1}]


def mutate(manifest: dict, rng: random.Random) -> dict:
    """One random edit of the manifest or of a value nested in it."""
    m = copy.deepcopy(manifest)
    paths = [(k,) for k in m] + [(k, j) for k, v in m.items() if isinstance(v, dict) for j in v]
    path = rng.choice(paths)
    node = m
    for key in path[:-1]:
        node = node[key]
    action = rng.random()
    if action < 0.25 and path != ("complete",):
        del node[path[-1]]
    elif action < 0.35:
        node[path[-1]] = DEEP
    else:
        node[path[-1]] = rng.choice(REPLACEMENTS)
    return m


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_store):
    root = tmp_path_factory.mktemp("fuzz")
    store = TokenStore(tiny_store)
    logits_store = make_store(root / "lstore", seed=0)
    from predistill.formats.logits import LogitsConfig

    write_store(root / "logits", logits_store, LogitsConfig(mode="sample", samples=4, shard_instances=4))
    return {
        "token store": tiny_store,
        "score table": make_table(root / "scores"),
        "selection": make_selection(root / "selection", [0, 2, 5], store),
        "logits store": root / "logits",
        "run": train(TrainConfig(store=str(tiny_store), out=str(root / "run"), steps=2, batch_size=2, seq_len=16)),
    }


@pytest.mark.parametrize("kind", ["token store", "score table", "selection", "logits store", "run"])
def test_a_randomly_mutated_manifest_is_one_line_or_harmless(artifacts, kind, tmp_path, capsys):
    rng = random.Random(kind)
    original = json.loads((artifacts[kind] / "manifest.json").read_text())
    work = tmp_path / "a"
    outcomes = []
    for _ in range(N_MUTATIONS):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(artifacts[kind], work)
        mutated = mutate(original, rng)
        (work / "manifest.json").write_text(json.dumps(mutated).replace(f'"{DEEP}"', "[" * 100_000 + "]" * 100_000))
        before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
        try:
            cli.main(["verify", str(work)])
            outcomes.append("pass")
        except SystemExit as e:
            err = capsys.readouterr().err.strip()
            assert e.code == 1 and err.count("\n") == 0 and err.startswith("predistill verify: error:"), (mutated, err)
            outcomes.append("refused")
        assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == before  # nothing written
    assert outcomes.count("refused") >= N_MUTATIONS // 4, outcomes  # the readers do look at their manifests
