"""The package's shape (docs/architecture.md): stages import formats and mechanisms, never each
other; the module graph has no cycle, function-local imports included; each concept has one home;
every stage's options are a config dataclass with --config/--print-config."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from predistill import cli
from predistill.config import leaves

PACKAGE = Path(__file__).resolve().parent.parent / "predistill"
# subcommand modules; `run` and `demo` drive the others through the CLI and may import them
STAGES = {module.removeprefix("predistill.") for name, (module, _) in cli.COMMANDS.items() if name not in ("run", "demo")}


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (top level or in a function)."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("predistill"):
                if node.module == "predistill":  # `from predistill import x`
                    deps.update(alias.name for alias in node.names)
                else:
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("predistill."))
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").is_file() and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_package_modules():
    assert find_cycle(import_graph()) is None


def test_no_stage_imports_another_stage():
    assert STAGES >= {"prepare", "score", "sample", "generate", "train", "eval", "report", "tokenizer"}
    crossings = {(m, d) for m, deps in import_graph().items() if m in STAGES for d in deps if d in STAGES}
    assert crossings == set()


def defined_names(name: str) -> list[str]:
    """Modules that define a top-level function or class called `name`."""
    out = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name for n in tree.body):
            out.append(path.stem)
    return out


@pytest.mark.parametrize("name,home", [
    ("forward_params", "models"),  # N of the FLOPs formulas
    ("load_selection", "selection"),
    ("top_fraction", "selection"),
    ("resolve_model", "models"),  # model-spec resolution (run dirs, smollm2-135m, paths, hub ids)
    ("read_marker", "artifacts"),  # the completion-marker check
    ("check_plan", "artifacts"),
    ("check_output", "artifacts"),
    ("retokenize", "retokenize"),
    ("write_retokenized", "retokenize"),
    ("align", "crosstok"),  # which teacher position a student position of another tokenizer learns from
    ("VocabMap", "crosstok"),
    ("model_body", "models"),
    ("final_hidden", "models"),  # the body's forward (no KV cache)
    ("fuse_kernels", "kernels"),
    ("model_hash", "models"),
    ("resolve_device", "models"),
    ("resolve_dtype", "models"),
    ("ScoreTable", "scores"),
    ("run_forward_pass", "forward"),
    ("mean_logprobs", "forward"),
    ("Chunker", "chunking"),
])
def test_each_concept_is_defined_once(name, home):
    assert defined_names(name) == [home]


def test_nothing_but_models_runs_a_body_forward():
    # models.final_hidden is the one body call: a second would bring back the default KV cache
    # (every layer's keys and values copied and kept alive for a single full-sequence forward)
    offenders = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "models"
                 and any(isinstance(n, ast.Attribute) and n.attr == "last_hidden_state"
                         for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []


def test_nothing_but_models_reads_parameter_counts_for_flops():
    # FLOPs formulas go through models.forward_params; a second count of "non-embedding + head"
    # would let the compute-matched comparisons drift apart
    offenders = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "models"
                 and "get_output_embeddings().weight.numel()" in p.read_text()
                 and "forward_params" not in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("command", sorted(n for n in cli.COMMANDS if n not in ("run", "demo")))
def test_every_stage_has_config_and_print_config(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser(command).parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--print-config" in text


def test_print_config_round_trips_through_config(tmp_path):
    # the flags of a nested sub-config (KDConfig) are settable and printed under their flat names
    env = {**__import__("os").environ, "PYTHONPATH": str(PACKAGE.parent)}
    printed = subprocess.run([sys.executable, "-m", "predistill", "train", "--store", "S", "--out", "O",
                              "--kd-loss", "mse", "--temperature", "normkd", "--normkd-t", "2.0", "--print-config"],
                             capture_output=True, text=True, env=env, check=True).stdout
    assert 'kd_loss = "mse"' in printed and 'temperature_mode = "normkd"' in printed and "normkd_t = 2.0" in printed
    (tmp_path / "run.toml").write_text(printed)
    again = subprocess.run([sys.executable, "-m", "predistill", "train", "--config", str(tmp_path / "run.toml"),
                            "--print-config"], capture_output=True, text=True, env=env, check=True).stdout
    assert again == printed


def test_flat_keys_are_unique_in_every_stage_config():
    from predistill.eval import EvalConfig
    from predistill.generate import GenerateConfig
    from predistill.prepare import PrepareConfig
    from predistill.report import ReportConfig
    from predistill.sample import SampleConfig
    from predistill.score import ScoreConfig
    from predistill.tokenizer import TokenizerConfig
    from predistill.train import TrainConfig

    for cls in (EvalConfig, GenerateConfig, PrepareConfig, ReportConfig, SampleConfig, ScoreConfig, TokenizerConfig,
                TrainConfig):
        keys = [leaf.key for leaf in leaves(cls)]
        assert len(keys) == len(set(keys)), cls.__name__
        assert dataclasses.is_dataclass(cls)


def test_kd_loss_choices_come_from_the_registry():
    from predistill.kd import KD_LOSSES, LOSSES, KDConfig

    assert set(LOSSES) == set(KD_LOSSES) | {"uld"}  # ULD has its own pass (it needs the student's largest)
    loss = next(f for f in dataclasses.fields(KDConfig) if f.name == "loss")
    assert set(loss.metadata["choices"]) == set(LOSSES)


def test_sampling_method_choices_come_from_the_registry():
    from predistill.sample import METHODS, SampleConfig

    assert {"difference", "teacher-ppl", "random", "proxy"} <= set(METHODS)
    method = next(f for f in dataclasses.fields(SampleConfig) if f.name == "method")
    assert method.metadata["choices"] == tuple(METHODS)
