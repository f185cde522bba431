"""Typed configs: one dataclass per command, which *is* its CLI, its TOML file and its record.

Every field is a `--flag` (underscores become dashes, or the field's `flag`); a field whose type
is itself a config dataclass nests (`TrainConfig.kd: KDConfig`) and its fields are flattened into
the same flat namespace (`--kd-loss`, `--normkd-t`), so nesting organises the code without
changing the command line. The flat names (`key`) are also the keys of `--config FILE.toml`, of a
run's `config.json` and of `--print-config`'s output. Precedence: dataclass default < `--config`
< flags given on the command line. Declare a field with `option(...)`: its help text, choices,
flag and range (`interval="[1, inf)"`) live beside its default, so each default has exactly one
home, and every value — flag, config file, recipe, or a config built in code (`check_ranges`) — is
checked against the same declaration: a number outside its interval, or not finite, is one line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import enum
import json
import math
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from predistill.core.artifacts import PredistillError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")
MAX_CONFIG_BYTES = 1 << 20  # a --config file is settings, not data


@typing.runtime_checkable
class CheckedConfig(typing.Protocol):
    """A config whose command refuses some combinations of settings. `check` raises a PredistillError
    for each, reading nothing from disk; `resolve_config` calls it, so a recipe's dry run refuses
    what the real run would (and the command calls it again for a config built in code)."""

    def check(self) -> None: ...


class Effect(enum.Enum):
    """What a setting does to the artifact its command writes. Declared once, on the field
    (`option(..., effect=...)`), so that every identity — "is this output the one asked for?",
    "may this run resume?", "are these two runs one configuration?" — is one call of `identity`
    instead of a hand-kept list of keys."""

    RESULT = "result"  # another value makes another artifact (the default)
    MEASURE = "measure"  # what is measured and recorded beside the result (held-out sets, a by-product
    # written on the way): part of the artifact, not of what a comparison of methods groups by
    ROUNDING = "rounding"  # how the same thing is computed (device, kernels, micro-batching, chunking):
    # moves float rounding only
    NONE = "none"  # where and how often things are written or shown (paths, checkpoint cadence, progress),
    # and by-products written elsewhere with an identity of their own (`score --logits-out`)


# what an output's identity leaves out by default: a rerun may differ in these and reuse (or resume) it
EXECUTION = frozenset({Effect.NONE, Effect.ROUNDING})


def effect_of(f: dataclasses.Field) -> Effect:
    return f.metadata.get("effect", Effect.RESULT)


def identity(config: Any, ignore: typing.Collection[Effect] = EXECUTION, *, blank: bool = False) -> dict[str, Any]:
    """The settings of `config` whose declared effect is not in `ignore`, shaped like
    `dataclasses.asdict` (nested configs nested; a nested config whose own field is ignored goes
    whole): what an artifact records as the config that made it, and compares on a rerun.
    `blank`: the ignored settings stay, as None (a manifest that names every setting)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if effect_of(f) in ignore:
            if blank:
                out[f.name] = None
        else:
            out[f.name] = (
                identity(value, ignore, blank=blank) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
            )
    return out


def keys_with_effect(cls: type, ignore: typing.Collection[Effect] = EXECUTION) -> list[str]:
    """The flat keys (`leaves`) of `cls` whose effect, and every enclosing field's, is not in `ignore`."""
    return [leaf.key for leaf in leaves(cls) if not any(e in ignore for e in leaf.effects)]


def flat_identity(values: dict[str, Any], cls: type, ignore: typing.Collection[Effect] = EXECUTION) -> dict[str, Any]:
    """`identity` over flat settings (a run's config.json): the keys of `cls` not ignored; keys that
    are not settings of `cls` (the command line, a removed option) are no part of it."""
    return {k: values.get(k) for k in keys_with_effect(cls, ignore)}


class UsageError(PredistillError):
    """A command line that cannot run (a required setting missing): the CLI exits 2, as argparse does."""


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    key: str | None = None,
    choices: typing.Iterable | None = None,
    required: bool = False,
    cli: bool = True,
    positional: bool = False,
    interval: str | None = None,
    effect: Effect = Effect.RESULT,
    **argparse_kwargs: Any,
) -> Any:
    """A config field. `flag`/`key` rename it on the command line / in files (default: the field
    name); `cli=False` keeps it out of both (a value another field derives); `required` fields
    must be set by a flag or the config file; `interval` ("[0, 1)", "(0, inf)", "[1, inf)") is the
    range a numeric value must lie in (always finite); `effect` what the setting does to the
    command's artifact (`Effect`, for `identity`); extra keyword arguments go to `add_argument`."""
    if interval is not None:
        _bounds(interval)  # a malformed declaration fails at import, not at a user's run
    metadata = {
        "help": help,
        "flag": flag,
        "key": key,
        "choices": tuple(choices) if choices is not None else None,
        "required": required,
        "cli": cli,
        "positional": positional,
        "interval": interval,
        "effect": effect,
        "argparse": argparse_kwargs,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _bounds(interval: str) -> tuple[float, float]:
    low, high = (float(x) for x in interval[1:-1].split(","))
    if interval[0] not in "[(" or interval[-1] not in "])" or not low <= high:
        raise ValueError(f"malformed interval {interval!r}")
    return low, high


def in_interval(value: float, interval: str) -> bool:
    """Is `value` finite and inside an interval written like "(0, inf)" or "[0, 1]"?"""
    low, high = _bounds(interval)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def _range_text(interval: str, integer: bool) -> str:
    low, high = _bounds(interval)
    if integer and high == math.inf:
        return f"≥ {int(low) + (interval[0] == '(')}"
    return f"{'' if integer else 'finite and '}in {interval}"


def check_value(leaf: Leaf, value: Any) -> None:
    """Refuse a value outside its field's declared interval (numbers only; None is "unset")."""
    interval = leaf.field.metadata.get("interval")
    if isinstance(value, str):  # a number given as text to a converter-typed setting (`--temperature 0`)
        try:
            value = float(value)
        except ValueError:
            return  # a name (an adaptive mode), checked where it is used
    if interval is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not in_interval(value, interval):
        raise PredistillError(f"{leaf.flag} must be {_range_text(interval, leaf.type is int)}, got {value}")


def check_ranges(config: Any) -> None:
    """Check every declared range of a config (a config built in code gets the CLI's checks)."""
    for leaf, value in zip(leaves(type(config)), to_flat(config).values()):
        check_value(leaf, value)


def _base_type(tp) -> type:
    """The concrete type behind `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One flat setting: where it lives in the nested config (`path`) and how the CLI names it."""

    path: tuple[str, ...]
    key: str
    field: dataclasses.Field
    type: type
    effects: tuple[Effect, ...] = ()  # the declared effect of each field on `path`, outermost first

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.key.replace("_", "-")

    def default(self) -> Any:
        f = self.field
        if f.default is not dataclasses.MISSING:
            return f.default
        assert f.default_factory is not dataclasses.MISSING, f"setting {self.key!r} has no default"
        return f.default_factory()


def leaves(cls: type) -> Iterator[Leaf]:
    """Every CLI setting of config class `cls`, nested configs flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        tp = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            for leaf in leaves(tp):
                yield Leaf((f.name, *leaf.path), leaf.key, leaf.field, leaf.type, (effect_of(f), *leaf.effects))
        else:
            yield Leaf((f.name,), f.metadata.get("key") or f.name, f, tp, (effect_of(f),))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--config`, `--print-config` and one flag per leaf (default None = unset, so that only the
    flags actually given override the config file)."""
    parser.add_argument(
        "--config", metavar="FILE", help="read settings from a TOML file, or a run's config.json (flags override it)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.set_defaults(config_class=cls)  # what `predistill run --dry-run` resolves a stage's flags into
    seen: dict[str, Leaf] = {}
    for leaf in leaves(cls):
        if leaf.key in seen:
            raise TypeError(
                f"{cls.__name__}: setting {leaf.key!r} is declared twice ({seen[leaf.key].path}, {leaf.path})"
            )
        seen[leaf.key] = leaf
        meta = leaf.field.metadata
        default = leaf.default()
        help_text = meta.get("help", "")
        if meta.get("interval"):
            help_text += f"; {_range_text(meta['interval'], leaf.type is int)}"
        if meta.get("required"):
            help_text += " (required)"
        elif default not in (None, "", []) and "%(default)" not in help_text:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=leaf.key, default=None, help=help_text)
        extra = dict(meta.get("argparse") or {})
        if meta.get("positional"):  # e.g. report's RUN...: still settable from --config
            parser.add_argument(leaf.key, nargs="*", default=None, help=help_text, **extra)
            continue
        if "action" in extra:  # e.g. store_false for --no-progress
            kwargs.update(extra)
        elif leaf.type is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL", **extra)
        elif leaf.type is list:
            kwargs.update(action="append", **extra)
            kwargs["help"] += " (repeatable)"
        else:
            kwargs.update(type=leaf.type, choices=meta.get("choices"))
            kwargs.update(extra)
        parser.add_argument(leaf.flag, **kwargs)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise PredistillError(
                f"{path}: {path.stat().st_size} bytes is not a config file (at most {MAX_CONFIG_BYTES})"
            )
        if path.suffix == ".json":  # a run's own config.json: reruns exactly that run
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                loaded = {k: v for k, v in loaded.items() if k != "command" and v is not None}
        else:
            loaded = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PredistillError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise PredistillError(f"{path}: is a directory, not a config file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredistillError(f"{path}: invalid {path.suffix.lstrip('.').upper() or 'TOML'} ({e})") from None
    except (ValueError, RecursionError) as e:  # a 5 000-digit number, nesting 100 000 deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise PredistillError(f"{path}: unreadable ({reason})") from None
    if not isinstance(loaded, dict):
        raise PredistillError(f"{path}: expected a table of settings")
    return loaded


def _typed(leaf: Leaf, value: Any, path: Path) -> Any:
    """A file's value for `leaf`, checked against the field's type (ints are accepted as floats;
    a `type=` converter, e.g. `--temperature normkd`, is applied to strings)."""
    converter = (leaf.field.metadata.get("argparse") or {}).get("type")
    if converter is not None and isinstance(value, str):
        try:
            return converter(value)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise PredistillError(f"{path}: {leaf.key} = {value!r}: {e}") from None
    if value is None or (leaf.type is float and isinstance(value, int) and not isinstance(value, bool)):
        return float(value) if value is not None else None
    ok = isinstance(value, leaf.type) and not (leaf.type is int and isinstance(value, bool))
    if leaf.type is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        expected = {
            list: "a list of strings",
            int: "an integer",
            float: "a number",
            bool: "true or false",
            str: "a string",
        }.get(leaf.type, leaf.type.__name__)
        raise PredistillError(f"{path}: {leaf.key} = {value!r} is not {expected}")
    if leaf.field.metadata.get("choices") and value not in leaf.field.metadata["choices"]:
        raise PredistillError(
            f"{path}: {leaf.key} = {value!r}; choose from {', '.join(map(str, leaf.field.metadata['choices']))}"
        )
    return value


def check_recorded(cls: type, values: dict[str, Any], where: str | Path) -> None:
    """Settings as an artifact recorded them (flat keys, e.g. a run's config): each one `cls` declares
    must have the declared type, be among its choices and lie in its range; the first that does not
    is named. Keys `cls` does not declare are left alone (a reader uses only its own)."""
    for leaf in leaves(cls):
        if leaf.key in values:
            check_value(leaf, _typed(leaf, values[leaf.key], Path(where)))


def from_flat(cls: type[C], values: dict[str, Any]) -> C:
    """Build config `cls` from flat settings (keys as `leaves` names them); the rest keep defaults."""
    nested: dict[str, Any] = {}
    for leaf in leaves(cls):
        if leaf.key in values:
            node = nested
            for name in leaf.path[:-1]:
                node = node.setdefault(name, {})
            node[leaf.path[-1]] = values[leaf.key]
    return _build(cls, nested)


def _build(cls: type, nested: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            continue
        tp = _base_type(hints[f.name])
        kwargs[f.name] = _build(tp, nested[f.name]) if dataclasses.is_dataclass(tp) else nested[f.name]
    return cls(**kwargs)


def to_flat(config: Any) -> dict[str, Any]:
    """The config's settings under their flat keys (what config.json and TOML files hold)."""
    out = {}
    for leaf in leaves(type(config)):
        value = config
        for name in leaf.path:
            value = getattr(value, name)
        out[leaf.key] = value
    return out


def resolve_config(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults, then the `--config` file, then the flags that were given; required settings checked."""
    values: dict[str, Any] = {}
    keys = {leaf.key: leaf for leaf in leaves(cls)}
    if getattr(args, "config", None):
        path = Path(args.config)
        loaded = _read_file(path)
        unknown = sorted(set(loaded) - set(keys))
        if unknown:
            raise PredistillError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        for key, value in loaded.items():
            loaded[key] = _typed(keys[key], value, path)
        values.update(loaded)
    values.update({k: v for k, v in vars(args).items() if k in keys and v is not None})
    for key, value in values.items():
        check_value(keys[key], value)
    for key, leaf in keys.items():
        if leaf.field.metadata.get("required") and values.get(key) in (None, "", []):
            name = (
                leaf.field.metadata.get("argparse", {}).get("metavar", leaf.key)
                if leaf.field.metadata.get("positional")
                else leaf.flag
            )
            raise UsageError(f"the following arguments are required: {name} (on the command line or in --config)")
    try:
        cfg = from_flat(cls, values)
    except TypeError as e:
        raise PredistillError(f"invalid settings: {e}") from None
    if isinstance(cfg, CheckedConfig):
        cfg.check()
    return cfg


def config_from_args(cls: type[C], args: argparse.Namespace) -> C | None:
    """The resolved config, or None after printing it for `--print-config`."""
    cfg = resolve_config(cls, args)
    if getattr(args, "print_config", False):
        print(to_toml(cfg), end="")
        return None
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(config: Any) -> str:
    """Config → flat TOML. Unset (None) settings are written as comments: TOML has no null."""
    lines = []
    for key, value in to_flat(config).items():
        lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
