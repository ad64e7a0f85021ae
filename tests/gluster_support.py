"""A real GlusterFS volume for tests: its own glusterd, two bricks on loopback, FUSE mounts.

This module owns the life of one throw-away GlusterFS cluster per :func:`gluster_volume` call:

* **Its own glusterd.** There is no service manager to ask, and a system glusterd must never be
  reused or disturbed. Ours reads a volfile of its own whose working directory
  (``/var/lib/glusterd`` for a system one), run directory and CLI socket all live below the
  test's directory, listens on 127.0.0.1 only, and is stopped by pid at teardown. Only the
  management port cannot move: the brick processes glusterd spawns always fetch their volfile
  from port 24007 (measured with 10.3: with another listen-port every brick fails to start). So
  one test cluster runs per machine at a time, serialised by a machine-wide lock, and a port
  24007 already taken (a system glusterd) is a missing prerequisite, not something to kill.
* **Bricks on loopback.** ``gluster volume create`` refuses ``localhost`` and ``127.0.0.1`` as a
  brick host, so bricks are named by this machine's host name, which must resolve to a loopback
  address (it does in Debian's default /etc/hosts); ``force`` because bricks on the root file
  system are otherwise refused.
* **Layouts.** ``distribute`` spreads names over the two bricks by hash, so a ``link()`` or
  ``rename()`` whose source and target hash to different bricks goes through DHT's link files:
  that is where a cluster-wide primitive can break. ``replica`` keeps every name on both bricks
  through AFR, whose entry and inode locks serialise two clients: the layout that survives a brick.
  The design must hold on both, so tests that prove primitives run on both.
* **Clean teardown, even after a failure:** unmount (lazily if busy), stop and delete the volume,
  stop glusterd and any brick process of ours still alive (by pid, found by our unique directory in
  its command line), move the brick logs glusterd writes to /var/log/glusterfs/bricks into the
  test's directory, remove the brick sockets it leaves in /var/run/gluster, remove everything.

It must never touch a volume, mount, process or file that it did not create, never listen on
anything but loopback, and never be imported by the ``rstash`` package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from e2e_support import e2e_root, find_program, is_root, locked, need, remove_tree

#: The management port glusterd's brick processes always connect to (not configurable for them).
GLUSTERD_PORT = 24007
#: Brick ports our glusterd hands out: a range of its own, away from a system glusterd's 49152+.
BRICK_PORTS = (49300, 49399)
#: Serialises test clusters machine-wide (they share port 24007).
MACHINE_LOCK = Path("/run/lock/rstash-test-glusterd.lock")
#: Where glusterd 10 writes brick logs whatever its volfile says.
SYSTEM_BRICK_LOGS = Path("/var/log/glusterfs/bricks")
LAYOUTS = ("distribute", "replica")
#: Bounds of every wait: a daemon that does not answer in this time fails the test.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclasses.dataclass
class GlusterVolume:
    """A started volume and its FUSE mounts; made by :func:`gluster_volume`."""

    name: str
    layout: str
    root: Path
    host: str
    bricks: list[Path]
    #: The FUSE mount points, all of the same volume: one per simulated receiver host.
    mounts: list[Path]
    #: Seconds from starting glusterd to the last mount being usable.
    setup_seconds: float = 0.0
    #: Seconds the teardown took (set when it is done).
    teardown_seconds: float = 0.0
    #: Seconds of each teardown step, for finding what is slow.
    teardown_steps: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "glusterd.socket"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def cli(self, *args: str, check: bool = True, timeout: float = START_TIMEOUT) -> str:
        """Run ``gluster ARGS`` against our glusterd; its output, or raise with it."""
        argv = ["gluster", "--mode=script", f"--glusterd-sock={self.socket_path}",
                f"--log-file={self.log_dir / 'cli.log'}", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: "
                               f"{(done.stdout + done.stderr).strip()}")
        return done.stdout

    def mount(self, where: Path) -> Path:
        """Mount the volume once more at ``where`` (a new FUSE client, as on another host)."""
        where.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"mount-{where.name}.log"
        subprocess.run(["mount", "-t", "glusterfs", "-o", f"log-file={log}",
                        f"{self.host}:/{self.name}", str(where)],
                       check=True, capture_output=True, text=True, timeout=START_TIMEOUT)
        # mount.glusterfs returns once the client process runs; the first statvfs waits for the
        # graph to connect to the bricks, so the mount is usable when it answers.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                os.statvfs(where)
                if os.path.ismount(where):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{where}: mount not usable after {START_TIMEOUT} s")
            time.sleep(0.05)
        self.mounts.append(where)
        return where

    def client_pid(self, mount: Path) -> int | None:
        """Pid of the FUSE client process serving ``mount``, or None."""
        for pid in _our_pids(self.root):
            argv = _cmdline(pid)
            if argv and argv[-1] == str(mount) and "--process-name" in argv:
                return pid
        return None

    def brick_pids(self) -> dict[Path, int]:
        """Pid of each running brick process (glusterfsd), by brick path."""
        found: dict[Path, int] = {}
        for pid in _our_pids(self.root):
            argv = _cmdline(pid)
            if "--brick-name" in argv:
                found[Path(argv[argv.index("--brick-name") + 1])] = pid
        return found


# --------------------------------------------------------------------------- helpers


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def _our_pids(root: Path) -> list[int]:
    """Processes whose command line names our directory: only ones this cluster started."""
    mine = str(root)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if any(mine in arg for arg in _cmdline(int(entry))):
                pids.append(int(entry))
    return pids


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _loopback_host_name() -> str | None:
    """This machine's host name when it resolves only to loopback addresses, else None."""
    name = socket.gethostname()
    try:
        addrs = {str(info[4][0]) for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return None
    if addrs and all(a.startswith("127.") for a in addrs):
        return name
    return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # Our own child (none here: glusterd daemonises) would need reaping; others are reaped
        # by init, and a zombie counts as gone.
        if Path(f"/proc/{pid}/status").exists():
            status = Path(f"/proc/{pid}/status").read_text(errors="replace")
            if "\nState:\tZ" in status:
                return True
        time.sleep(0.05)
    return False


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, STOP_TIMEOUT)


def is_mounted(where: Path) -> bool:
    """Whether ``where`` is a mount point, also when its FUSE client died (stat fails then)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        points = {line.split(" ")[4] for line in f if line.count(" ") > 4}
    escaped = str(where).replace("\\", "\\134").replace(" ", "\\040")
    return escaped in points


def _unmount(where: Path) -> None:
    if not is_mounted(where):
        return
    done = subprocess.run(["umount", str(where)], capture_output=True, timeout=STOP_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        # Busy (a test's process still inside) or the client died: detach it all the same.
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=STOP_TIMEOUT,
                       check=False)


def _glusterd_volfile(root: Path) -> str:
    return "\n".join([
        "volume management",
        "    type mgmt/glusterd",
        f"    option working-directory {root / 'glusterd'}",
        f"    option run-directory {root / 'run'}",
        f"    option glusterd-sockfile {root / 'run' / 'glusterd.socket'}",
        "    option transport-type socket",
        "    option transport.socket.bind-address 127.0.0.1",
        "    option ping-timeout 0",
        "    option event-threads 1",
        f"    option base-port {BRICK_PORTS[0]}",
        f"    option max-port {BRICK_PORTS[1]}",
        "end-volume",
        "",
    ])


def require_gluster() -> str:
    """Check every prerequisite (skip, or fail under CI=true); return the brick host name."""
    need(is_root(), "a GlusterFS volume needs root (glusterd, FUSE mounts)")
    for program in ("glusterd", "gluster", "mount.glusterfs"):
        need(find_program(program), f"{program} is not installed (glusterfs-server, glusterfs-client)")
    need(Path("/dev/fuse").exists(), "/dev/fuse is missing: FUSE mounts are impossible")
    host = _loopback_host_name()
    need(host, f"host name {socket.gethostname()!r} does not resolve to a loopback address only; "
               "GlusterFS refuses 'localhost' as a brick host")
    assert host is not None
    return host


# --------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def gluster_volume(layout: str = "distribute", mounts: int = 2,
                   base: Path | None = None) -> Iterator[GlusterVolume]:
    """A started two-brick volume of ``layout`` mounted ``mounts`` times; all removed at exit."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}: {layout!r}")
    host = require_gluster()
    MACHINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with locked(MACHINE_LOCK, timeout=600.0):
        need(not _port_taken(GLUSTERD_PORT),
             f"port {GLUSTERD_PORT} is taken (a system glusterd?): the test cluster needs it; "
             "stop that glusterd first")
        root = Path(base or e2e_root()) / f"gluster-{secrets.token_hex(4)}"
        root.mkdir(mode=0o755, parents=True)
        name = f"rstash{root.name.rsplit('-', 1)[1]}"
        vol = GlusterVolume(name=name, layout=layout, root=root, host=host,
                            bricks=[root / "bricks" / f"b{i}" for i in (1, 2)], mounts=[])
        try:
            started = time.monotonic()
            _start(vol, mounts)
            vol.setup_seconds = time.monotonic() - started
            yield vol
        finally:
            started = time.monotonic()
            _teardown(vol)
            vol.teardown_seconds = time.monotonic() - started


def _start(vol: GlusterVolume, mounts: int) -> None:
    for sub in ("glusterd", "run", "log", "bricks", "mnt"):
        (vol.root / sub).mkdir()
    volfile = vol.root / "glusterd.vol"
    volfile.write_text(_glusterd_volfile(vol.root))
    # glusterd daemonises: it returns once it forked, so wait for its CLI socket to answer.
    subprocess.run(["glusterd", "-f", str(volfile), "-p", str(vol.root / "glusterd.pid"),
                    "-l", str(vol.log_dir / "glusterd.log")],
                   check=True, capture_output=True, timeout=START_TIMEOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            vol.cli("volume", "list", timeout=5.0)
            break
        except (RuntimeError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    shape = ["replica", "2"] if vol.layout == "replica" else []
    vol.cli("volume", "create", vol.name, *shape,
            *(f"{vol.host}:{brick}" for brick in vol.bricks), "force")
    vol.cli("volume", "start", vol.name)
    for i in range(mounts):
        vol.mount(vol.root / "mnt" / chr(ord("a") + i))


def _teardown(vol: GlusterVolume) -> None:
    errors: list[str] = []
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        vol.teardown_steps[name] = now - mark
        mark = now

    for where in reversed(vol.mounts):
        try:
            _unmount(where)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"umount {where}: {exc}")
    sockets = {Path(argv[argv.index("-S") + 1]) for argv in map(_cmdline, vol.brick_pids().values())
               if "-S" in argv}
    step("umount")
    if (vol.root / "glusterd.pid").exists():
        for args in (("volume", "stop", vol.name, "force"), ("volume", "delete", vol.name)):
            try:
                vol.cli(*args, check=False, timeout=STOP_TIMEOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"gluster {' '.join(args)}: {exc}")
            step(args[1])
        with contextlib.suppress(OSError, ValueError):
            _stop(int((vol.root / "glusterd.pid").read_text().strip()))
        step("glusterd")
    # Whatever of ours survived (a brick after a failed stop, a client of a lost mount).
    for pid in _our_pids(vol.root):
        _stop(pid)
    step("leftovers")
    for sock in sockets:
        if sock.parent == Path("/var/run/gluster") or sock.parent == Path("/run/gluster"):
            with contextlib.suppress(OSError):
                sock.unlink()
    for brick in vol.bricks:
        # glusterd names a brick's log after its path, '/' turned into '-'.
        log = SYSTEM_BRICK_LOGS / (str(brick).strip("/").replace("/", "-") + ".log")
        with contextlib.suppress(OSError):
            os.replace(log, vol.log_dir / log.name)
    still = [str(m) for m in vol.mounts if is_mounted(m)]
    if still:
        errors.append(f"still mounted: {', '.join(still)}")
    elif os.environ.get("RSTASH_E2E_KEEP") != "1":
        remove_tree(vol.root)
    step("remove")
    if errors:
        raise RuntimeError("GlusterFS teardown: " + "; ".join(errors))
