"""Typed dataclass configs with presets and command-line overrides.

Every field of a (nested) dataclass config becomes a flag `--section.field VALUE`; `--set
section.field=VALUE` does the same and can be repeated; `--preset NAME` picks the starting point.
Help texts come from each field's `metadata["help"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and how to fix it."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          choices: Sequence[str] | None = None, secret: bool = False) -> Any:
    """A dataclass field with a mandatory help text (optional: allowed choices; secret hides it in --help and
    --print-config)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _leaf_fields(cfg_cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(dotted name, field, resolved type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cfg_cls)
    out = []
    for f in dataclasses.fields(cfg_cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def field_names(cfg_cls: type) -> list[str]:
    """Dotted names of every leaf field of a config class ('sample.steps', ...), depth first."""
    return [name for name, _f, _tp in _leaf_fields(cfg_cls)]


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, Sequence)


def _scalar_type(tp: Any) -> Any:
    """The element type of list[...] / X | None annotations."""
    if _is_list(tp):
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _convert(name: str, raw: Any, tp: Any, choices: Sequence[str] | None) -> Any:
    """Convert a command-line string (or list of strings) to the field's type, or raise ConfigError."""
    if _is_list(tp):
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{name}: {raw!r} is not a JSON list ({e.msg}); "
                                      f'write e.g. --set {name}=\'["a", "b"]\'') from None
                except RecursionError:
                    raise ConfigError(f"{name}: the JSON list is nested too deeply; write a flat list, e.g. "
                                      f'--set {name}=\'["a", "b"]\'') from None
            else:
                items = [] if text == "" else [raw]
        else:
            items = list(raw)
        return [_convert(name, str(x), _scalar_type(tp), choices) for x in items]
    st = _scalar_type(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() == "none" and st is not str):
        return None
    try:
        if st is bool:
            low = str(raw).lower()
            if low in ("1", "true", "yes", "on"):
                value: Any = True
            elif low in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError
        elif st is int:
            value = int(raw)
        elif st is float:
            value = float(raw)
        elif st is Path:
            value = Path(raw)
        else:
            value = str(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {st.__name__}") from None
    if st is float and not math.isfinite(value):
        raise ConfigError(_not_finite(name, raw))
    if choices and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _not_finite(name: str, value: Any) -> str:
    return (f"{name}: must be a finite number (got {value!r}); NaN and infinity pass every range check and "
            "break the run later, so give a real value, e.g. the preset's (see --help)")


def check_finite(cfg: Any) -> None:
    """Raise ConfigError naming the first float field (or list element) of cfg that is NaN or infinite.

    Generic over every dataclass config, so no float field of any script can slip through: a NaN
    compares False with every bound and would pass the per-field range checks.
    """
    for name, _f, tp in _leaf_fields(type(cfg)):
        if _scalar_type(tp) is not float:
            continue
        value = get_field(cfg, name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise ConfigError(_not_finite(name, v))


MAX_NAME_LENGTH = 120  # a name becomes a folder holding files with longer names; most filesystems stop at 255


def check_name(value: str, name: str, fix: str = "") -> None:
    """A name that becomes one folder or file name (a round, a version): ConfigError naming the field otherwise.

    Refused: path separators, '.' and '..', a leading dot (hidden, and poseloop's temporaries), control
    characters and over-long names, so that the path built from it stays inside its parent folder.
    """
    bad = ""
    if not value.strip():
        bad = "is empty"
    elif "/" in value or "\\" in value:
        bad = "contains a path separator"
    elif value.startswith("."):
        bad = "starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        bad = "contains a control character"
    elif len(value) > MAX_NAME_LENGTH:
        bad = f"is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    elif value != value.strip():
        bad = "starts or ends with a space"
    if bad:
        raise ConfigError(f"{name}: {value[:60]!r} {bad}; it becomes a folder name, so use a plain name such as "
                          f"{fix or 'round-0003'} (letters, digits, '-', '_', '.')")


def get_field(cfg: Any, dotted: str) -> Any:
    """Value of a dotted field such as 'sample.steps'."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_field(cfg: Any, dotted: str, raw: Any) -> None:
    """Set a dotted field from a raw (string) value, converting and checking its type."""
    leaves = {name: (f, tp) for name, f, tp in _leaf_fields(type(cfg))}
    if dotted not in leaves:
        close = [n for n in leaves if n.split(".")[-1] == dotted.split(".")[-1]]
        hint = f" Did you mean {' or '.join(close)}?" if close else " See --help for the list."
        raise ConfigError(f"unknown config field {dotted!r}.{hint}")
    f, tp = leaves[dotted]
    value = _convert(dotted, raw, tp, f.metadata.get("choices"))
    *parents, last = dotted.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-serialisable nested dict."""
    return dataclasses.asdict(cfg)


def _shown(cfg: Any, name: str, f: dataclasses.Field[Any]) -> Any:
    """A field's value as --help and --print-config show it: a secret that is set stays hidden."""
    value = get_field(cfg, name)
    return "<hidden>" if f.metadata.get("secret") and value else value


def printable(cfg: Any) -> dict[str, Any]:
    """to_dict(cfg) with secrets hidden and paths as strings, for --print-config."""
    out = to_dict(cfg)
    for name, f, _tp in _leaf_fields(type(cfg)):
        *parents, last = name.split(".")
        node = out
        for part in parents:
            node = node[part]
        value = _shown(cfg, name, f)
        node[last] = str(value) if isinstance(value, Path) else value
    return out


def from_dict(cfg_cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config from to_dict() output (unknown keys are an error)."""
    hints = typing.get_type_hints(cfg_cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config field {key!r} for {cfg_cls.__name__}")
        tp = hints[key]
        kwargs[key] = from_dict(tp, value) if dataclasses.is_dataclass(tp) else value
    return cfg_cls(**kwargs)  # type: ignore[call-arg]


def build_parser(cfg_cls: type, presets: dict[str, Callable[[], Any]], default_preset: str,
                 description: str, prog: str | None = None,
                 aliases: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with --preset, --set and one --section.field flag per config field.

    aliases maps a short flag name to a field, e.g. {"policy": "eval.policy"} adds --policy.
    """
    aliases = aliases or {}
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets),
                        help="starting configuration; any field below overrides it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set sample.steps=30 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    defaults = presets[default_preset]()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, tp in _leaf_fields(cfg_cls):
        section = name.rsplit(".", 1)[0] if "." in name else "general"
        group = groups.setdefault(section, parser.add_argument_group(section))
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text,
                                      metavar=_scalar_type(tp).__name__.upper())
        if _is_list(tp):
            kwargs["nargs"] = "*"
        elif _scalar_type(tp) is bool:  # --flag alone means true; --flag false still works
            kwargs["nargs"], kwargs["const"] = "?", "true"
        short = [f"--{a}" for a, target in aliases.items() if target == name]
        group.add_argument(f"--{name}", *short, **kwargs)
        # Show the default preset's value in --help without making argparse apply it.
        shown = _shown(defaults, name, f)
        shown = str(shown) if isinstance(shown, Path) else shown
        group._group_actions[-1].help = f"{help_text} [{default_preset}: {shown!r}]"
    return parser


def parse_config(cfg_cls: type[C], presets: dict[str, Callable[[], C]], default_preset: str,
                 argv: Sequence[str] | None, description: str, prog: str | None = None,
                 aliases: dict[str, str] | None = None) -> tuple[C, argparse.Namespace]:
    """Parse argv into a validated config: preset, then --section.field flags, then --set overrides."""
    parser = build_parser(cfg_cls, presets, default_preset, description, prog, aliases)
    args = parser.parse_args(argv)
    cfg = presets[args.preset]()
    try:
        for name, _f, _tp in _leaf_fields(cfg_cls):
            if hasattr(args, name):
                set_field(cfg, name, getattr(args, name))
        for item in args.overrides:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set sample.steps=30")
            key, value = item.split("=", 1)
            set_field(cfg, key.strip(), value)
        check_finite(cfg)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as e:
        parser.error(str(e))
    if args.print_config:
        print(json.dumps(printable(cfg), indent=2))
        raise SystemExit(0)
    return cfg, args


def parse_step_args(cfg_cls: type[C], presets: dict[str, Callable[[], C]], default_preset: str,
                    args: Sequence[str], prog: str) -> C:
    """parse_config for arguments a program passes on (not a command line): argparse's message, which it would
    print before exiting, becomes a ConfigError carrying its last line."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cfg, _ = parse_config(cfg_cls, presets, default_preset, list(args), description="", prog=prog)
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
        raise ConfigError(last.split("error: ", 1)[-1]) from None
    return cfg
