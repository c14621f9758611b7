"""A small declarative checker for JSON files distclm reads back (the block manifest): each field's type and range
written once as a tree of specs, and a mistake named by its dotted path.

    SHARD = Record({"file": FileName(), "n_blocks": Int(0)})
    check(SHARD, {"file": "../x", "n_blocks": "many"})
    -> Invalid: file must be a plain file name inside the folder, found "../x"

Records allow keys they do not list (a newer writer may add some within a version); a listed key is required
unless it is in `optional`. Nothing here imports numpy or torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field


class Invalid(ValueError):
    """A field that breaks its spec: `where` (a dotted path), what it must be, what it is."""

    def __init__(self, where: str, expects: str, found=None, missing: bool = False):
        self.where, self.expects, self.found, self.missing = where, expects, found, missing
        super().__init__(f"{where} missing (must be {expects})" if missing else
                         f"{where} must be {expects}, found {shown(found)}")


def shown(value, limit: int = 60) -> str:
    """A value as JSON (what the user sees in the file), cut to `limit` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def join(where: str, key) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)


class Spec:
    expects = "a value"

    def check(self, value, where: str) -> None:
        if not self.ok(value):
            raise Invalid(where, self.expects, value)

    def ok(self, value) -> bool:
        return True


@dataclass(frozen=True)
class Int(Spec):
    lo: int = 0
    hi: int | None = None

    @property
    def expects(self) -> str:
        return f"an integer >= {self.lo}" + (f" and <= {self.hi}" if self.hi is not None else "")

    def ok(self, value) -> bool:  # bool is an int in Python, never in a manifest
        return type(value) is int and value >= self.lo and (self.hi is None or value <= self.hi)


@dataclass(frozen=True)
class Number(Spec):
    lo: float
    hi: float

    @property
    def expects(self) -> str:
        return f"a number in [{self.lo:g}, {self.hi:g}]"

    def ok(self, value) -> bool:
        return type(value) in (int, float) and math.isfinite(value) and self.lo <= value <= self.hi


@dataclass(frozen=True)
class Str(Spec):
    pattern: str | None = None  # a full match, when given
    what: str = "a string"

    @property
    def expects(self) -> str:
        return self.what

    def ok(self, value) -> bool:
        return isinstance(value, str) and (self.pattern is None or re.fullmatch(self.pattern, value) is not None)


def Hex(n: int) -> Str:  # noqa: N802 - reads as a type in the schema
    return Str(f"[0-9a-f]{{{n}}}", f"{n} lowercase hex digits")


class FileName(Spec):
    """A plain name of a file in the same folder: no path separator, not `.` or `..` (an absolute path or `../x`
    would read outside the folder)."""

    expects = "a plain file name inside the folder"

    def ok(self, value) -> bool:
        return isinstance(value, str) and value not in ("", ".", "..") and not any(c in value for c in "/\\\0")


@dataclass(frozen=True)
class OneOf(Spec):
    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", values)

    @property
    def expects(self) -> str:
        return "one of " + ", ".join(shown(v) for v in self.values)

    def ok(self, value) -> bool:
        return any(type(value) is type(v) and value == v for v in self.values)


@dataclass(frozen=True)
class Opt(Spec):
    """`spec` or null."""

    spec: Spec

    @property
    def expects(self) -> str:
        return f"{self.spec.expects} or null"

    def check(self, value, where: str) -> None:
        if value is not None:
            try:
                self.spec.check(value, where)
            except Invalid as exc:
                if exc.where != where:
                    raise
                raise Invalid(where, self.expects, value) from None


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec

    expects = "a list"

    def check(self, value, where: str) -> None:
        if not isinstance(value, list):
            raise Invalid(where, self.expects, value)
        for i, item in enumerate(value):
            self.item.check(item, join(where, i))


@dataclass(frozen=True)
class MapOf(Spec):
    """An object of any names, each value a `value`."""

    value: Spec
    what: str = "an object"

    @property
    def expects(self) -> str:
        return self.what

    def check(self, value, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, self.expects, value)
        for key, item in value.items():
            self.value.check(item, join(where, key))


@dataclass(frozen=True)
class Record(Spec):
    required: dict
    optional: dict = field(default_factory=dict)
    what: str = "an object"

    @property
    def expects(self) -> str:
        return self.what

    def extend(self, required: dict | None = None, optional: dict | None = None) -> "Record":
        """This record with more (or replaced) fields: a later version's schema from an earlier one's."""
        return Record({**self.required, **(required or {})}, {**self.optional, **(optional or {})}, self.what)

    def check(self, value, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, self.expects, value)
        fields = [(key, spec, True) for key, spec in self.required.items()] + \
            [(key, spec, False) for key, spec in self.optional.items()]
        # this record's own values first, then the nested ones: a top-level mistake is named before a deep one
        for key, spec, required in sorted(fields, key=lambda f: isinstance(f[1], (Record, ListOf, MapOf))):
            if key in value:
                spec.check(value[key], join(where, key))
            elif required:
                raise Invalid(join(where, key), spec.expects, missing=True)


def check(spec: Spec, value, where: str = "") -> None:
    """Raise Invalid naming the first field of `value` that breaks `spec` (fields in the schema's order)."""
    spec.check(value, where)
