"""Reading settings: flags, YAML files and presets onto the config tree, each value checked where it is set.

Precedence, lowest first: field defaults < `--preset=NAME` < `--config FILE.yaml` < `--section.key=value`.
Values are checked when they are set, so an error names the flag (or file) it came from.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from distclm.config.tree import SECTIONS, Config, field_specs
from distclm.errors import UserError, first_line
from distclm.presets import PRESETS


def base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of `str`, `Optional[int]`, ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


TRUE = {"true", "1", "yes", "on"}
FALSE = {"false", "0", "no", "off"}


def coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a string (flag) or YAML value into the field's type; errors name the key and origin."""
    specs = field_specs()
    f, tp = specs[key]
    base, optional = base_type(tp)
    where = f"--{key}" if origin == "flag" else f"'{key}' in {origin}"
    if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"  # a field that also takes `auto` (resolved later: --train.micro_batch_size)

    def bad(expected: str) -> UserError:
        return UserError(f"{where}: expected {expected}, got {value!r}")

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and base is not str):
        if optional:
            return None
        raise bad(base.__name__)
    if isinstance(value, str) and optional and base is str and value.lower() in ("none", "null"):
        return None
    if base is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in TRUE | FALSE:
            out = value.lower() in TRUE
        else:
            raise bad("true or false")
    elif base is int:
        if isinstance(value, bool):
            raise bad("an integer")
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad("an integer")
    elif base is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    else:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        out = str(value)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise UserError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    check_bound(key, out, where if origin != "flag" else None, value)
    return out


def check_bound(key: str, value: Any, where: str | None = None, given: Any = None) -> None:
    """A number outside its field's bound (tree.py, `bound=`; nan and inf always) -> one line naming the flag (or
    the file's key), the value and the range: `--train.lr=inf: must be a finite number > 0`."""
    f, tp = field_specs()[key]
    bound = f.metadata.get("bound")
    if bound is None or value is None or isinstance(value, (bool, str)) or bound.allows(value):
        return
    rule = f"must be {bound.describe(base_type(tp)[0] is int)}"
    shown = value if given is None else given
    raise UserError(f"--{key}={shown}: {rule}" if where is None else f"{where}: {rule}, got {shown!r}")


def closest_key(key: str) -> str:
    """A hint naming the valid key nearest to a misspelt one."""
    keys = list(field_specs())
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # a bare field name without its section: look for it in every section
        match = [k for k in keys if k.split(".", 1)[1] == key.split(".")[-1]][:1]
    return f" (did you mean --{match[0]}?)" if match else " (see --help for the valid keys)"


def apply(cfg: Config, updates: dict[str, Any], origin: str) -> None:
    """Set dotted keys on `cfg`, checking each key and value."""
    specs = field_specs()
    for key, value in updates.items():
        if key not in specs:
            where = "unknown flag --" if origin == "flag" else f"unknown key in {origin}: "
            raise UserError(f"{where}{key}{closest_key(key)}")
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, coerce(key, value, origin))


def flatten(tree: dict, origin: str) -> dict[str, Any]:
    """{section: {key: value}} -> {"section.key": value}, rejecting a malformed tree."""
    out = {}
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, body in tree.items():
        if section not in SECTIONS:
            hint = difflib.get_close_matches(str(section), SECTIONS, n=1)
            raise UserError(f"unknown section in {origin}: {section!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else f" (sections: {', '.join(SECTIONS)})"))
        if not isinstance(body, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping of keys to values")
        for key, value in body.items():
            out[f"{section}.{key}"] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    return flatten(tree, path)


def build_config(preset: str | None = None, file: str | None = None,
                 flags: dict[str, Any] | None = None) -> Config:
    """Defaults < preset < YAML file < flags, then cross-field checks."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            hint = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise UserError(f"unknown --preset={preset}" + (f" (did you mean {hint[0]}?)" if hint else "")
                            + f"; presets: {', '.join(PRESETS)}")
        apply(cfg, flatten(PRESETS[preset], f"preset {preset}"), f"preset {preset}")
    if file is not None:
        apply(cfg, load_yaml(file), file)
    if flags:
        apply(cfg, flags, "flag")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every number against its field's bound (a config built in code too, not only from flags and files)."""
    for key in field_specs():
        section, name = key.split(".", 1)
        check_bound(key, getattr(getattr(cfg, section), name))


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _shown(default: Any) -> str:
    """A default as --help shows it: none, true/false, a quoted string when it has outer spaces."""
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str) and default.strip() != default:
        return repr(default)
    return str(default)


def help_lines() -> list[tuple[str, str]]:
    """(`--section.key`, "doc (default: X; one of a, b)") for every field, in tree order."""
    rows = []
    for key, (f, _tp) in field_specs().items():
        choices = f.metadata.get("choices")
        default = _shown(f.default)
        extra = f"default: {default}" + (f"; one of {'|'.join(choices)}" if choices else "")
        rows.append((f"--{key}", f"{f.metadata['doc']} ({extra})"))
    return rows


# ---------------------------------------------------------------------------------------------
# The command line


def parse_bool(name: str, value: str) -> bool:
    """A true/false flag's value (`--verify=false`, `--overwrite yes`)."""
    if value.lower() in TRUE | FALSE:
        return value.lower() in TRUE
    raise UserError(f"--{name.replace('_', '-')}: expected true or false, got {value!r}")


def bool_fields() -> set[str]:
    """Dotted names of the true/false fields: a bare `--data.eos_between_docs` means true."""
    return {k for k, (_f, tp) in field_specs().items() if base_type(tp)[0] is bool}


def split_args(args: list[str], extra_flags: dict[str, tuple[bool, str]]) -> tuple[dict, dict, list[str]]:
    """Command-line words -> (config fields by dotted name, the other flags, positional arguments).

    `extra_flags`: the flags outside the --section.key scheme, name -> (takes a value, help). Each flag is checked
    by name here, so a misspelt one fails with the nearest valid name before anything runs.
    """
    specs, bools = field_specs(), bool_fields()
    flags: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        is_field = name in specs
        if not is_field and name not in extra_flags:
            raise UserError(f"unknown flag --{name}" + (closest_key(name) if "." in name else
                                                        _closest_extra(name, extra_flags)))
        takes_value = name not in bools if is_field else extra_flags[name][0]
        if not eq:
            if takes_value and i < len(args) and not args[i].startswith("--"):
                value = args[i]
                i += 1
            elif takes_value:
                raise UserError(f"--{name} expects a value" + (f" (--{name}=VALUE)" if is_field else ""))
            elif i < len(args) and args[i].lower() in TRUE | FALSE:
                # `--data.eos_between_docs false`: the value form every field accepts; left as a
                # positional it was ignored and the bare flag silently meant true.
                value = args[i]
                i += 1
            else:
                value = "true"
        (flags if is_field else extras)[name if is_field else name.replace("-", "_")] = value
    return flags, extras, positional


def _closest_extra(name: str, extra_flags: dict) -> str:
    match = difflib.get_close_matches(name, list(extra_flags), n=1)
    return f" (did you mean --{match[0]}?)" if match else closest_key(name)
