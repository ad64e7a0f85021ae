"""rstash-recv's configuration: TOML loading, validation and the effective settings.

This module owns reading rstash-recv.toml (rstash-recv.toml(5)): the TOML
tables as pydantic models built from the settings of rstash.settings, the
``include`` mechanism, the ``[defaults]`` inheritance, the cross-checks between
boxes and the one-line error messages. With rstash.client.profiles
(rstash-send's profiles, which validate through :func:`_validate` here) it is
the only module that imports pydantic; everything else codes against the frozen
:class:`Config` and :class:`BoxConfig` it returns (defined in rstash.settings,
so that rstash.snapshot can rebuild them without pydantic).

It must never touch a box directory or read a key file (``--check-config`` does
that), never create anything, and never let a traceback or pydantic's
multi-line report reach a user: every problem becomes one line
``FILE: field.path: message`` inside one :class:`~rstash.errors.ConfigError`.

A per-connection rstash-recv imports this module only when the configuration
changed since the snapshot in state_dir was written (rstash.snapshot); imports
are still kept to the standard library's light modules and one small pydantic
model per TOML table.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, create_model

from rstash.errors import ConfigError
from rstash.names import BOX_NAME_RE, is_box_name
from rstash.settings import (
    DEFAULT_CONFIG,
    BoxConfig,
    BoxPolicy,
    Config,
    ServerSettings,
    array_of,
    check_abs_path,
    check_string,
    check_strings,
    dump_settings,
    settings_fields,
    toml_kind,
)
from rstash.tomlfile import field_path, problem_line, read_toml
from rstash.units import MAX_SIZE, parse_duration, parse_size

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_SIZE",
    "BoxConfig",
    "Config",
    "dump_config",
    "load_config",
    "parse_duration",
    "parse_size",
]


# Sizes and durations: the one parser of each lives in rstash.units (no pydantic there,
# so rstash-send can use it cheaply); re-exported here.


# ---------------------------------------------------------------------------
# The TOML tables, one small pydantic model each, built from the settings
# dataclasses so that no field is written twice. Every field's check is a
# PlainValidator: pydantic's own coercion never runs. A box field absent from
# model_fields_set was not written in the file, so [defaults] (or the
# built-in default) applies.

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def _checked(check: Any) -> Any:
    return Annotated[Any, PlainValidator(check)]


def _table(name: str, settings: type[ServerSettings] | type[BoxPolicy], *, builtin: bool,
           **extra: tuple[Any, Any]) -> type[BaseModel]:
    spec: dict[str, Any] = {
        f.name: (_checked(f.metadata["check"]), f.default if builtin else None)
        for f in settings_fields(settings)
    }
    spec.update(extra)
    model: type[BaseModel] = create_model(name, __config__=_STRICT, **spec)
    return model


#: The top level of the main file, without [defaults] and [box.*].
_TopTable = _table("_TopTable", ServerSettings, builtin=True,
                   include=(_checked(check_strings), ()))
#: [defaults]: every box key but path and keys, plus root.
_DefaultsTable = _table("_DefaultsTable", BoxPolicy, builtin=False,
                        root=(_checked(check_abs_path), None))
#: [box.NAME] as written; inheritance happens in :func:`_effective_box`.
_BoxTable = _table("_BoxTable", BoxPolicy, builtin=False,
                   path=(_checked(check_abs_path), None),
                   keys=(_checked(array_of(lambda v: check_string(v, "a path"))), None))

_BOX_FIELDS = frozenset(_BoxTable.model_fields)


# ---------------------------------------------------------------------------
# Pydantic's errors as one-line problems.

def _pydantic_message(err: Mapping[str, Any]) -> str:
    """A human message for one pydantic error (never pydantic's own wording if avoidable)."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required"
    msg: str = err.get("msg", kind)
    return msg


def _validate(
    model: type[BaseModel], data: dict[str, Any], file: str, prefix: tuple[str, ...],
    problems: list[str],
) -> tuple[Any, set[str]]:
    """Validate one TOML table; report every bad field and return the valid rest.

    The returned model holds every field that validated (bad ones fall back to
    their defaults) and the set of bad field names, so that cross-checks can
    go on without repeating a problem already reported.
    """
    bad: set[str] = set()
    while True:
        try:
            return model.model_validate({k: v for k, v in data.items() if k not in bad}), bad
        except ValidationError as e:
            errors = e.errors(include_url=False)
        for err in errors:
            loc = tuple(err["loc"])
            problems.append(problem_line(file, field_path(*prefix, *loc), _pydantic_message(err)))
            # Every table model has defaults for all fields, so dropping bad keys ends this.
            bad.add(str(loc[0]) if loc else "")
        if "" in bad:
            return model.model_validate({}), bad


# ---------------------------------------------------------------------------
# Loading.


def _dotted_hints(name: str, table: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(field, hint) for sub-tables inside [box.NAME]: [box.a.b] meant box "a.b"."""
    for k, v in table.items():
        if k in _BOX_FIELDS or not isinstance(v, dict):
            continue
        dotted = f"{name}.{k}"
        if any(not isinstance(x, dict) for x in v.values()) or not v:
            yield (
                field_path("box", name, k),
                f"a table inside box {name!r}: write [box.\"{dotted}\"] "
                "for a box name with dots",
            )
        yield from _dotted_hints(dotted, v)


@dataclass
class _RawBox:
    name: str
    table: Any  # a _BoxTable
    bad: set[str]
    file: str


def _box_tables(
    data: dict[str, Any], file: str, problems: list[str], into: dict[str, _RawBox]
) -> None:
    boxes = data.get("box", {})
    if not isinstance(boxes, dict):
        problems.append(problem_line(file, "box", f"must be a table ([box.NAME]), not {toml_kind(boxes)}"))
        return
    for name, table in boxes.items():
        where = field_path("box", name)
        if not isinstance(table, dict):
            problems.append(problem_line(file, where, f"must be a table, not {toml_kind(table)}"))
            continue
        hints = list(_dotted_hints(name, table))
        problems.extend(problem_line(file, f, h) for f, h in hints)
        nested = {k for k, v in table.items() if k not in _BOX_FIELDS and isinstance(v, dict)}
        if hints and nested == set(table):
            continue  # only the artefact of a dotted name: the hint says it all
        if not is_box_name(name):
            problems.append(
                problem_line(file, where, f"invalid box name: must match {BOX_NAME_RE.pattern[:-2]}")
            )
        if name in into:
            first = into[name].file
            problems.append(
                problem_line(file, where, f"box {name!r} is already defined in {first}")
                if first != file
                else problem_line(file, where, "defined twice")
            )
            continue
        plain = {k: v for k, v in table.items() if k not in nested}
        box, bad = _validate(_BoxTable, plain, file, ("box", name), problems)
        into[name] = _RawBox(name, box, bad, file)


def _effective_box(
    raw: _RawBox, defaults: Any, defaults_bad: set[str], problems: list[str]
) -> BoxConfig | None:
    """The box after [defaults], or None (and problems) when it cannot exist."""
    b, file, name = raw.table, raw.file, raw.name
    path = b.path
    if path is None and "path" not in raw.bad:
        if defaults.root is not None:
            path = defaults.root / name
        elif "root" not in defaults_bad:
            problems.append(
                problem_line(file, field_path("box", name, "path"),
                      "missing, and [defaults] has no root to put the box in")
            )
    keys: tuple[Path, ...] = ()
    if b.keys is not None:
        base = Path(file).parent
        keys = tuple(base / k for k in b.keys)  # a relative key is beside its config file
    auth = b.auth if "auth" in b.model_fields_set else defaults.auth
    # Only the SSH login may stand in for a key; every other box has one (no open box).
    if not keys and "keys" not in raw.bad and auth != "ssh":
        problems.append(
            problem_line(file, field_path("box", name, "keys"),
                  "a box needs at least one key (there is no open box)")
        )
    if path is None:
        return None
    policy: dict[str, Any] = {}
    for f in settings_fields(BoxPolicy):
        if f.name in b.model_fields_set:
            policy[f.name] = getattr(b, f.name)  # None is kept: `on_receive = []` is off
        elif f.name in defaults.model_fields_set:
            policy[f.name] = getattr(defaults, f.name)
    return BoxConfig(name=name, path=path, keys=keys, source=Path(file), **policy)


def _real(p: Path) -> Path:
    # Symlinks that exist are followed, missing components are not required:
    # two spellings of one directory must not pass for two boxes.
    return Path(os.path.realpath(p))


def _cross_check(
    boxes: list[BoxConfig], state_dir: Path | None, top_file: str,
    problems: list[str], warnings: list[str],
) -> None:
    by_path: dict[Path, BoxConfig] = {}
    for box in boxes:
        real = _real(box.path)
        where = field_path("box", box.name, "path")
        other = by_path.get(real)
        if other is not None:
            problems.append(problem_line(str(box.source), where,
                                  f"{box.path} is the same directory as box {other.name}'s"))
            continue
        by_path[real] = box
    for real, box in by_path.items():
        for parent in real.parents:
            outer = by_path.get(parent)
            if outer is not None:
                problems.append(problem_line(
                    str(box.source), field_path("box", box.name, "path"),
                    f"{box.path} is inside box {outer.name} ({outer.path}): box paths must "
                    "not nest",
                ))
                break
    if state_dir is not None:
        real_state = _real(state_dir)
        for real, box in by_path.items():
            if real_state == real or real in real_state.parents:
                problems.append(problem_line(top_file, "state_dir",
                                      f"{state_dir} is inside box {box.name} ({box.path})"))
            elif real_state in real.parents:
                problems.append(problem_line(str(box.source), field_path("box", box.name, "path"),
                                      f"{box.path} is inside state_dir ({state_dir})"))
    key_owner: dict[Path, BoxConfig] = {}
    for box in boxes:
        seen: set[Path] = set()
        for key in box.keys:
            real = _real(key)
            where = field_path("box", box.name, "keys")
            if real in seen:
                warnings.append(problem_line(str(box.source), where, f"key {key} is listed twice"))
                continue
            seen.add(real)
            owner = key_owner.setdefault(real, box)
            if owner is not box:
                warnings.append(problem_line(
                    str(box.source), where,
                    f"key {key} also used by box {owner.name}: a leaked client key opens both",
                ))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and cross-check rstash-recv's configuration.

    Raises :class:`ConfigError` carrying every problem found, one line each.
    Never looks at box directories or key files.
    """
    file = os.path.abspath(os.fspath(path))
    problems: list[str] = []
    warnings: list[str] = []
    data = read_toml(file, problems)
    if data is None:
        raise ConfigError(problems)

    defaults_data = data.pop("defaults", {})
    box_data = {"box": data.pop("box")} if "box" in data else {}
    top, top_bad = _validate(_TopTable, data, file, (), problems)

    if not isinstance(defaults_data, dict):
        problems.append(problem_line(file, "defaults", f"must be a table, not {toml_kind(defaults_data)}"))
        defaults_data = {}
    defaults, defaults_bad = _validate(
        _DefaultsTable, defaults_data, file, ("defaults",), problems
    )

    raw_boxes: dict[str, _RawBox] = {}
    _box_tables(box_data, file, problems, raw_boxes)
    base = os.path.dirname(file)
    # A file matched by two patterns is read once; the main file never again.
    read_already = {os.path.realpath(file)}
    for pattern in top.include:
        full = os.path.join(base, pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(full):
            problems.append(
                problem_line(file, "include", f"cannot read {full}: No such file or directory")
            )
        for inc in matches:
            real = os.path.realpath(inc)
            if real == os.path.realpath(file):
                problems.append(problem_line(file, "include", f"{pattern!r} includes this file itself"))
            if real in read_already:
                continue
            read_already.add(real)
            inc_data = read_toml(inc, problems)
            if inc_data is None:
                continue
            for key in inc_data:
                if key != "box":
                    problems.append(problem_line(
                        inc, field_path(key),
                        "not allowed in an included file (only [box.NAME] tables)",
                    ))
            _box_tables(inc_data, inc, problems, raw_boxes)

    boxes: dict[str, BoxConfig] = {}
    for raw in raw_boxes.values():
        box = _effective_box(raw, defaults, defaults_bad, problems)
        if box is not None:
            boxes[box.name] = box
    state_dir = None if "state_dir" in top_bad else top.state_dir
    _cross_check(list(boxes.values()), state_dir, file, problems, warnings)
    if not raw_boxes and not problems:
        warnings.append(problem_line(file, "box", "no box is defined: every session will be refused"))
    if problems:
        raise ConfigError(problems)
    settings = {f.name: getattr(top, f.name) for f in settings_fields(ServerSettings)}
    return Config(source=Path(file), boxes=boxes, warnings=tuple(warnings), **settings)


def dump_config(cfg: Config) -> dict[str, Any]:
    """The effective settings as JSON-ready data (``--dump-config``)."""
    return {
        "source": str(cfg.source),
        **dump_settings(cfg),
        "boxes": {name: _dump_box(box) for name, box in cfg.boxes.items()},
        "warnings": list(cfg.warnings),
    }


def _dump_box(box: BoxConfig) -> dict[str, Any]:
    return {
        "name": box.name,
        "source": str(box.source),
        "path": str(box.path),
        "keys": [str(k) for k in box.keys],
        **dump_settings(box),
    }
