"""Helpers for end-to-end tests: the service user, the e2e venv, processes, boxes and configs.

This module owns everything an e2e test needs to start the *real* programs safely:

* **Who runs the server.** rstash-recv refuses to serve as root, and CI runs as root. As root we
  use a system user ``rstash-e2e`` (created on first use) and prefix commands with
  ``setpriv --reuid --regid --init-groups --``, which execs in place: the pid is kept, so
  ``LISTEN_PID`` and process-group kills still work. As anybody else, the server runs as the
  current user and ``as_service`` changes nothing.
* **Which interpreter.** pyenv's interpreters live under /root (0700), which the service user
  cannot reach. As root the e2e venv is therefore built from Debian's ``/usr/bin/python3`` under a
  world-traversable root (``/var/tmp/rstash-e2e-<uid>``) and the checkout is installed into it
  *non-editable* (the service user never reads the checkout). The venv is reused while the
  installed source files hash the same; a changed tree only reinstalls the package.
* **Where files go.** e2e tests put everything the service user touches under ``e2e_dir``, a fresh
  directory below that same root, never under pytest's ``tmp_path`` (/tmp/pytest-of-root is 0700).
  We chose this over ``--basetemp`` so that plain ``pytest`` and ``tox`` behave the same.
  ``RSTASH_E2E_ROOT`` moves the root; ``RSTASH_E2E_KEEP=1`` keeps each test's directory.
* **No orphans, no unbounded waits.** Every process goes through :class:`Proc`, which writes
  stdout/stderr to files, runs in its own process group and is killed (group-wide) at teardown.
  Every wait takes a timeout.

It must never touch anything outside its root but the ``rstash-e2e`` account, never listen on
anything but loopback, and never be imported by the ``rstash`` package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

#: The checkout this file belongs to.
CHECKOUT = Path(__file__).resolve().parent.parent
#: The account the server runs as when the tests run as root.
SERVICE_USER_NAME = "rstash-e2e"
SERVICE_USER_HOME = Path("/var/lib/rstash-e2e")
#: Debian's interpreter: readable by every user, unlike pyenv's under /root.
SYSTEM_PYTHON = Path("/usr/bin/python3")
#: Where sbin programs live when PATH lacks them (tox and sudo often trim PATH).
EXTRA_PROGRAM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")
#: Top-level names of the checkout that do not end up in the installed package.
NOT_INSTALLED = frozenset({"tests", "bench", ".ci", "tox.ini", ".gitignore", "demo.sh"})

DEFAULT_TIMEOUT = 10.0


# --------------------------------------------------------------------------- CI policy


def is_ci() -> bool:
    """True under CI=true (any of 1/true/yes), where a test never skips for a missing daemon."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def need(condition: object, why: str) -> None:
    """Skip the calling test unless ``condition`` holds; under CI=true, fail it instead.

    CI installs every daemon and runs as root, so there a missing prerequisite is a broken
    pipeline, not a reason to pass quietly.
    """
    if condition:
        return
    if is_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {why}", pytrace=False)
    pytest.skip(why)


def find_program(name: str) -> str | None:
    """Path of ``name`` on PATH or in the usual sbin/bin directories, else None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_PROGRAM_DIRS])
    return shutil.which(name, path=path)


def need_program(name: str) -> str:
    """``find_program(name)``, or skip (fail under CI) when it is not installed."""
    found = find_program(name)
    need(found, f"{name} is not installed")
    assert found is not None
    return found


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------- the e2e root


def e2e_root() -> Path:
    """The world-traversable directory holding the e2e venv and every test's ``e2e_dir``.

    It lives in /var/tmp (sticky, world-writable), so we create it ourselves and refuse one that
    somebody else made or that others can write: a planted venv would run as root.
    """
    root = Path(os.environ.get("RSTASH_E2E_ROOT") or f"/var/tmp/rstash-e2e-{os.geteuid()}")
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o755, parents=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{root}: not a directory (or a symlink); remove it")
    if st.st_uid != os.geteuid():
        raise RuntimeError(f"{root}: owned by uid {st.st_uid}, not by us; remove it")
    if st.st_mode & 0o022:
        raise RuntimeError(f"{root}: writable by group or others; remove it")
    os.chmod(root, 0o755)
    return root


def untraversable_parent(path: Path) -> Path | None:
    """The first directory from ``path`` up to / that others cannot search, else None."""
    for p in [path, *path.parents]:
        if not os.stat(p).st_mode & stat.S_IXOTH:
            return p
    return None


@contextlib.contextmanager
def locked(lock_path: Path, timeout: float = 600.0) -> Iterator[None]:
    """An exclusive flock on ``lock_path``, waited for at most ``timeout`` seconds."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: still locked after {timeout} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only directories a test left behind."""

    def retry(func: Any, p: str, *_: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        func(p)

    if not path.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


# --------------------------------------------------------------------------- the service user


@dataclasses.dataclass(frozen=True)
class ServiceUser:
    """The account rstash-recv runs as in e2e tests."""

    name: str
    uid: int
    gid: int
    home: Path

    @property
    def is_current(self) -> bool:
        """True when no privilege change is needed (the tests do not run as root)."""
        return self.uid == os.geteuid()

    def wrap(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` run as this user: prefixed with setpriv when we are someone else."""
        args = [os.fspath(a) for a in argv]
        if self.is_current:
            return args
        setpriv = find_program("setpriv")
        if setpriv is None:
            raise RuntimeError("setpriv (util-linux) is not installed")
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *args]

    def env(self, **extra: str) -> dict[str, str]:
        """A minimal environment for this user; ``extra`` adds or overrides variables."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
        }
        env.update(extra)
        return env

    def chown(self, path: Path, group: int | None = None) -> None:
        """Give ``path`` to this user (a no-op unless we are root)."""
        if is_root():
            os.chown(path, self.uid, self.gid if group is None else group, follow_symlinks=False)


def _shadow_password(name: str) -> str | None:
    with open("/etc/shadow", encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            if fields[0] == name and len(fields) > 1:
                return fields[1]
    return None


def _run_admin(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def ensure_service_user() -> ServiceUser:
    """As root: the ``rstash-e2e`` system user, created if missing. Otherwise: ourselves.

    The password field is ``*`` (not the locked ``!`` useradd writes) and the shell is real, so
    sshd with ``UsePAM no`` accepts key logins for the SSH shapes.
    """
    if not is_root():
        pw = pwd.getpwuid(os.geteuid())
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))
    with locked(e2e_root() / "user.lock", timeout=120):
        try:
            pw = pwd.getpwnam(SERVICE_USER_NAME)
        except KeyError:
            useradd = find_program("useradd")
            if useradd is None:
                raise RuntimeError("useradd is not installed") from None
            _run_admin([useradd, "--system", "--user-group", "--shell", "/bin/bash",
                        "--create-home", "--home-dir", str(SERVICE_USER_HOME), SERVICE_USER_NAME])
            pw = pwd.getpwnam(SERVICE_USER_NAME)
        usermod = find_program("usermod") or "usermod"
        if _shadow_password(SERVICE_USER_NAME) != "*":
            _run_admin([usermod, "-p", "*", SERVICE_USER_NAME])
        if pw.pw_shell != "/bin/bash":
            _run_admin([usermod, "-s", "/bin/bash", SERVICE_USER_NAME])
        home = Path(pw.pw_dir)
        if not home.is_dir():
            home.mkdir(mode=0o755, parents=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, home)


_service_user: ServiceUser | None = None


def service_user() -> ServiceUser:
    """The service user, created once per process."""
    global _service_user
    if _service_user is None:
        _service_user = ensure_service_user()
    return _service_user


def as_service(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``argv`` to run as the service user (setpriv prefix when root, unchanged otherwise)."""
    return service_user().wrap(argv)


def service_env(**extra: str) -> dict[str, str]:
    """Minimal environment for the service user: PATH, LANG=C.UTF-8, HOME (+ ``extra``)."""
    return service_user().env(**extra)


# --------------------------------------------------------------------------- the e2e venv


def _installed_sources(checkout: Path) -> list[Path]:
    """Files of the checkout that can end up in the installed package, relative and sorted."""
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"],
            capture_output=True, timeout=30, check=True,
        ).stdout.decode()
        names = [Path(n) for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = [p.relative_to(checkout) for p in checkout.rglob("*")
                 if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
    return sorted(n for n in names
                  if n.parts[0] not in NOT_INSTALLED and (checkout / n).is_file()
                  and "__pycache__" not in n.parts)


def _digest(checkout: Path, names: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(str(n).encode() + b"\0")
        h.update(hashlib.sha256((checkout / n).read_bytes()).digest())
    return h.hexdigest()


def _venv_python_for_tests() -> Path:
    """Root: Debian's python3 (reachable by the service user). Others: the running interpreter."""
    if is_root():
        return SYSTEM_PYTHON
    return Path(getattr(sys, "_base_executable", sys.executable))


def _pip(venv: Path, *args: str, log: IO[str]) -> None:
    argv = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check",
            "--no-input", "install", "--quiet", *args]
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install failed ({proc.returncode}); see {log.name}")


def ensure_e2e_venv(checkout: Path = CHECKOUT, python: Path | None = None) -> tuple[Path, str]:
    """A venv with the checkout installed non-editable; returns (venv path, what happened).

    Reused as is while the installed sources hash the same; when only the package changed it is
    reinstalled without dependencies; when pyproject.toml or the interpreter changed, rebuilt.
    """
    python = python or _venv_python_for_tests()
    if not python.exists():
        raise RuntimeError(f"{python} does not exist (apt-get install python3-venv)")
    root = e2e_root()
    # One venv per interpreter and checkout: two checkouts never rebuild each other's venv.
    tag = hashlib.sha256(os.fsencode(python) + b"\0" + os.fsencode(checkout)).hexdigest()[:8]
    venv = root / f"venv-{tag}"
    stamp_path = venv / "rstash-e2e.json"
    t0 = time.monotonic()
    names = _installed_sources(checkout)
    wanted = {
        "python": str(python),
        "deps": hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest(),
        "tree": _digest(checkout, names),
    }
    with locked(root / "venv.lock"):
        try:
            have = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            have = {}
        if all(have.get(k) == v for k, v in wanted.items()) and (venv / "bin/rstash-recv").exists():
            return venv, f"reused in {time.monotonic() - t0:.2f} s"
        fresh = have.get("python") != wanted["python"] or have.get("deps") != wanted["deps"]
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=root))
        # Install from a copy of exactly the hashed files: no stale build/ from the checkout, and
        # the stamp then describes what is installed.
        for n in names:
            (stage / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkout / n, stage / n)
        try:
            with open(root / "venv-build.log", "w", encoding="utf-8") as log:
                stamp_path.unlink(missing_ok=True)
                if fresh:
                    remove_tree(venv)
                    subprocess.run([str(python), "-m", "venv", str(venv)], check=True,
                                   timeout=300, stdout=log, stderr=subprocess.STDOUT)
                    requires = tomllib.loads((checkout / "pyproject.toml").read_text())
                    build_requires = requires.get("build-system", {}).get("requires", [])
                    if build_requires:
                        _pip(venv, "--upgrade", *build_requires, log=log)
                    _pip(venv, "--no-build-isolation", str(stage), log=log)
                else:
                    _pip(venv, "--no-build-isolation", "--no-deps", "--force-reinstall",
                         str(stage), log=log)
        finally:
            remove_tree(stage)
        # Whatever our umask was, the service user must be able to read and run everything.
        for dirpath, _dirs, files in os.walk(venv):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)
            for f in files:
                fp = os.path.join(dirpath, f)
                if not os.path.islink(fp):
                    os.chmod(fp, os.stat(fp).st_mode | 0o444)
        stamp_path.write_text(json.dumps(wanted, indent=1) + "\n")
        what = "built" if fresh else "package reinstalled"
        return venv, f"{what} in {time.monotonic() - t0:.1f} s"


# --------------------------------------------------------------------------- per-test directory


def make_e2e_dir(user: ServiceUser) -> Path:
    """A fresh directory owned by ``user``, mode 0755, every parent searchable by others."""
    runs = e2e_root() / "runs"
    with contextlib.suppress(FileExistsError):
        runs.mkdir(mode=0o755)
    os.chmod(runs, 0o755)
    d = Path(tempfile.mkdtemp(prefix="t-", dir=runs))
    os.chmod(d, 0o755)
    user.chown(d)
    blocked = untraversable_parent(d)
    if blocked is not None:
        raise RuntimeError(f"{blocked} is not searchable by others; set RSTASH_E2E_ROOT")
    return d


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process with stdout/stderr in files, in its own process group, always reaped.

    Use through the ``spawn`` fixture (or a :class:`ProcGroup`), whose teardown kills whatever
    is still running. Daemons must run in the foreground (``inetd -d``, ``sshd -D -e``): a
    process that detaches into a new session escapes the group kill.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        base = log_dir / self.name
        n = 1
        while Path(f"{base}.out").exists():
            n += 1
            base = log_dir / f"{self.name}-{n}"
        self.stdout_path = Path(f"{base}.out")
        self.stderr_path = Path(f"{base}.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, stdin=stdin, stdout=out, stderr=err,
                env=dict(env) if env is not None else None, cwd=cwd,
                pass_fds=tuple(pass_fds), start_new_session=True,
            )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Exit status; on timeout the process group is killed and TimeoutError raised."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.name} still running after {timeout} s; killed.\n"
                               f"{self.describe()}") from None

    def signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM to the group; SIGKILL after ``timeout``. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole process group (even after the leader exited) and reap."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self, limit: int = 2000) -> str:
        """argv, status and the tails of stdout/stderr, for assertion messages."""
        return (f"$ {' '.join(self.argv)}\nrc={self.popen.returncode}\n"
                f"--- stdout\n{self.stdout()[-limit:]}\n--- stderr\n{self.stderr()[-limit:]}")


class ProcGroup:
    """Starts :class:`Proc` objects into one log directory and kills them all on close()."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def __call__(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> Proc:
        proc = Proc(argv, log_dir=self.log_dir, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            proc.kill()


def wait_for_port(host: str, port: int, timeout: float = DEFAULT_TIMEOUT,
                  proc: Proc | None = None) -> None:
    """Wait until a TCP connect to host:port succeeds; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family) as s:
            s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                s.connect((host, port))
                return
            except OSError:
                pass
        if proc is not None and not proc.running():
            raise RuntimeError(f"{proc.name} exited before listening on {host}:{port}\n"
                               f"{proc.describe()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.describe()}" if proc is not None else ""
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s{extra}")
        time.sleep(0.05)


def wait_until(predicate: Any, timeout: float = DEFAULT_TIMEOUT, what: str = "condition") -> None:
    """Poll ``predicate()`` every 50 ms until true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- boxes and configs


KEY_PREFIX = "rstash-key-v1"


def key_line(key: bytes, comment: str | None = None) -> str:
    """A key file's content: ``rstash-key-v1 <64 hex>[ # comment]`` and a newline."""
    assert len(key) == 32
    return f"{KEY_PREFIX} {key.hex()}" + (f" # {comment}" if comment else "") + "\n"


def write_key(path: Path, key: bytes, *, mode: int, uid: int | None = None,
              gid: int | None = None, comment: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key_line(key, comment))
    if is_root() and (uid is not None or gid is not None):
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)
    return path


@dataclasses.dataclass
class Box:
    """A box made by :func:`make_box`; ``settings`` are its extra ``[box.NAME]`` keys."""

    name: str
    path: Path
    key: bytes
    server_key: Path
    client_key: Path
    settings: dict[str, Any]

    def table(self) -> dict[str, Any]:
        """This box's ``[box.NAME]`` table (``keys`` and ``path`` may be overridden)."""
        return {"path": str(self.path), "keys": [str(self.server_key)], **self.settings}

    def url(self, port: int, host: str = "127.0.0.1") -> str:
        """``rstash://host:port/box``, the rstash-send destination."""
        h = f"[{host}]" if ":" in host else host
        return f"rstash://{h}:{port}/{self.name}"

    def files(self) -> dict[str, bytes]:
        """What is stored in the box now (temp files included), name -> content."""
        return {p.name: p.read_bytes() for p in self.path.iterdir() if p.is_file()}


def make_box(e2e_dir: Path, name: str, *, key: bytes | None = None, comment: str | None = None,
             **settings: Any) -> Box:
    """A box directory owned by the service user, and its key pair.

    Server key ``keys/NAME.key``: 0640, owner root (or us), group the service user's
    (``root:rstash 0640``, as the man page's layout). Client key ``send/NAME.key``: 0600, owned
    by whoever runs the tests. ``settings`` become ``[box.NAME]`` keys (e.g. ``pipe_mode=True``).
    """
    user = service_user()
    key = secrets.token_bytes(32) if key is None else key
    path = e2e_dir / "boxes" / name
    path.parent.mkdir(mode=0o755, exist_ok=True)
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    user.chown(path)
    for sub in ("keys", "send"):
        (e2e_dir / sub).mkdir(mode=0o755, exist_ok=True)
    comment = comment if comment is not None else f"e2e {name}"
    server_key = write_key(e2e_dir / "keys" / f"{name}.key", key, mode=0o640, uid=os.geteuid(),
                           gid=user.gid, comment=comment)
    client_key = write_key(e2e_dir / "send" / f"{name}.key", key, mode=0o600, comment=comment)
    return Box(name, path, key, server_key, client_key, dict(settings))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if isinstance(v, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}: {v!r}")


def _toml_table(header: str, table: Mapping[str, Any]) -> list[str]:
    lines = [header] if header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return lines


def config_text(e2e_dir: Path, boxes: Sequence[Box], **top: Any) -> str:
    """TOML text of an rstash-recv config (rstash-recv.toml(5)) for ``boxes``.

    Defaults: ``state_dir`` = ``e2e_dir/state`` (created 0700, owned by the service user) and
    ``log`` = ``e2e_dir/rstash-recv.log`` (created, owned by the service user). ``top`` adds or
    overrides top-level keys; ``defaults={...}`` becomes the ``[defaults]`` table.
    """
    user = service_user()
    defaults = top.pop("defaults", None)
    if "state_dir" not in top:
        state = e2e_dir / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        os.chmod(state, 0o700)
        user.chown(state)
        top["state_dir"] = str(state)
    if "log" not in top:
        log = e2e_dir / "rstash-recv.log"
        log.touch(mode=0o640)
        user.chown(log)
        top["log"] = str(log)
    lines = _toml_table("", top)
    if defaults:
        lines += ["", *_toml_table("[defaults]", defaults)]
    for box in boxes:
        lines += ["", *_toml_table(f"[box.{json.dumps(box.name)}]", box.table())]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # our own output must parse
    return text


def write_config(e2e_dir: Path, boxes: Sequence[Box], *, path: Path | None = None,
                 **top: Any) -> Path:
    """Write :func:`config_text` to ``e2e_dir/rstash-recv.toml`` (0644) and return its path."""
    path = path or e2e_dir / "rstash-recv.toml"
    path.write_text(config_text(e2e_dir, boxes, **top), encoding="utf-8")
    os.chmod(path, 0o644)
    return path


def venv_bin(venv: Path, name: str) -> str:
    """Absolute path of a program in the e2e venv, e.g. ``venv_bin(e2e_venv, "rstash-recv")``."""
    return str(venv / "bin" / name)
