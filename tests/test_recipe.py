"""`predistill run`: recipes as DAGs, cached by hash; editing one stage reruns only its dependants."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from predistill.core.artifacts import PredistillError
from predistill.stages.recipe import RECIPES_DIR, execute, is_cached, load_recipe, plan, record_path, stage_argv


def write_recipe(path: Path, corpus: dict, *, vocab: int = 300, steps: int = 2, code_max_len: int = 48) -> Path:
    path.write_text(f"""
[recipe]
name = "t"

[[stage]]
name = "tok"
command = "tokenizer"
args = {{ source = ["jsonl:{corpus['prose']}"], vocab_size = {vocab}, out = "{{self}}" }}

[[stage]]
name = "prose"
command = "prepare"
args = {{ source = ["jsonl:{corpus['prose']}"], tokenizer = "{{tok}}", max_len = 32, out = "{{self}}" }}

[[stage]]
name = "code"
command = "prepare"
args = {{ source = ["jsonl:{corpus['code']}"], tokenizer = "{{tok}}", max_len = {code_max_len}, out = "{{self}}" }}

[[stage]]
name = "lm"
command = "train"
args = {{ store = "{{prose}}", out = "{{self}}", steps = {steps}, batch_size = 2, seq_len = 32 }}
""")
    return path


def ran_stages(recipe) -> list[str]:
    return [s.name for s, run_it in plan(recipe) if run_it]


def test_editing_a_stage_reruns_only_it_and_its_dependants(corpus, tmp_path):
    root = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", corpus), root)
    assert [s.name for s in recipe.stages] == ["tok", "prose", "code", "lm"]
    assert execute(recipe) == ["tok", "prose", "code", "lm"]
    assert json.loads((root / "lm" / "manifest.json").read_text())["steps"] == 2
    assert execute(load_recipe(tmp_path / "r.toml", root)) == []  # everything cached

    edited = load_recipe(write_recipe(tmp_path / "r.toml", corpus, steps=3), root)
    assert ran_stages(edited) == ["lm"]
    assert execute(edited) == ["lm"]
    assert json.loads((root / "lm" / "manifest.json").read_text())["steps"] == 3

    edited = load_recipe(write_recipe(tmp_path / "r.toml", corpus, steps=3, code_max_len=40), root)
    assert ran_stages(edited) == ["code"]

    edited = load_recipe(write_recipe(tmp_path / "r.toml", corpus, vocab=280, steps=3, code_max_len=40), root)
    assert ran_stages(edited) == ["tok", "prose", "code", "lm"]


def test_dry_run_prints_the_plan_and_runs_nothing(corpus, tmp_path, capsys):
    root = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", corpus), root)
    execute(recipe, dry_run=True)
    printed = capsys.readouterr().out
    assert "[run   ] lm: predistill train --store" in printed and str(root / "prose") in printed
    assert not root.exists()


def test_references_become_paths_lists_repeat_flags_and_positionals(tmp_path):
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text("""
[[stage]]
name = "a"
command = "prepare"
args = { source = ["txt:x", "txt:y"], tokenizer = "t", out = "{self}", skip_bad = true, workers = 2 }
[[stage]]
name = "b"
command = "report"
args = { _ = ["{a}", "{a}/val"], out = "{self}" }
""")
    recipe = load_recipe(recipe_file, tmp_path / "root")
    a, b = recipe.stages
    assert stage_argv(recipe, a) == [
        "prepare",
        "--source",
        "txt:x",
        "--source",
        "txt:y",
        "--tokenizer",
        "t",
        "--out",
        str(tmp_path / "root" / "a"),
        "--skip-bad",
        "--workers",
        "2",
    ]
    assert stage_argv(recipe, b) == [
        "report",
        str(tmp_path / "root" / "a"),
        str(tmp_path / "root" / "a" / "val"),
        "--out",
        str(tmp_path / "root" / "b"),
    ]
    assert b.deps == ["a"]


def test_a_matrix_stage_is_a_sweep_and_references_to_it_resolve_by_shared_values(tmp_path):
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text("""
[[stage]]
name = "data"
command = "prepare"
args = { source = ["txt:x"], tokenizer = "t", out = "{self}" }
[[stage]]
name = "lm"
command = "train"
matrix = { size = ["tiny", "mini"], seed = [1, 2] }
args = { model = "preset:{size}", store = "{data}", out = "{self}", seed = "{seed}", lr = 0.003 }
[[stage]]
name = "ev"
command = "eval"
matrix = { seed = [2], size = ["mini"] }
args = { model = "{lm}", store = "{data}/val", out = "{lm}/eval.json" }
[[stage]]
name = "rep"
command = "report"
args = { _ = ["{lm}"], out = "{self}" }
""")
    root = tmp_path / "root"
    recipe = load_recipe(recipe_file, root)
    names = [s.name for s in recipe.stages]
    assert names == [
        "data",
        "lm-sizetiny-seed1",
        "lm-sizetiny-seed2",
        "lm-sizemini-seed1",
        "lm-sizemini-seed2",
        "ev-seed2-sizemini",
        "rep",
    ]
    stages = {s.name: s for s in recipe.stages}
    assert stage_argv(recipe, stages["lm-sizemini-seed1"]) == [
        "train",
        "--model",
        "preset:mini",
        "--store",
        str(root / "data"),
        "--out",
        str(root / "lm-sizemini-seed1"),
        "--seed",
        "1",
        "--lr",
        "0.003",
    ]
    assert stages["ev-seed2-sizemini"].deps == ["data", "lm-sizemini-seed2"]  # its own instance, not all four
    assert stage_argv(recipe, stages["rep"])[1:5] == [str(root / n) for n in names[1:5]]  # a list: every instance
    assert len({s.hash for s in recipe.stages}) == len(names)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            '[[stage]]\nname = "a"\ncommand = "prepare"\nmatrix = { seed = [1, 2] }\n'
            '[[stage]]\nname = "b"\ncommand = "report"\nargs = { out = "{a}" }\n',
            "names 2 instances of a matrix stage",
        ),
        (
            '[[stage]]\nname = "a"\ncommand = "prepare"\nmatrix = { seed = [1, 2] }\n'
            '[[stage]]\nname = "b"\ncommand = "report"\nmatrix = { seed = [3] }\nargs = { out = "{a}" }\n',
            "no instance of matrix stage 'a'",
        ),
        ('[[stage]]\nname = "a"\ncommand = "prepare"\nmatrix = { seed = [] }\n', "non-empty list"),
        ('[[stage]]\nname = "a"\ncommand = "prepare"\nmatrix = { seed = [1, 1] }\n', "repeats a value"),
        ('[[stage]]\nname = "a"\ncommand = "prepare"\nmatrix = { seed = ["x/y"] }\n', "must be a number or a string"),
        (
            '[[stage]]\nname = "seed"\ncommand = "prepare"\n[[stage]]\nname = "a"\ncommand = "prepare"\n'
            'matrix = { seed = [1] }\n',
            "is also a stage's name",
        ),
        (
            '[[stage]]\nname = "a-seed1"\ncommand = "prepare"\n[[stage]]\nname = "a"\ncommand = "prepare"\n'
            'matrix = { seed = [1] }\n',
            "used twice",
        ),
    ],
)
def test_bad_matrices_are_refused_with_a_clear_message(tmp_path, body, message):
    (tmp_path / "r.toml").write_text(body)
    with pytest.raises(PredistillError, match=re.escape(message)):
        load_recipe(tmp_path / "r.toml")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[stage]]\nname = "a"\ncommand = "prepare"\nargs = { out = "{nope}" }\n', "unknown stage '{nope}'"),
        ('[[stage]]\nname = "a"\ncommand = "fly"\n', "unknown command 'fly'"),
        (
            '[[stage]]\nname = "a"\ncommand = "prepare"\nargs = { x = "{b}" }\n'
            '[[stage]]\nname = "b"\ncommand = "prepare"\nargs = { x = "{a}" }\n',
            "stages form a cycle: a → b → a",
        ),
        ('[recipe]\nname = "empty"\n', "no [[stage]]"),
        ('[recipe]\nroot = 5\n[[stage]]\nname = "a"\ncommand = "prepare"\n', "root must be a non-empty string"),
        ('recipe = 3\n[[stage]]\nname = "a"\ncommand = "prepare"\n', "`recipe` must be a table"),
        ('[[stage]]\nname = "a"\ncommand = ["train"]\n', "name and command must be strings"),
        ("x = " + "9" * 5000 + "\n", "unreadable recipe"),
        ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", "unreadable recipe|invalid TOML"),
        ('[[stage]]\nname = "a.b"\ncommand = "prepare"\n', "must be letters"),
        ('[[stage]\n', "invalid TOML"),
    ],
)
def test_bad_recipes_are_refused_with_a_clear_message(tmp_path, body, message):
    (tmp_path / "r.toml").write_text(body)
    with pytest.raises(PredistillError, match=message.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")):
        load_recipe(tmp_path / "r.toml")


def test_a_long_chain_of_stages_loads_in_dependency_order(tmp_path):
    # 1 500 stages, each reading the one before: no recursion limit, one linear pass
    body = '[[stage]]\nname = "s0"\ncommand = "prepare"\n' + "".join(
        f'[[stage]]\nname = "s{k}"\ncommand = "prepare"\nargs = {{ x = "{{s{k - 1}}}" }}\n' for k in range(1, 1500)
    )
    (tmp_path / "r.toml").write_text(body)
    assert [s.name for s in load_recipe(tmp_path / "r.toml").stages] == [f"s{k}" for k in range(1500)]


def test_a_failing_stage_stops_the_run_and_is_not_recorded(corpus, tmp_path):
    (tmp_path / "r.toml").write_text(f"""
[[stage]]
name = "bad"
command = "prepare"
args = {{ source = ["jsonl:{corpus['prose']}"], tokenizer = "/no/such/tokenizer", out = "{{self}}" }}
""")
    recipe = load_recipe(tmp_path / "r.toml", tmp_path / "root")
    with pytest.raises(PredistillError, match="stage 'bad' failed"):
        execute(recipe)
    record = json.loads((tmp_path / "root" / ".predistill-run" / "bad.json").read_text())
    assert record["complete"] is False and not is_cached(recipe, recipe.stages[0])


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES_DIR.glob("*.toml")))
def test_shipped_recipes_parse_and_dry_run(name, tmp_path, capsys):
    recipe = load_recipe(RECIPES_DIR / name, tmp_path / "root")
    execute(recipe, dry_run=True)
    assert capsys.readouterr().out.count("[run   ]") == len(recipe.stages)


def test_a_dry_run_parses_every_stage_as_its_command_would(tmp_path):
    (tmp_path / "r.toml").write_text(
        '[[stage]]\nname = "lm"\ncommand = "train"\nargs = { store = "s", out = "{self}", stepz = 3 }\n'
    )
    with pytest.raises(PredistillError, match="stage 'lm': .*unrecognized arguments: --stepz 3"):
        execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), dry_run=True)
    (tmp_path / "r.toml").write_text(
        '[[stage]]\nname = "lm"\ncommand = "train"\nargs = { store = "s", out = "{self}", steps = "many" }\n'
    )
    with pytest.raises(PredistillError, match="stage 'lm': .*invalid int value: 'many'"):
        execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), dry_run=True)
    (tmp_path / "r.toml").write_text('[[stage]]\nname = "lm"\ncommand = "eval"\nargs = { out = "{self}/e.json" }\n')
    with pytest.raises(PredistillError, match="stage 'lm': the following arguments are required: --model"):
        execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), dry_run=True)
    # combinations the command refuses (its config's `check`) are refused by the dry run too
    for args, refusal in (
        (
            'minillm = true, kd_teacher = "t", kd_loss = "rkl", alpha = 0.5, fsdp = true',
            "--minillm samples from the whole student",
        ),
        ('minillm = true, kd_teacher = "t", kd_loss = "kld", alpha = 0.5', "reverse KL"),
        ('epochs = 1, flops_budget = 1e9', "not both"),
        ('kd_logits = "x", alpha = 0.5, temperature = "-1"', "temperature"),
    ):
        (tmp_path / "r.toml").write_text(
            f'[[stage]]\nname = "lm"\ncommand = "train"\nargs = {{ store = "s", out = "{{self}}", {args} }}\n'
        )
        with pytest.raises(PredistillError, match=f"stage 'lm': .*{refusal}"):
            execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), dry_run=True)


def covered_stage_patterns(recipe_file: Path) -> list[str]:
    """The stage names a paper recipe's header says it covers: `name`, `prefix_*`, `a_{x,y}_b`."""
    header = recipe_file.read_text().split("[recipe]")[0]
    covers = header[header.index("# Covers") : header.index("# Leaves out")]
    patterns = []
    for token in re.findall(r"(?:[a-z0-9_*]|\{[a-z0-9_,]+\})+", covers):
        if "_" not in token or token.startswith("_") or token[0].isdigit():
            continue  # prose, numbers
        match = re.search(r"\{([a-z0-9_,]+)\}", token)
        options = match.group(1).split(",") if match else [""]
        patterns += [token.replace(match.group(0), o) if match else token for o in options]
    return patterns


@pytest.mark.parametrize(
    "name, must_have",
    [
        (
            "miniplm-paper.toml",
            {
                "lm_200m",
                "lm_500m",
                "lm_1_2b",
                "miniplm_vanilla_kd_1_2b",
                "miniplm_prx_200m",
                "miniplm_llama_212m",
                "miniplm_mamba_130m",
                "miniplm_200m_ratio-ratio0p3",
                "lm_200m_limited",
                "diversity_seqkd",
            },
        ),
        ("pd-paper.toml", {"lm_330m", "pd_6_8b", "pd_6_8b_t32", "pd_3_8b_500b", "eval_pd_3_8b_500b", "pd_online_1_9b"}),
    ],
)
def test_paper_recipes_cover_what_their_headers_list(name, must_have):
    recipe = load_recipe(RECIPES_DIR / name, Path("/tmp/root"))
    names = [st.name for st in recipe.stages]
    assert must_have <= set(names)
    patterns = covered_stage_patterns(RECIPES_DIR / name)
    assert len(patterns) >= 10
    for pattern in patterns:  # every stage the header names exists (a matrix stage by its instances)
        assert any(fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, pattern + "-*") for n in names), pattern
    argv = {st.name: stage_argv(recipe, st) for st in recipe.stages}
    if name == "miniplm-paper.toml":
        assert "--epochs" in argv["lm_200m_limited"] and "--epochs" in argv["miniplm_200m_limited"]
        assert (
            argv["miniplm_mamba_130m"][argv["miniplm_mamba_130m"].index("--model") + 1] == "preset:miniplm-mamba-130m"
        )
        store = argv["miniplm_llama_212m"][argv["miniplm_llama_212m"].index("--store") + 1]
        assert store.endswith("selection_llama/store")  # the refined corpus in the student's own tokenizer
        assert "--tokenizer" in argv["selection_llama"] and "--materialize" in argv["selection_llama"]
        assert {flag(argv[n], "--ratio") for n in argv if n.startswith("selection_ratio-")} == {
            "0.3",
            "0.4",
            "0.6",
            "0.7",
            "0.9",
        }  # Fig. 9's grid, 0.5 being the main selection
        assert flag(argv["selection_prx"], "--proxy-fraction") == "0.045"
    else:
        assert "--exports" in argv["eval_pd_3_8b_500b"] and "--export-every" in argv["pd_3_8b_500b"]
        assert "--save-logits" in argv["teacher_online"]
        # what the header says, setting by setting: §3.1's setup (Table 1), PD*, the α grid, the online store
        assert (flag(argv["teacher_k100"], "--top-p"), flag(argv["teacher_k100"], "--top-k")) == ("0.95", "100")
        assert (flag(argv["teacher"], "--top-p"), flag(argv["teacher"], "--top-k")) == ("0.95", "50")
        prelim = {
            "--kd-loss": "nll",
            "--temperature": "1.0",
            "--alpha": "1.0",
            "--lr-schedule": "cosine",
            "--batch-size": "2048",
            "--steps": "11920",
            "--warmup": "119",
            "--min-lr-ratio": "0.1",
        }
        assert {k: flag(argv["pd_prelim_1_9b"], k) for k in prelim} == prelim
        assert "--kd-logits" not in argv["lm_prelim_1_9b"] and flag(argv["lm_prelim_1_9b"], "--lr-schedule") == "cosine"
        pd_star = {
            "--kd-loss": "kld",
            "--temperature": "2.0",
            "--alpha": "0.9",
            "--alpha-schedule": "wsd",
            "--lr-schedule": "wsd",
            "--batch-size": "4096",
            "--steps": "6100",
        }
        assert {k: flag(argv["pd_1_9b"], k) for k in pd_star} == pd_star
        assert sorted(flag(argv[n], "--alpha") for n in argv if n.startswith("pd_alpha_1_9b-")) == [
            "0.1",
            "0.5",
            "0.6",
            "0.7",
            "0.8",
            "0.9",
            "0.95",
        ]  # Table 4 (1.0 = pd_prelim_1_9b)
        assert {flag(argv[n], "--alpha-schedule") for n in argv if n.startswith("pd_sched_1_9b-")} == {
            "linear-inc",
            "linear-dec",
            "period",
        }
        assert (
            flag(argv["pd_wsdbeta_wsd_1_9b"], "--alpha-schedule"),
            flag(argv["pd_wsdalpha_cos_1_9b"], "--lr-schedule"),
        ) == ("wsd-beta", "cosine")
        assert (
            flag(argv["teacher_online"], "--save-logits-top-k") == "50"
            and flag(argv["pd_online_1_9b"], "--alpha") == "0.1"
        )
        sft = {
            "--batch-size": "256",
            "--lr": "4e-05",
            "--min-lr-ratio": "0.1",
            "--lr-schedule": "cosine",
            "--warmup": "191",
            "--steps": "19073",
        }  # §A.1, and Table 1's models fine-tuned before evaluation
        for kind in ("lm", "pd"):
            assert {k: flag(argv[f"sft_{kind}_prelim_1_9b"], k) for k in sft} == sft
            assert flag(argv[f"sft_{kind}_prelim_1_9b"], "--model").endswith(f"{kind}_prelim_1_9b")
            assert flag(argv[f"sft_{kind}_prelim_1_9b"], "--store").endswith("sft_data")
        for n in (n for n in argv if n.startswith("eval_")):  # the paper's shots per task
            assert [argv[n][i + 1] for i, a in enumerate(argv[n]) if a == "--fewshot"] == [
                "mmlu=6",
                "ceval-valid=5",
                "gsm8k=8",
            ], n


def flag(argv: list[str], name: str) -> str | None:
    """The value a command line gives `name` (None when absent)."""
    return argv[argv.index(name) + 1] if name in argv else None


def test_a_killed_stage_is_resumed_not_wiped_and_a_changed_one_starts_clean(corpus, bpe_tokenizer, tmp_path):
    def recipe_with(max_len):
        (tmp_path / "r.toml").write_text(f"""
[[stage]]
name = "corpus"
command = "prepare"
args = {{ source = ["jsonl:{corpus['prose']}"], tokenizer = "{bpe_tokenizer}", out = "{{self}}/store", max_len = {max_len} }}
""")
        return load_recipe(tmp_path / "r.toml", tmp_path / "root")

    recipe = recipe_with(64)
    stage = recipe.stages[0]
    # what a SIGKILL mid-stage leaves: the record written at start, the stage's partial work
    work = tmp_path / "root" / "corpus" / "partial-work"
    work.parent.mkdir(parents=True)
    work.write_text("finished shards")
    record_path(recipe, stage).parent.mkdir(parents=True)
    record_path(recipe, stage).write_text(json.dumps({"hash": stage.hash, "complete": False}))
    assert plan(recipe) == [(stage, True)]
    execute(recipe)
    assert work.is_file()  # resumed in place
    assert json.loads(record_path(recipe, stage).read_text())["complete"] is True
    assert plan(recipe) == [(stage, False)]

    changed = recipe_with(32)  # other inputs: the old directory is not this stage's work any more
    execute(changed)
    assert not work.exists()


def train_recipe(path: Path, corpus, bpe_tokenizer, nproc: int | None = None, steps: int = 120) -> Path:
    path.write_text(
        f"""
[[stage]]
name = "corpus"
command = "prepare"
args = {{ source = ["jsonl:{corpus['prose']}"], tokenizer = "{bpe_tokenizer}", out = "{{self}}", max_len = 32 }}

[[stage]]
name = "lm"
command = "train"
args = {{ store = "{{corpus}}", out = "{{self}}", model = "preset:tiny", steps = {steps}, batch_size = 8, seq_len = 32, save_every = 3, eval_instances = 8 }}
"""
        + (f"nproc_per_node = {nproc}\n" if nproc else "")
    )
    return path


@pytest.mark.slow  # subprocesses: imports and a 120-step run
def test_a_recipe_killed_inside_training_resumes_and_ends_byte_identical(corpus, bpe_tokenizer, tmp_path):
    recipe = train_recipe(tmp_path / "r.toml", corpus, bpe_tokenizer)
    command = [sys.executable, "-m", "predistill", "run", str(recipe), "--root"]
    subprocess.run([*command, str(tmp_path / "straight")], env=subprocess_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, str(killed)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (killed / "lm" / "checkpoints" / "step-00000003").is_dir():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (killed / "lm" / "manifest.json").exists()

    rerun = subprocess.run([*command, str(killed)], env=subprocess_env(), check=True, capture_output=True, text=True)
    assert "lm: resuming" in rerun.stdout and "corpus: cached" in rerun.stdout
    assert "resuming" in rerun.stdout.split("lm: resuming", 1)[1]  # train itself resumed from a checkpoint
    assert (killed / "lm" / "hf" / "model.safetensors").read_bytes() == (
        tmp_path / "straight" / "lm" / "hf" / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow  # torchrun with two gloo ranks
def test_a_stage_with_nproc_per_node_runs_under_torchrun(corpus, bpe_tokenizer, tmp_path, capsys, monkeypatch):
    recipe = load_recipe(train_recipe(tmp_path / "r.toml", corpus, bpe_tokenizer, nproc=2, steps=4), tmp_path / "root")
    assert [s.nproc_per_node for s in recipe.stages] == [None, 2]
    execute(recipe, dry_run=True)
    assert "torchrun --standalone --nproc-per-node=2 -m predistill train" in capsys.readouterr().out
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    assert execute(recipe) == ["corpus", "lm"]
    manifest = json.loads((tmp_path / "root" / "lm" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["steps"] == 4


@pytest.mark.slow  # subprocesses
def test_a_recipe_killed_inside_scoring_resumes_and_ends_byte_identical(corpus, bpe_tokenizer, tmp_path):
    (tmp_path / "r.toml").write_text(f"""
[[stage]]
name = "corpus"
command = "prepare"
args = {{ source = ["jsonl:{corpus['prose']}", "jsonl:{corpus['code']}"], tokenizer = "{bpe_tokenizer}", out = "{{self}}", max_len = 32 }}

[[stage]]
name = "scores"
command = "score"
args = {{ model = "preset:tiny", store = "{{corpus}}", out = "{{self}}/table", shard_size = 4, batch_size = 2 }}
""")
    command = [sys.executable, "-m", "predistill", "run", str(tmp_path / "r.toml"), "--root"]
    subprocess.run([*command, str(tmp_path / "straight")], env=subprocess_env(), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, str(killed)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not list((killed / "scores" / "table" / "shards").glob("*.done")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (killed / "scores" / "table" / "manifest.json").exists()
    rerun = subprocess.run([*command, str(killed)], env=subprocess_env(), check=True, capture_output=True, text=True)
    assert "scores: resuming" in rerun.stdout and "shards already done" in rerun.stderr
    files = [
        {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "scores" / "table").rglob("*"))
            if p.is_file() and p.name != "manifest.json" and p.name != "plan.json"
        }
        for root in (killed, tmp_path / "straight")
    ]
    assert files[0] == files[1]


@pytest.mark.slow  # a recipe run end to end
def test_verify_checks_a_stages_inputs_before_it_starts(corpus, bpe_tokenizer, tmp_path, capsys):
    body = """
[[stage]]
name = "corpus"
command = "prepare"
args = {{ source = ["jsonl:{prose}"], tokenizer = "{tok}", max_len = 32, out = "{{self}}" }}

[[stage]]
name = "scores"
command = "score"
args = {{ model = "preset:tiny", store = "{{corpus}}", out = "{{self}}", batch_size = {batch} }}
"""
    (tmp_path / "r.toml").write_text(body.format(prose=corpus["prose"], tok=bpe_tokenizer, batch=4))
    execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), verify=True)
    assert "corpus: token_store ok" in capsys.readouterr().out
    tokens = tmp_path / "root" / "corpus" / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[0] ^= 1  # the finished corpus changes on disk; the scores stage is edited, so it must rerun
    tokens.write_bytes(bytes(data))
    (tmp_path / "r.toml").write_text(body.format(prose=corpus["prose"], tok=bpe_tokenizer, batch=2))
    before = sorted(p.name for p in (tmp_path / "root" / "scores").iterdir())
    with pytest.raises(PredistillError, match="stage 'scores': an input failed `predistill verify`"):
        execute(load_recipe(tmp_path / "r.toml", tmp_path / "root"), verify=True)
    assert "tokens.bin: chunk 0 changed" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "root" / "scores").iterdir()) == before  # nothing was run or removed
