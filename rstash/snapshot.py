"""The validated configuration, remembered in state_dir between connections.

A per-connection rstash-recv (inetd nowait, systemd ``Accept=yes``, an ssh
forced command) would otherwise import pydantic and validate rstash-recv.toml
for every connection. This module owns the snapshot that spares it that
(rstash-recv(8), FILES): the JSON of the effective settings that
rstash.config produced, written to ``STATE_DIR/config-snapshot-ID.json``
(ID from the configuration's path), together with everything the result
depends on — the identity (device, inode, size, mtime) and SHA-256 of the
configuration file and of every file its ``include`` patterns match, what
those patterns match, where the box paths, key paths and state_dir lead
(symbolic links), the effective uid, the rstash version and the identity of
the modules that validate. When any of it differs, rstash.config validates
again (pydantic stays the one validator) and the snapshot is replaced.

Where state_dir is depends on the configuration: it is read from the main
file with tomllib alone (no validation; a file tomllib refuses is left to
rstash.config, which reports it).

A snapshot is trusted only when nobody but the service user could have
written it: state_dir a directory of the effective uid with no group or
other permission, the snapshot a regular file of the effective uid with
mode 0600 and one link, opened without following a symbolic link. It is
written the same way: a new file beside it, fsync, rename, fsync of the
directory. Key files are never in it (they are secrets, read per session).

This module must never import pydantic itself (it imports rstash.config only
to validate), never trust a snapshot it cannot prove, and never let a
snapshot problem stop a connection: any doubt means "validate again", any
failure to write means "no snapshot".
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from rstash import __version__
from rstash.settings import (
    BoxConfig,
    BoxPolicy,
    Config,
    ServerSettings,
    check_abs_path,
    check_strings,
    dump_settings,
    dump_value,
    settings_fields,
)
from rstash.smallfile import write_private

__all__ = ["FORMAT", "load_config", "snapshot_path"]

#: Bumped whenever the snapshot's JSON changes shape.
FORMAT = 1
#: The modules whose code decides what a configuration means: a changed one
#: (an upgrade that kept the version number) invalidates every snapshot.
_VALIDATORS = ("config.py", "settings.py", "snapshot.py", "tomlfile.py", "names.py", "units.py")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def snapshot_path(config: str | os.PathLike[str], state_dir: Path) -> Path:
    """Where the snapshot of the configuration file ``config`` lives under ``state_dir``."""
    file = os.path.abspath(os.fspath(config))
    ident = hashlib.sha256(os.fsencode(file)).hexdigest()[:16]
    return state_dir / f"config-snapshot-{ident}.json"


def load_config(path: str | os.PathLike[str]) -> Config:
    """The effective configuration of ``path``: from its snapshot when that still
    holds, else validated by rstash.config (then the snapshot is replaced).

    Raises :class:`~rstash.errors.ConfigError` exactly as rstash.config does.
    """
    file = os.path.abspath(os.fspath(path))
    key = _key(file)
    if key is not None:
        cfg = _read(key)
        if cfg is not None:
            return cfg
    from rstash import config

    cfg = config.load_config(file)
    if key is not None:
        _write(key, cfg)
    return cfg


# ---------------------------------------------------------------------------
# What a snapshot depends on. Computed before validating: a file changed
# while rstash.config reads it then no longer matches, and is validated again.


def _file_identity(path: str) -> list[Any]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    digest = hashlib.sha256(data).hexdigest()
    return [path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest, data]


def _key(file: str) -> dict[str, Any] | None:
    """Everything the validated result of ``file`` depends on, or None when the
    main file cannot even be read as TOML (rstash.config will say why)."""
    import tomllib

    try:
        main = _file_identity(file)
        data = tomllib.loads(main.pop().decode("utf-8"))
        state_dir = check_abs_path(data.get("state_dir", str(ServerSettings().state_dir)))
        patterns = check_strings(data.get("include", []))
        files = [main]
        matched = []
        for pattern in patterns:
            full = os.path.join(os.path.dirname(file), pattern)
            matches = sorted(glob.glob(full))
            matched.append([full, matches])
            for inc in matches:
                ident = _file_identity(inc)
                ident.pop()
                files.append(ident)
        code = []
        here = os.path.dirname(os.path.abspath(__file__))
        for module in _VALIDATORS:
            st = os.stat(os.path.join(here, module))
            code.append([module, st.st_size, st.st_mtime_ns])
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # tomllib.TOMLDecodeError is a ValueError
    return {
        "format": FORMAT,
        "version": __version__,
        "config": file,
        "euid": os.geteuid(),
        "state_dir": str(state_dir),
        "files": files,
        "include": matched,
        "code": code,
    }


# ---------------------------------------------------------------------------
# Reading and writing, only in a directory that only the service user controls.


def _open_state_dir(state_dir: str) -> int | None:
    """state_dir opened (not through a final symbolic link) when only the
    effective uid can write into it, else None."""
    try:
        dfd = os.open(state_dir, _OPEN_DIR)
    except OSError:
        return None
    st = os.fstat(dfd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(dfd)
        return None
    return dfd


def _read(key: dict[str, Any]) -> Config | None:
    dfd = _open_state_dir(key["state_dir"])
    if dfd is None:
        return None
    name = snapshot_path(key["config"], Path(key["state_dir"])).name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                or stat.S_IMODE(st.st_mode) != 0o600 or st.st_nlink != 1):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        snap = json.loads(b"".join(chunks))
        if snap["key"] != key:
            return None
        for path, real in snap["realpaths"]:
            if os.path.realpath(path) != real:
                return None
        return _decode(snap["config"])
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not a snapshot this version wrote: validate again and replace it.
        return None


def _write(key: dict[str, Any], cfg: Config) -> None:
    dfd = _open_state_dir(key["state_dir"])
    if dfd is None:
        return
    name = snapshot_path(key["config"], Path(key["state_dir"])).name
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
    body = json.dumps({"key": key, "realpaths": _realpaths(cfg), "config": _encode(cfg)},
                      indent=1).encode()
    try:
        write_private(dfd, name, body, tmp)
    except OSError:
        pass  # a full or read-only state_dir costs start-up time, never a connection
    finally:
        os.close(dfd)


def _realpaths(cfg: Config) -> list[list[str]]:
    """Where state_dir, box paths and key paths lead: the cross-checks between
    boxes (same directory, nesting, shared keys) depend on it."""
    paths = [cfg.state_dir]
    for box in cfg.boxes.values():
        paths.append(box.path)
        paths.extend(box.keys)
    return [[str(p), os.path.realpath(p)] for p in paths]


# ---------------------------------------------------------------------------
# The settings as JSON, in --dump-config's spelling; read back through each
# setting's own check, so that a value means what the configuration meant.


def _encode(cfg: Config) -> dict[str, Any]:
    return {
        "source": str(cfg.source),
        "settings": dump_settings(cfg),
        "boxes": [
            {"name": box.name, "path": str(box.path), "keys": [str(k) for k in box.keys],
             "source": str(box.source), "settings": dump_settings(box)}
            for box in cfg.boxes.values()
        ],
        "warnings": list(cfg.warnings),
    }


def _settings(cls: type[ServerSettings] | type[BoxPolicy], data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in settings_fields(cls):
        value = data[f.name]
        dump = f.metadata["dump"] or dump_value
        if value is None or value == dump(f.default):
            # The built-in default (which a check may refuse as written, like an empty
            # service_user) is taken as it is; None is a value of its own (no limit, no hook).
            out[f.name] = None if value is None else f.default
        else:
            out[f.name] = f.metadata["check"](value)
    return out


def _decode(data: dict[str, Any]) -> Config:
    boxes = {}
    for b in data["boxes"]:
        boxes[b["name"]] = BoxConfig(
            name=str(b["name"]), path=Path(b["path"]), keys=tuple(Path(k) for k in b["keys"]),
            source=Path(b["source"]), **_settings(BoxPolicy, b["settings"]))
    return Config(source=Path(data["source"]), boxes=boxes,
                  warnings=tuple(str(w) for w in data["warnings"]),
                  **_settings(ServerSettings, data["settings"]))
