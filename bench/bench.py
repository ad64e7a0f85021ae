#!/usr/bin/env python3
"""rstash benchmark: rstash against rsyncd, nc and scp on loopback, as ratios in one run.

The targets are *ratios* measured in the same run on the same machine, each judged with one
``sync -f`` of the destination after every transfer: ``rstash://`` 1 GiB <= 0.9x rsyncd and
<= 1.3x ``dd conv=fsync``, ``ssh://`` <= scp, 1000 small files <= rsyncd, a 1-byte push through
a per-connection server <= 0.75x rsyncd's, peak RSS <= 64 MiB on both sides, and connect ->
greeting under inetd <= 30 ms. This script measures exactly those and prints them beside the
targets. It reports; it does not gate: the exit status is 0 unless a transfer failed (1) or the
set-up did (2).

What it does (as root; everything on 127.0.0.1; bounded waits; everything removed at the end
unless --keep):

* a service user (``rstash-e2e`` when the test suite made it, else ``rstash-bench``), a venv
  built from /usr/bin/python3 under /var/tmp/rstash-bench with the checkout installed
  non-editable (the service user cannot read /root), a work directory beside it, one box, its
  key pair and a config that logs to a file;
* servers: ``rstash-recv --listen`` as the service user (setpriv), an rsync daemon with a
  write-only module, a test sshd (one key plain for scp, one with a forced ``rstash-recv``
  command for ssh://), ``nc -l`` per run, and ``systemd-socket-activate --inetd`` for the inetd
  start-up of both rstash-recv and rsyncd;
* every server and client runs under ``/usr/bin/time -v``, which is where the peak RSS comes
  from (for a forking server: the largest process it reaped, i.e. the biggest session).

Fairness: runs of different tools are interleaved (rep 1 of each, then rep 2, ...), every run
starts after ``sync()`` with the previous output deleted, and the source file is in the page
cache for all of them. rstash fsyncs every file before its receipt (rstash-recv(8)); rsync,
nc and scp do not. So every transfer is timed twice: when the client exits (as the tool runs)
and when one ``sync -f`` of the destination's file system has returned after it (what a user
who needs the data on disk would pay); the targets are judged on the second figure.

Usage: ``sudo python3 bench/bench.py [--quick] [--size 1GiB] [--repeat 3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

CHECKOUT = Path(__file__).resolve().parent.parent
BASE = Path("/var/tmp/rstash-bench")
SYSTEM_PYTHON = Path("/usr/bin/python3")
SERVICE_USERS = ("rstash-e2e", "rstash-bench")  # reuse the test suite's account when present
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RSS_TARGET_KIB = 64 * 1024
BOX = "bench"
GNU_TIME = "/usr/bin/time"

# --------------------------------------------------------------------------- small helpers


class BenchError(Exception):
    """The set-up failed: nothing meaningful can be measured."""


class TransferFailed(Exception):
    """A measured transfer failed: the numbers of that run are meaningless."""


_UNITS = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "M": 1024**2, "MIB": 1024**2, "G": 1024**3,
          "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(text: str) -> int:
    """``1GiB``, ``64MiB``, ``4096``: the benchmark's own tiny parser (it never imports rstash)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 64MiB, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def human_size(n: float) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.4g} {unit}"
    return f"{int(n)} B"


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHON* variables (rstash-recv would re-exec itself under -I) and a fixed locale."""
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    """True when a socket listens on 127.0.0.1:port, *without* connecting (nc -l takes one)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:])


def wait_for(predicate: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited ({proc.popen.returncode}) before {what}\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not after {timeout} s" + (f"\n{proc.tail()}" if proc else ""))
        time.sleep(0.02)


def run(argv: Sequence[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """A set-up command that must succeed."""
    kw.setdefault("env", clean_env())
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def rss_kib(path: Path) -> int | None:
    """``Maximum resident set size (kbytes)`` from a ``/usr/bin/time -v -o`` file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(m.group(1)) if m else None


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- processes


class Proc:
    """A background process in its own process group, output in files, always killed at the end."""

    def __init__(self, argv: Sequence[str], name: str, log_dir: Path, *, env: dict[str, str] | None = None,
                 stdin: int | IO[Any] | None = subprocess.DEVNULL, stdout: IO[Any] | None = None,
                 cwd: Path | None = None, timed: bool = False) -> None:
        self.name = name
        self.timed = timed  # argv starts with /usr/bin/time: signal its child, not the group
        self.argv = list(argv)
        self.err_path = log_dir / f"{name}.err"
        self.out_path = log_dir / f"{name}.out"
        with open(self.err_path, "ab") as err, open(self.out_path, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout or out, stderr=err,
                                          env=env or clean_env(), cwd=cwd, start_new_session=True)

    def tail(self, limit: int = 1500) -> str:
        text = ""
        for p in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text += p.read_text(errors="replace")[-limit:]
        return f"$ {shlex.join(self.argv)}\n{text}"

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TransferFailed(f"{self.name}: still running after {timeout:.0f} s, killed\n{self.tail()}") from None

    def child_pid(self) -> int | None:
        """The one child of this process (the program under ``/usr/bin/time``)."""
        try:
            kids = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the program under time (so that time still writes its report), then the group."""
        if self.popen.poll() is None:
            target = self.child_pid() if self.timed else None
            with contextlib.suppress(ProcessLookupError):
                if target is not None:
                    os.kill(target, signal.SIGTERM)
                else:
                    os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


# --------------------------------------------------------------------------- set-up


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """Run as the service user: setpriv execs in place, so pids and signals stay simple."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]

    def chown(self, *paths: Path) -> None:
        for p in paths:
            os.chown(p, self.uid, self.gid, follow_symlinks=False)


def ensure_tools() -> None:
    if not Path(GNU_TIME).exists():
        print("installing GNU time (apt-get install -y time)", file=sys.stderr)
        run(["apt-get", "install", "-y", "-q", "time"], timeout=600,
            env=clean_env(DEBIAN_FRONTEND="noninteractive"))
    missing = [t for t in ("rsync", "nc", "sshd", "ssh", "scp", "ssh-keygen", "setpriv",
                           "systemd-socket-activate", "useradd")
               if shutil.which(t, path=PATH) is None]
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} "
                         "(apt-get install rsync netcat-openbsd openssh-server openssh-client systemd)")


def ensure_user() -> User:
    """The test suite's service user when present; else a system user made for the benchmark.

    Password field ``*`` (not ``!``) and a real shell, so that sshd with ``UsePAM no`` lets the
    scp and ssh:// runs log in with a key.
    """
    for name in SERVICE_USERS:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            break
    else:
        name = SERVICE_USERS[-1]
        run(["useradd", "--system", "--user-group", "--shell", "/bin/bash", "--no-create-home",
             "--home-dir", "/nonexistent", name])
        pw = pwd.getpwnam(name)
    run(["usermod", "-p", "*", "-s", "/bin/bash", name])
    return User(name, pw.pw_uid, pw.pw_gid)


def make_base(path: Path) -> Path:
    """A root-owned 0755 directory under /var/tmp (sticky, world-writable: refuse a planted one)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755, parents=True)
    st = os.lstat(path)
    if not path.is_dir() or path.is_symlink() or st.st_uid != 0 or st.st_mode & 0o022:
        raise BenchError(f"{path}: not a root-owned directory only root can write; remove it")
    return path


def installed_sources() -> list[str]:
    out = run(["git", "-C", str(CHECKOUT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    skip = {"tests", "bench", ".ci"}
    return sorted(n for n in out.split("\0") if n and n.split("/")[0] not in skip and (CHECKOUT / n).is_file())


def ensure_venv(venv: Path) -> Path:
    """/usr/bin/python3 venv with the checkout installed non-editable; reinstalled when it changed.

    pip installs from a copy of exactly the tracked files: a stale ``build/`` in the checkout
    must not leak old modules into what we measure.
    """
    names = installed_sources()
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + hashlib.sha256((CHECKOUT / n).read_bytes()).digest())
    stamp = venv / "rstash-bench.stamp"
    if (venv / "bin/rstash-recv").exists() and stamp.exists() and stamp.read_text() == h.hexdigest():
        return venv
    print(f"installing rstash from {CHECKOUT} into {venv}", file=sys.stderr)
    if not (venv / "bin/python").exists():
        run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], timeout=300)
    stage = Path(tempfile.mkdtemp(prefix="stage-", dir=venv.parent))
    try:
        for n in names:
            (stage / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CHECKOUT / n, stage / n)
        # --no-cache-dir: a wheel cached from an earlier tree of the same version must not win.
        run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-cache-dir", "--force-reinstall", str(stage)], timeout=900)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for dirpath, _dirs, files in os.walk(venv):  # the service user must read and run all of it
        os.chmod(dirpath, 0o755)
        for f in files:
            fp = os.path.join(dirpath, f)
            if not os.path.islink(fp):
                os.chmod(fp, os.stat(fp).st_mode | 0o444)
    check_installed(venv, names)
    stamp.write_text(h.hexdigest())
    return venv


def differing_modules(venv: Path, names: Sequence[str]) -> list[str]:
    """The checkout's rstash modules that the venv has in another version (or not at all)."""
    site = next(venv.glob("lib/python3*/site-packages"))
    return [n for n in names if n.startswith("rstash/") and n.endswith(".py")
            and (not (site / n).exists() or (site / n).read_bytes() != (CHECKOUT / n).read_bytes())]


def check_installed(venv: Path, names: Sequence[str]) -> None:
    """Refuse to measure anything but the checkout's own modules."""
    stale = differing_modules(venv, names)
    if stale:
        raise BenchError(f"{venv}: installed {', '.join(stale)} differ from the checkout")


def write_random(path: Path, size: int) -> None:
    """Incompressible content from os.urandom, in 4 MiB blocks (nothing buffers the whole file)."""
    block = 4 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


@dataclasses.dataclass
class Env:
    """Everything the measurements share."""

    opts: argparse.Namespace
    user: User
    venv: Path
    work: Path
    procs: list[Proc]
    payload: Path = Path()
    tiny: Path = Path()
    small_dir: Path = Path()
    small_names: list[str] = dataclasses.field(default_factory=list)
    conf: Path = Path()
    box: Path = Path()
    client_key: Path = Path()
    rsync_mod: Path = Path()
    scp_dir: Path = Path()
    nc_dir: Path = Path()
    ssh_key_scp: Path = Path()
    ssh_key_rstash: Path = Path()
    known_hosts: Path = Path()
    counter: int = 0

    @property
    def recv(self) -> str:
        return str(self.venv / "bin/rstash-recv")

    @property
    def send(self) -> str:
        return str(self.venv / "bin/rstash-send")

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def unique(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter:03d}"

    def spawn(self, argv: Sequence[str], name: str, **kw: Any) -> Proc:
        proc = Proc(argv, name, self.logs, **kw)
        self.procs.append(proc)
        return proc

    def ssh_opts(self, key: Path) -> list[str]:
        return ["-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def set_up(opts: argparse.Namespace, procs: list[Proc]) -> Env:
    ensure_tools()
    user = ensure_user()
    base = make_base(BASE)
    if opts.venv:  # used as it is: e.g. a checkout with a fix under trial
        venv = Path(opts.venv)
        if not (venv / "bin/rstash-recv").exists():
            raise BenchError(f"{venv}: no bin/rstash-recv")
        stale = differing_modules(venv, installed_sources())
        if stale:
            print(f"NOTE: {venv} differs from the checkout in {', '.join(stale)}", file=sys.stderr)
        opts.venv_differs = stale
    else:
        # One venv per checkout: benchmarks of two worktrees must not reinstall each other's.
        venv = ensure_venv(base / f"venv-{hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:8]}")
        opts.venv_differs = []
    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    os.chmod(work, 0o755)
    env = Env(opts, user, venv, work, procs)
    for d in ("logs", "keys", "send", "box", "state", "rsyncd", "scp", "nc", "ssh", "rss", "src"):
        (work / d).mkdir(mode=0o755)
    os.chmod(work / "state", 0o700)
    os.chmod(work / "send", 0o700)
    env.box = work / "box" / BOX
    env.box.mkdir(mode=0o755)
    env.rsync_mod = work / "rsyncd" / "mod"
    env.rsync_mod.mkdir(mode=0o755)
    env.scp_dir, env.nc_dir = work / "scp", work / "nc"
    user.chown(env.box, env.rsync_mod, env.scp_dir, work / "state", work / "rss")

    print(f"generating {human_size(opts.size)} of random data and {opts.files} x "
          f"{human_size(opts.file_size)} files in {work}", file=sys.stderr)
    env.payload = work / "src" / "payload.bin"
    write_random(env.payload, opts.size)
    env.tiny = work / "src" / "tiny"
    env.tiny.write_bytes(b"x")
    env.small_dir = work / "src" / "small"
    env.small_dir.mkdir()
    width = max(4, len(str(opts.files)))
    env.small_names = [f"f{i:0{width}d}" for i in range(1, opts.files + 1)]
    for n in env.small_names:
        (env.small_dir / n).write_bytes(os.urandom(opts.file_size))

    server_key = work / "keys" / f"{BOX}.key"
    run([env.recv, "--gen-key", str(server_key), "--comment", "bench"])
    os.chown(server_key, 0, user.gid)
    os.chmod(server_key, 0o640)
    env.client_key = work / "send" / f"{BOX}.key"
    shutil.copyfile(server_key, env.client_key)
    os.chmod(env.client_key, 0o600)
    log = work / "rstash-recv.log"
    log.touch(mode=0o640)
    user.chown(log)
    env.conf = work / "rstash-recv.toml"
    env.conf.write_text(
        f'state_dir = "{work / "state"}"\n'
        f'log = "{log}"\n'
        "idle_timeout = 120\n"
        "preauth_timeout = 30\n"
        "max_sessions = 64\n"
        "max_preauth_per_peer = 64\n"
        f'\n[box.{BOX}]\npath = "{env.box}"\nkeys = ["{server_key}"]\n', encoding="utf-8")
    os.chmod(env.conf, 0o644)
    run(user.wrap([env.recv, "-c", str(env.conf), "-t"]))
    return env


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    proc: Proc
    port: int
    rss_file: Path


def start_rstash_listen(env: Env, name: str) -> Server:
    port = free_port()
    rss_file = env.work / "rss" / f"{name}.time"
    argv = [GNU_TIME, "-v", "-o", str(rss_file),
            *env.user.wrap([env.recv, "-c", str(env.conf), "--listen", f"127.0.0.1:{port}"])]
    proc = env.spawn(argv, name, timed=True)
    wait_for(lambda: is_listening(port), 15, f"{name} listening on {port}", proc)
    return Server(proc, port, rss_file)


def start_rsyncd(env: Env) -> Server:
    port = free_port()
    conf = env.work / "rsyncd" / "rsyncd.conf"
    conf.write_text(
        f"log file = {env.work / 'logs' / 'rsyncd.log'}\n"
        "use chroot = no\n"
        f"lock file = {env.work / 'rsyncd' / 'rsyncd.lock'}\n"
        f"[mod]\npath = {env.rsync_mod}\nread only = no\nwrite only = yes\n"
        f"uid = {env.user.name}\ngid = {env.user.name}\n", encoding="utf-8")
    rss_file = env.work / "rss" / "rsyncd.time"
    argv = [GNU_TIME, "-v", "-o", str(rss_file), "rsync", "--daemon", "--no-detach", f"--config={conf}",
            f"--port={port}", "--address=127.0.0.1"]
    proc = env.spawn(argv, "rsyncd", timed=True)
    wait_for(lambda: is_listening(port), 15, f"rsyncd listening on {port}", proc)
    return Server(proc, port, rss_file)


def start_sshd(env: Env) -> Server:
    """A test sshd: key A plain (scp, over sftp), key B forced to ``time -v rstash-recv -c CONF``."""
    d = env.work / "ssh"
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key = d / "host_ed25519"
    env.ssh_key_scp, env.ssh_key_rstash = d / "client_scp", d / "client_rstash"
    env.known_hosts = d / "known_hosts"
    for key in (host_key, env.ssh_key_scp, env.ssh_key_rstash):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)])
    rss_file = env.work / "rss" / "ssh-recv.time"
    forced = shlex.join([GNU_TIME, "-v", "-o", str(rss_file), env.recv, "-c", str(env.conf)])
    keys = d / "authorized_keys"
    keys.write_text(Path(f"{env.ssh_key_scp}.pub").read_text()
                    + f'restrict,command="{forced}" ' + Path(f"{env.ssh_key_rstash}.pub").read_text())
    os.chmod(keys, 0o644)
    port = free_port()
    conf = d / "sshd_config"
    conf.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", "PidFile none", "UsePAM no",
        "StrictModes no", f"AuthorizedKeysFile {keys}", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", f"AllowUsers {env.user.name}",
        "PrintMotd no", "PrintLastLog no", "Subsystem sftp internal-sftp", "LogLevel INFO",
    ]) + "\n", encoding="utf-8")
    run(["/usr/sbin/sshd", "-t", "-f", str(conf)])
    proc = env.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)], "sshd")
    wait_for(lambda: is_listening(port), 15, f"sshd listening on {port}", proc)
    return Server(proc, port, rss_file)


def start_inetd(env: Env, name: str, command: Sequence[str], extra: Sequence[str] = ()) -> Server:
    """``systemd-socket-activate --inetd -a``: one fresh process per connection, like inetd nowait."""
    port = free_port()
    argv = ["systemd-socket-activate", "--inetd", "-a", "-l", f"127.0.0.1:{port}", *extra, *command]
    proc = env.spawn(argv, name)
    wait_for(lambda: is_listening(port), 15, f"{name} listening on {port}", proc)
    return Server(proc, port, Path())


# --------------------------------------------------------------------------- one timed transfer


@dataclasses.dataclass
class Run:
    #: until the client exited: the tool as it runs
    seconds: float
    client_rss_kib: int | None
    #: until one ``sync -f`` of the destination returned after that: the data is on disk
    synced: float


def sync_f(dest: Path, t0: float) -> float:
    """``sync -f DEST`` (syncfs(2) of its file system); seconds from ``t0`` until it returned.

    rsyncd, nc and scp leave their output in the page cache; a user who needs it on disk
    pays this once per transfer. rstash already fsynced before its receipts, so for it
    this is a nearly empty sync, paid the same way.
    """
    rc = subprocess.run(["sync", "-f", str(dest)], timeout=600, check=False).returncode
    if rc != 0:
        raise TransferFailed(f"sync -f {dest}: exit {rc}")
    return time.monotonic() - t0


def timed_client(env: Env, argv: Sequence[str], name: str, timeout: float, *, dest: Path,
                 cwd: Path | None = None) -> Run:
    """Run a client under ``time -v``; wall time measured here, around the whole process,
    then once more after ``sync -f`` of ``dest``."""
    rss_file = env.work / "rss" / f"{name}.time"
    os.sync()  # the previous run's dirty pages must not be flushed on this run's clock
    t0 = time.monotonic()
    proc = Proc([GNU_TIME, "-v", "-o", str(rss_file), *argv], name, env.logs, cwd=cwd)
    env.procs.append(proc)
    rc = proc.wait(timeout)
    seconds = time.monotonic() - t0
    if rc != 0:
        raise TransferFailed(f"{name}: exit {rc}\n{proc.tail()}")
    return Run(seconds, rss_kib(rss_file), sync_f(dest, t0))


def expect_file(path: Path, size: int, what: str) -> None:
    try:
        got = path.stat().st_size
    except OSError:
        raise TransferFailed(f"{what}: {path} was not stored") from None
    if got != size:
        raise TransferFailed(f"{what}: {path} has {got} bytes, not {size}")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def transfer_timeout(size: int) -> float:
    return 30 + size / (10 << 20)  # 10 MiB/s: an order of magnitude below every tool here


def send_cmd(env: Env) -> list[str]:
    # --timeout bounds a stalled session well inside transfer_timeout (the default is 120 s).
    return [env.send, "--no-progress", "-q", "--timeout", "30"]


def big_rstash(env: Env, server: Server) -> Run:
    name = env.unique("big")
    r = timed_client(env, [*send_cmd(env), "-k", str(env.client_key), "--name", name,
                           f"rstash://127.0.0.1:{server.port}/{BOX}", str(env.payload)],
                     name, transfer_timeout(env.opts.size), dest=env.box)
    expect_file(env.box / name, env.opts.size, "rstash://")
    remove(env.box / name)
    return r


def big_rsyncd(env: Env, server: Server) -> Run:
    name = env.unique("rsync")
    r = timed_client(env, ["rsync", str(env.payload), f"rsync://127.0.0.1:{server.port}/mod/{name}"],
                     name, transfer_timeout(env.opts.size), dest=env.rsync_mod)
    expect_file(env.rsync_mod / name, env.opts.size, "rsyncd")
    remove(env.rsync_mod / name)
    return r


def big_nc(env: Env) -> Run:
    """``nc -l`` into a file vs ``nc -N`` from it; the clock stops when both have exited."""
    name = env.unique("nc")
    port = free_port()
    out = env.nc_dir / name
    with open(out, "wb") as sink:
        receiver = env.spawn(["nc", "-l", "127.0.0.1", str(port)], f"{name}-l", stdout=sink)
    wait_for(lambda: is_listening(port), 10, f"nc -l on {port}", receiver)
    os.sync()
    t0 = time.monotonic()
    with open(env.payload, "rb") as src:
        sender = env.spawn(["nc", "-N", "127.0.0.1", str(port)], name, stdin=src)
    rc_s = sender.wait(transfer_timeout(env.opts.size))
    rc_r = receiver.wait(30)
    seconds = time.monotonic() - t0
    if rc_s or rc_r:
        raise TransferFailed(f"nc: exit {rc_s}/{rc_r}\n{sender.tail()}\n{receiver.tail()}")
    synced = sync_f(env.nc_dir, t0)
    expect_file(out, env.opts.size, "nc")
    remove(out)
    return Run(seconds, None, synced)


def big_floor(env: Env) -> Run:
    """The disk's floor: ``dd`` copies the file and fsyncs it once (no network, no checksum)."""
    name = env.unique("dd")
    out = env.nc_dir / name
    r = timed_client(env, ["dd", f"if={env.payload}", f"of={out}", "bs=1M", "conv=fsync",
                           "status=none"], name, transfer_timeout(env.opts.size), dest=env.nc_dir)
    expect_file(out, env.opts.size, "dd")
    remove(out)
    return r


def big_scp(env: Env, server: Server) -> Run:
    name = env.unique("scp")
    r = timed_client(env, ["scp", "-q", "-P", str(server.port), *env.ssh_opts(env.ssh_key_scp), str(env.payload),
                           f"{env.user.name}@127.0.0.1:{env.scp_dir / name}"],
                     name, transfer_timeout(env.opts.size), dest=env.scp_dir)
    expect_file(env.scp_dir / name, env.opts.size, "scp")
    remove(env.scp_dir / name)
    return r


def big_rstash_ssh(env: Env, server: Server) -> tuple[Run, int | None]:
    name = env.unique("ssh")
    remove(server.rss_file)
    rsh = shlex.join(["ssh", *env.ssh_opts(env.ssh_key_rstash)])
    r = timed_client(env, [*send_cmd(env), "-k", str(env.client_key), "-e", rsh, "--name", name,
                           f"ssh://{env.user.name}@127.0.0.1:{server.port}/{BOX}", str(env.payload)],
                     name, transfer_timeout(env.opts.size), dest=env.box)
    expect_file(env.box / name, env.opts.size, "ssh://")
    remove(env.box / name)
    # time(1) under the forced command writes its report as the session ends, maybe just after
    # the client has its 221: give it a moment.
    with contextlib.suppress(BenchError):
        wait_for(lambda: rss_kib(server.rss_file) is not None, 5, "ssh:// server time report")
    return r, rss_kib(server.rss_file)


def small_rstash(env: Env, server: Server) -> Run:
    tag = env.unique("small")
    r = timed_client(env, [*send_cmd(env), "-k", str(env.client_key),
                           f"rstash://127.0.0.1:{server.port}/{BOX}", *env.small_names],
                     tag, transfer_timeout(env.opts.files * env.opts.file_size), dest=env.box,
                     cwd=env.small_dir)
    stored = [p for p in env.box.iterdir() if p.name in set(env.small_names)]
    if len(stored) != len(env.small_names):
        raise TransferFailed(f"rstash:// small files: {len(stored)} of {len(env.small_names)} stored")
    for p in env.box.iterdir():
        remove(p)
    return r


def small_rsyncd(env: Env, server: Server) -> Run:
    tag = env.unique("rsmall")
    r = timed_client(env, ["rsync", "-r", f"{env.small_dir}/", f"rsync://127.0.0.1:{server.port}/mod/{tag}/"],
                     tag, transfer_timeout(env.opts.files * env.opts.file_size), dest=env.rsync_mod)
    n = len(list((env.rsync_mod / tag).iterdir()))
    if n != len(env.small_names):
        raise TransferFailed(f"rsyncd small files: {n} of {len(env.small_names)} stored")
    remove(env.rsync_mod / tag)
    return r


def tiny_rstash(env: Env, server: Server) -> Run:
    """One 1-byte file through a per-connection rstash-recv: both programs' start-up, whole."""
    name = env.unique("tiny")
    r = timed_client(env, [*send_cmd(env), "-k", str(env.client_key), "--name", name,
                           f"rstash://127.0.0.1:{server.port}/{BOX}", str(env.tiny)], name, 60, dest=env.box)
    expect_file(env.box / name, 1, "rstash:// 1 byte")
    remove(env.box / name)
    return r


def tiny_rsyncd(env: Env, server: Server) -> Run:
    name = env.unique("rtiny")
    r = timed_client(env, ["rsync", str(env.tiny), f"rsync://127.0.0.1:{server.port}/mod/{name}"], name, 60,
                     dest=env.rsync_mod)
    expect_file(env.rsync_mod / name, 1, "rsyncd 1 byte")
    remove(env.rsync_mod / name)
    return r


# --------------------------------------------------------------------------- start-up


def time_to_first_byte(port: int, count: int) -> list[float]:
    """connect() to the first byte of the greeting, ``count`` times, one connection at a time."""
    out: list[float] = []
    for _ in range(count):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            if not s.recv(1):
                raise TransferFailed(f"port {port}: closed without a greeting")
            out.append(time.monotonic() - t0)
        time.sleep(0.05)  # let the previous session notice EOF and exit: no overlap
    return out


def parse_importtime(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append({"module": m.group(4), "self_us": int(m.group(1)), "cumulative_us": int(m.group(2)),
                         "depth": len(m.group(3)) // 2})
    return rows


def measure_importtime(env: Env) -> dict[str, Any]:
    """Imports of a real inetd session: ``python -X importtime rstash-recv`` serving one send,
    after the sessions above (so with the configuration snapshot of rstash-recv(8) FILES in place).

    -X (not PYTHONPROFILEIMPORTTIME): rstash-recv re-execs itself under -I when it sees PYTHON*
    variables. The venv's script, not ``-m``: ``-m`` would import a checkout in the current
    directory instead of the venv's rstash. The interpreter's stderr is socket-activate's, i.e. our file.
    """
    cmd = env.user.wrap([str(env.venv / "bin/python"), "-X", "importtime", env.recv, "-c", str(env.conf)])
    server = start_inetd(env, "inetd-importtime", cmd)
    try:
        src = env.small_dir / env.small_names[0]
        timed_client(env, [*send_cmd(env), "-k", str(env.client_key), "--name", "importtime",
                           f"rstash://127.0.0.1:{server.port}/{BOX}", str(src)], "send-importtime", 60,
                     dest=env.box)
        wait_for(lambda: "rstash.session" in server.proc.err_path.read_text(errors="replace"), 10,
                 "importtime report")
        time.sleep(0.3)
    finally:
        server.proc.stop()
        remove(env.box / "importtime")
    rows = parse_importtime(server.proc.err_path.read_text(errors="replace"))
    total = sum(r["self_us"] for r in rows)
    top = sorted(rows, key=lambda r: r["cumulative_us"], reverse=True)
    # Per top-level package outside rstash: its outermost import (largest cumulative time).
    packages: dict[str, dict[str, Any]] = {}
    for r in rows:
        pkg = r["module"].split(".")[0]
        if pkg != "rstash" and r["cumulative_us"] > packages.get(pkg, {"cumulative_us": -1})["cumulative_us"]:
            packages[pkg] = r
    heavy = sorted(packages.values(), key=lambda r: r["cumulative_us"], reverse=True)
    return {"total_us": total, "modules": len(rows), "top": top[:12], "heaviest_packages": heavy[:10]}


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Results:
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    rss: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    failed: set[str] = dataclasses.field(default_factory=set)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, key: str, run_: Run, rss_key: str | None = None) -> None:
        self.times.setdefault(key, []).append(run_.seconds)
        self.times.setdefault(f"{key}_synced", []).append(run_.synced)
        if rss_key and run_.client_rss_kib is not None:
            self.rss.setdefault(rss_key, []).append(run_.client_rss_kib)

    def add_rss(self, key: str, kib: int | None) -> None:
        if kib is not None:
            self.rss.setdefault(key, []).append(kib)

    def attempt(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, or None when it failed now or before: a failed tool is not run again."""
        if what in self.failed:
            return None
        try:
            return fn(*args)
        except TransferFailed as e:
            self.failed.add(what)
            self.errors.append(f"{what}: {e}")
            print(f"FAILED {what} (its remaining runs are skipped): {e}", file=sys.stderr)
            return None


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(env: Env) -> Results:
    res = Results()
    n = env.opts.repeat
    rstash_big = start_rstash_listen(env, "recv-listen-big")
    rsyncd = start_rsyncd(env)
    sshd = None if env.opts.no_ssh else start_sshd(env)

    for i in range(1, n + 1):
        progress(f"{human_size(env.opts.size)}: rep {i}/{n}")
        if (r := res.attempt("rstash://", big_rstash, env, rstash_big)) is not None:
            res.add("big_rstash", r, "client_rstash")
        if (r := res.attempt("rsyncd", big_rsyncd, env, rsyncd)) is not None:
            res.add("big_rsyncd", r, "client_rsync")
        if (r := res.attempt("nc", big_nc, env)) is not None:
            res.add("big_nc", r)
        if (r := res.attempt("dd conv=fsync", big_floor, env)) is not None:
            res.add("big_floor", r)
        if sshd is not None:
            if (r := res.attempt("scp", big_scp, env, sshd)) is not None:
                res.add("big_scp", r, "client_scp")
            if (got := res.attempt("ssh://", big_rstash_ssh, env, sshd)) is not None:
                res.add("big_ssh", got[0], "client_ssh")
                res.add_rss("server_ssh", got[1])
    rstash_big.proc.stop()
    res.add_rss("server_rstash", rss_kib(rstash_big.rss_file))

    rstash_small = start_rstash_listen(env, "recv-listen-small")
    for i in range(1, n + 1):
        progress(f"{env.opts.files} x {human_size(env.opts.file_size)}: rep {i}/{n}")
        if (r := res.attempt("rstash:// small files", small_rstash, env, rstash_small)) is not None:
            res.add("small_rstash", r)
        if (r := res.attempt("rsyncd small files", small_rsyncd, env, rsyncd)) is not None:
            res.add("small_rsyncd", r)

    progress(f"start-up: {env.opts.connections} connections each")
    recv_cmd = env.user.wrap([env.recv, "-c", str(env.conf)])
    rsync_conf = str(env.work / "rsyncd" / "rsyncd.conf")
    shapes = [("startup_rstash_inetd", start_inetd(env, "inetd-recv", recv_cmd)),
              ("startup_rsyncd_inetd", start_inetd(env, "inetd-rsyncd", ["/usr/bin/rsync", "--daemon",
                                                                         f"--config={rsync_conf}"])),
              ("startup_rstash_listen", rstash_small), ("startup_rsyncd_daemon", rsyncd),
              # The floor of any Python server: the same interpreter, isolated, writing one byte.
              ("startup_python_floor", start_inetd(env, "inetd-python", env.user.wrap([
                  str(env.venv / "bin/python"), "-I", "-c", "import os; os.write(1, b'2'); os.read(0, 1)"])))]
    for key, server in shapes:
        got = res.attempt(key, time_to_first_byte, server.port, env.opts.connections)
        if got:
            res.times[key] = got
    tiny_runs = max(n, 5)
    progress(f"1-byte push through inetd: {tiny_runs} each")
    for _ in range(tiny_runs):
        if (r := res.attempt("rstash:// 1 byte (inetd)", tiny_rstash, env, shapes[0][1])) is not None:
            res.add("tiny_rstash", r)
        if (r := res.attempt("rsyncd 1 byte (inetd)", tiny_rsyncd, env, shapes[1][1])) is not None:
            res.add("tiny_rsyncd", r)
    for _, server in (*shapes[:2], shapes[4]):
        server.proc.stop()
    rstash_small.proc.stop()
    rsyncd.proc.stop()
    res.add_rss("server_rsyncd", rss_kib(rsyncd.rss_file))
    if sshd is not None:
        sshd.proc.stop()

    progress("import times of an inetd session")
    try:
        res.extra["importtime_server"] = measure_importtime(env)
    except (TransferFailed, BenchError) as e:
        res.errors.append(f"importtime: {e}")
    return res


# --------------------------------------------------------------------------- report


def fmt_s(xs: list[float] | None) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} s (min {min(xs):.2f})"


def fmt_ms(xs: list[float] | None) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs) * 1000:.1f} ms (min {min(xs) * 1000:.1f})"


def fmt_rss(xs: list[int] | None) -> str:
    return f"{max(xs) / 1024:.1f} MiB" if xs else "-"


def ratio(a: list[float] | None, b: list[float] | None) -> float | None:
    ma, mb = median(a or []), median(b or [])
    return ma / mb if ma is not None and mb else None


def report(env: Env, res: Results) -> tuple[str, dict[str, Any]]:
    t, rss = res.times, res.rss
    size = human_size(env.opts.size)
    rows: list[tuple[str, str, str, str, str, str]] = []

    def verdict(value: float | None, limit: float) -> str:
        if limit == float("inf"):
            return "-"
        if value is None:
            return "n/a"
        return "ok" if value <= limit else "MISSED"

    def fmt_ratio(r: float | None) -> str:
        return f"{r:.2f}x" if r is not None else "-"

    ratios: dict[str, float | None] = {}

    def time_rows(key: str, label: str, a: str, b: str, ref: str, target: float, target_text: str,
                  fmt: Any = fmt_s) -> None:
        """Two rows: with one ``sync -f`` after each transfer (the targets), and as run (info)."""
        r = ratio(t.get(f"{a}_synced"), t.get(f"{b}_synced"))
        rows.append((f"{label}, + sync -f", fmt(t.get(f"{a}_synced")), f"{ref} {fmt(t.get(f'{b}_synced'))}",
                     fmt_ratio(r), target_text, verdict(r, target)))
        as_run = ratio(t.get(a), t.get(b))
        rows.append((f"{label}, as run", fmt(t.get(a)), f"{ref} {fmt(t.get(b))}", fmt_ratio(as_run), "info", "-"))
        ratios[key], ratios[f"{key}_as_run"] = r, as_run

    inf = float("inf")
    time_rows("big_rstash_vs_rsyncd", f"{size} rstash://", "big_rstash", "big_rsyncd", "rsyncd", 0.9, "<= 0.9x")
    time_rows("big_rstash_vs_floor", f"{size} rstash:// vs disk", "big_rstash", "big_floor", "dd conv=fsync",
              1.3, "<= 1.3x")
    time_rows("big_rstash_vs_nc", f"{size} rstash:// vs nc", "big_rstash", "big_nc", "nc", inf, "info")
    time_rows("big_rsyncd_vs_nc", f"{size} rsyncd vs nc", "big_rsyncd", "big_nc", "nc", inf, "info")
    time_rows("big_ssh_vs_scp", f"{size} ssh://", "big_ssh", "big_scp", "scp", 1.0, "<= 1.0x")
    time_rows("small_rstash_vs_rsyncd", f"{env.opts.files} x {human_size(env.opts.file_size)} rstash://",
              "small_rstash", "small_rsyncd", "rsyncd", 1.0, "<= 1.0x")
    time_rows("tiny_rstash_vs_rsyncd", "1-byte push, inetd, whole", "tiny_rstash", "tiny_rsyncd", "rsyncd",
              0.75, "<= 0.75x (aim 0.5x)", fmt_ms)
    for label, a, b, ref in (("peak RSS client rstash://", "client_rstash", "client_rsync", "rsync"),
                             ("peak RSS server rstash:// (--listen)", "server_rstash", "server_rsyncd", "rsyncd"),
                             ("peak RSS client ssh://", "client_ssh", "client_scp", "scp"),
                             ("peak RSS server ssh:// (forced cmd)", "server_ssh", "", "")):
        peak = max(rss[a]) if rss.get(a) else None
        rows.append((label, fmt_rss(rss.get(a)), f"{ref} {fmt_rss(rss.get(b))}" if ref else "-", "-",
                     "<= 64 MiB", verdict(peak, RSS_TARGET_KIB)))
    for label, a, b, ref, limit in (("start-up inetd (connect->greeting)", "startup_rstash_inetd",
                                     "startup_rsyncd_inetd", "rsyncd inetd", 0.030),
                                    ("start-up inetd, interpreter floor", "startup_python_floor",
                                     "startup_rsyncd_inetd", "rsyncd inetd", None),
                                    ("start-up --listen (fork)", "startup_rstash_listen", "startup_rsyncd_daemon",
                                     "rsyncd daemon", None)):
        r = ratio(t.get(a), t.get(b))
        mine = median(t.get(a) or [])
        rows.append((label, fmt_ms(t.get(a)), f"{ref} {fmt_ms(t.get(b))}", fmt_ratio(r),
                     "<= 30 ms" if limit else "reported", verdict(mine, limit) if limit else "-"))
        ratios[a + "_vs_rsyncd"] = r
    imp = res.extra.get("importtime_server")
    if imp:
        rows.append(("server imports (-X importtime)", f"{imp['total_us'] / 1000:.1f} ms",
                     f"{imp['modules']} modules", "-", "lazy", "-"))

    header = ("measurement", "rstash", "reference", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, tuple("-" * w for w in widths), *rows]]
    if imp:
        lines += ["", "server session imports, top cumulative (ms):"]
        lines += [f"  {r['cumulative_us'] / 1000:8.1f}  {'  ' * r['depth']}{r['module']}" for r in imp["top"]]
        lines += ["heaviest packages outside rstash, cumulative (ms):"]
        lines += [f"  {r['cumulative_us'] / 1000:8.1f}  {r['module']}" for r in imp["heaviest_packages"]]
    if t.get("big_rstash"):
        mib_s = env.opts.size / (1 << 20) / statistics.median(t["big_rstash"])
        lines += ["", f"rstash:// throughput (median): {mib_s:.0f} MiB/s"]
    if res.errors:
        lines += ["", "FAILED:", *[f"  {e.splitlines()[0]}" for e in res.errors]]

    data = {
        "machine": {"nproc": os.cpu_count(), "kernel": os.uname().release,
                    "loadavg_at_end": os.getloadavg()},
        "settings": {"size": env.opts.size, "files": env.opts.files, "file_size": env.opts.file_size,
                     "repeat": env.opts.repeat, "connections": env.opts.connections, "venv": str(env.venv),
                     "venv_differs_from_checkout": env.opts.venv_differs,
                     "service_user": env.user.name},
        "seconds": t, "rss_kib": rss, "ratios": ratios, "rss_target_kib": RSS_TARGET_KIB,
        "importtime_server": imp, "errors": res.errors,
    }
    return "\n".join(lines), data


# --------------------------------------------------------------------------- main


def options(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="rstash vs rsyncd / nc / scp / dd on loopback, as ratios in one run.")
    p.add_argument("--size", type=parse_size, default=None, help="big file size (default 1GiB; --quick 64MiB)")
    p.add_argument("--files", type=int, default=None, help="small files per call (default 1000; --quick 100)")
    p.add_argument("--file-size", type=parse_size, default=4096, help="small file size (default 4096)")
    p.add_argument("--repeat", "-n", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--connections", type=int, default=20, help="start-up connections per shape (default 20)")
    p.add_argument("--if-root", action="store_true",
                   help="as anyone but root, say so and exit 0 (never under CI=true)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 100 files")
    p.add_argument("--venv", help=f"use this venv (rstash installed) instead of {BASE}/venv-HASH")
    p.add_argument("--no-ssh", action="store_true", help="skip scp and ssh://")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help=f"keep the work directory under {BASE}")
    o = p.parse_args(argv)
    o.size = o.size if o.size is not None else (64 << 20 if o.quick else 1 << 30)
    o.files = o.files if o.files is not None else (100 if o.quick else 1000)
    if o.repeat < 1 or o.files < 1 or o.connections < 1 or o.size < 1:
        p.error("--repeat, --files, --connections and --size must be positive")
    return o


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so that the clean-up below always runs."""
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    opts = options(argv)
    if os.geteuid() != 0:
        if opts.if_root and os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
            # The README's test command stays usable by an ordinary user; CI runs as root and
            # never takes this way out.
            print("bench.py: not root: benchmark skipped (run it as root)")
            return 0
        print("bench.py: run as root (it starts sshd and rsyncd and a server as a service user)", file=sys.stderr)
        return 2
    procs: list[Proc] = []
    env: Env | None = None
    try:
        with terminated_as_interrupt():
            env = set_up(opts, procs)
            res = measure(env)
    except BenchError as e:
        print(f"bench.py: set-up failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return 130
    finally:
        for p in reversed(procs):
            p.kill()
        if env is not None and not opts.keep:
            shutil.rmtree(env.work, ignore_errors=True)
        elif env is not None:
            print(f"work directory kept: {env.work}", file=sys.stderr)
    assert env is not None
    text, data = report(env, res)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs, Linux "
          f"{os.uname().release}; load average at the end {load}")
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    print(text)
    if opts.json:
        Path(opts.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
