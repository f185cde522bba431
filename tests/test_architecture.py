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
from predistill.core.config import leaves

PACKAGE = Path(__file__).resolve().parent.parent / "predistill"
# The packages by layer, lowest first: a module imports only from its own package and those before
# it (docs/architecture.md); `cli` and `__main__` sit above them all.
LAYERS = ("core", "formats", "modeling", "text", "training", "stages")
# subcommand modules; `run` and `demo` drive the others through the CLI and may import them
STAGES = {
    module.removeprefix("predistill.") for name, (module, _) in cli.COMMANDS.items() if name not in ("run", "demo")
}


def module_name(path: Path) -> str:
    """predistill/stages/score.py → "stages.score"; a package's __init__.py → the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(dotted: str) -> str | None:
    """The package module a dotted name imports ("predistill.stages.score.run" → "stages.score")."""
    parts = dotted.removeprefix("predistill.").split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its source (top level or in a function,
    and through importlib strings such as cli.COMMANDS's "predistill.stages.score")."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("predistill"):
                deps.update(_resolve(f"{node.module}.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(_resolve(a.name) for a in node.names if a.name.startswith("predistill."))
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("predistill.")
            ):
                deps.add(_resolve(node.value))
        graph[name] = {d for d in deps if d is not None and d != name and d in MODULES and "." in d}
    return graph


def layer_of(module: str) -> str | None:
    return module.split(".")[0] if module.split(".")[0] in LAYERS else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [node, dep]
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
    assert STAGES >= {
        f"stages.{s}" for s in ("prepare", "score", "sample", "generate", "train", "eval", "report", "tokenizer")
    }
    crossings = {(m, d) for m, deps in import_graph().items() if m in STAGES for d in deps if d in STAGES}
    assert crossings == set()


def test_every_module_sits_in_a_layer_and_imports_only_its_own_layer_or_those_below():
    assert {m for m in MODULES if "." not in m} == {"", "cli", "__main__"} | set(LAYERS)  # no flat module left
    assert "stages.score" in import_graph()["cli"]  # importlib strings count as imports
    upward = sorted(
        (m, d)
        for m, deps in import_graph().items()
        if layer_of(m)
        for d in deps
        if layer_of(d) is None or LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))
    )
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    graph = {"formats.store": {"stages.train"}, "stages.train": {"formats.store"}}
    assert [
        (m, d) for m, deps in graph.items() for d in deps if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))
    ] == [("formats.store", "stages.train")]


def defined_names(name: str) -> list[str]:
    """Modules that define a top-level function or class called `name`."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name for n in tree.body):
            out.append(module)
    return out


@pytest.mark.parametrize(
    "name,home",
    [
        ("forward_params", "modeling.models"),  # N of the FLOPs formulas
        ("load_selection", "formats.selection"),
        ("top_fraction", "formats.selection"),
        ("resolve_model", "modeling.models"),  # model-spec resolution (run dirs, smollm2-135m, paths, hub ids)
        ("read_marker", "core.artifacts"),  # the completion-marker check
        ("check_plan", "core.artifacts"),
        ("check_output", "core.artifacts"),
        ("retokenize", "text.retokenize"),
        ("write_retokenized", "text.retokenize"),
        ("align", "text.crosstok"),  # which teacher position a student position of another tokenizer learns from
        ("VocabMap", "text.crosstok"),
        ("model_body", "modeling.models"),
        ("final_hidden", "modeling.models"),  # the body's forward (no KV cache)
        ("fuse_kernels", "modeling.kernels"),
        ("model_hash", "modeling.models"),
        ("resolve_device", "modeling.models"),
        ("resolve_dtype", "modeling.models"),
        ("ScoreTable", "formats.scores"),
        ("run_forward_pass", "training.forward"),
        ("mean_logprobs", "training.forward"),
        ("Chunker", "text.chunking"),
        ("headline_metric", "formats.evalresults"),  # the number that stands for a task (eval and report)
        ("TokenRecord", "formats.tokrecord"),
    ],
)
def test_each_concept_is_defined_once(name, home):
    assert defined_names(name) == [home]


def test_nothing_but_models_runs_a_body_forward():
    # models.final_hidden is the one body call: a second would bring back the default KV cache
    # (every layer's keys and values copied and kept alive for a single full-sequence forward)
    offenders = [
        m
        for m, p in MODULES.items()
        if m != "modeling.models"
        and any(
            isinstance(n, ast.Attribute) and n.attr == "last_hidden_state" for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert offenders == []


def called_names(path) -> set[str]:
    """Names a module calls (`f(...)` and `x.f(...)`)."""
    calls = (n.func for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call))
    return {c.id if isinstance(c, ast.Name) else c.attr for c in calls if isinstance(c, (ast.Name, ast.Attribute))}


def test_the_rank_and_marker_protocol_runs_in_one_place():
    # which shards a rank runs, which are done, and who finishes the artifact are sharding.run_sharded's:
    # a stage describes its work (a ShardedWork) instead of running its own loop over the ranks
    protocol = {"owns", "finish_by_last_rank"}
    offenders = {m: sorted(protocol & called_names(p)) for m, p in MODULES.items() if m != "core.sharding"}
    assert {m: names for m, names in offenders.items() if names} == {}
    drivers = sorted(m for m, p in MODULES.items() if "run_sharded" in called_names(p))
    assert drivers == ["stages.eval", "stages.generate", "stages.score"]


def test_nothing_but_models_reads_parameter_counts_for_flops():
    # FLOPs formulas go through models.forward_params; a second count of "non-embedding + head"
    # would let the compute-matched comparisons drift apart
    offenders = [
        m
        for m, p in MODULES.items()
        if m != "modeling.models"
        and "get_output_embeddings().weight.numel()" in p.read_text()
        and "forward_params" not in p.read_text()
    ]
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
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "predistill",
            "train",
            "--store",
            "S",
            "--out",
            "O",
            "--kd-loss",
            "mse",
            "--temperature",
            "normkd",
            "--normkd-t",
            "2.0",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert 'kd_loss = "mse"' in printed and 'temperature_mode = "normkd"' in printed and "normkd_t = 2.0" in printed
    (tmp_path / "run.toml").write_text(printed)
    again = subprocess.run(
        [sys.executable, "-m", "predistill", "train", "--config", str(tmp_path / "run.toml"), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert again == printed


def test_flat_keys_are_unique_in_every_stage_config():
    from predistill.stages.eval import EvalConfig
    from predistill.stages.generate import GenerateConfig
    from predistill.stages.prepare import PrepareConfig
    from predistill.stages.report import ReportConfig
    from predistill.stages.sample import SampleConfig
    from predistill.stages.score import ScoreConfig
    from predistill.stages.tokenizer import TokenizerConfig
    from predistill.stages.train import TrainConfig

    for cls in (
        EvalConfig,
        GenerateConfig,
        PrepareConfig,
        ReportConfig,
        SampleConfig,
        ScoreConfig,
        TokenizerConfig,
        TrainConfig,
    ):
        keys = [leaf.key for leaf in leaves(cls)]
        assert len(keys) == len(set(keys)), cls.__name__
        assert dataclasses.is_dataclass(cls)


def test_kd_loss_choices_come_from_the_registry():
    from predistill.training.kd import KD_LOSSES, LOSSES, KDConfig

    assert set(LOSSES) == set(KD_LOSSES) | {"uld"}  # ULD has its own pass (it needs the student's largest)
    loss = next(f for f in dataclasses.fields(KDConfig) if f.name == "loss")
    assert set(loss.metadata["choices"]) == set(LOSSES)


def test_sampling_method_choices_come_from_the_registry():
    from predistill.stages.sample import METHODS, SampleConfig

    assert {"difference", "teacher-ppl", "random", "proxy"} <= set(METHODS)
    method = next(f for f in dataclasses.fields(SampleConfig) if f.name == "method")
    assert method.metadata["choices"] == tuple(METHODS)
