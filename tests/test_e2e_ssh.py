"""ssh:// end to end: the real rstash-send through the real ssh into real sshds on loopback.

Each test starts its own ``sshd -D`` (as root, on 127.0.0.1, a fresh host key, ``UsePAM no``,
``PidFile none``) with a root-owned authorized_keys file in ``e2e_dir``; rstash-recv runs as the
service user ``rstash-e2e`` the way sshd starts it: a forced command in authorized_keys, a
``Subsystem rstash`` line, an exec'd remote command, or the shipped ``Match User`` block with
``ForceCommand`` (config/sshd_config.d/rstash.conf). The client is ssh with ``-F /dev/null``, our
own key and known-hosts file, so nothing of root's ~/.ssh is used.

``StrictModes no``: e2e_dir lives under /var/tmp (world-writable, sticky), which sshd's path
checks would refuse; the authorized_keys files are root-owned 0644 anyway.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    find_program,
    free_port,
    is_root,
    make_box,
    need,
    need_program,
    venv_bin,
    wait_for_port,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent
SHIPPED_SSHD_CONF = CHECKOUT / "config" / "sshd_config.d" / "rstash.conf"

#: rstash-send exit statuses (rstash-send(1) EXIT STATUS).
OK, REFUSED, USAGE, AUTH, TRANSPORT, PROTOCOL = 0, 1, 2, 3, 4, 5

SEND_TIMEOUT = 30.0


# --------------------------------------------------------------------------- sshd and ssh


@dataclasses.dataclass
class Sshd:
    proc: Proc
    port: int
    config: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclasses.dataclass
class SshEnv:
    """Everything a test needs to run ssh and sshd in one ``e2e_dir``."""

    e2e_dir: Path
    venv: Path
    user: ServiceUser
    spawn: ProcGroup
    sshd_bin: str
    client_key: Path
    client_pub: str
    known_hosts: Path
    host_key: Path
    names: dict[str, int] = dataclasses.field(default_factory=dict)

    def unique(self, name: str) -> str:
        """A log name not used yet in this test (Proc's own numbering needs dot-free names)."""
        n = self.names.get(name, 0) + 1
        self.names[name] = n
        return name if n == 1 else f"{name}-{n}"

    @property
    def recv(self) -> str:
        return venv_bin(self.venv, "rstash-recv")

    @property
    def send(self) -> str:
        return venv_bin(self.venv, "rstash-send")

    def rsh(self, key: Path | None = None) -> str:
        """The -e value: ssh with no config file, our key and our known-hosts file only."""
        return shlex.join([
            "ssh", "-F", "/dev/null", "-i", str(key or self.client_key),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR",
        ])

    def authorized_keys(self, *lines: str, name: str = "authorized_keys") -> Path:
        """A root-owned 0644 authorized_keys file (the layout rstash-recv(8) recommends)."""
        path = self.e2e_dir / "ssh" / name
        path.parent.mkdir(mode=0o755, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.chown(path, 0, 0)
        os.chmod(path, 0o644)
        return path

    def key_line(self, options: str = "", pub: str | None = None) -> str:
        pub = pub or self.client_pub
        return f"{options} {pub}".strip()

    def base_config(self, port: int, authorized_keys: Path | str) -> list[str]:
        return [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            f"AuthorizedKeysFile {authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AllowUsers {self.user.name}",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel DEBUG",
        ]

    def write_sshd_config(self, lines: Sequence[str], name: str = "sshd_config") -> Path:
        path = self.e2e_dir / "ssh" / name
        path.parent.mkdir(mode=0o755, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(path, 0o644)
        return path

    def check_config(self, config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.sshd_bin, "-t", "-f", str(config)], capture_output=True,
                              text=True, timeout=30, check=False)

    def start_sshd(self, *, authorized_keys: Path | str, extra: Sequence[str] = (),
                   port: int | None = None, config: Path | None = None) -> Sshd:
        """``sshd -D`` on 127.0.0.1:PORT in the foreground, killed at teardown by ``spawn``."""
        port = port or free_port()
        if config is None:
            config = self.write_sshd_config([*self.base_config(port, authorized_keys), *extra],
                                            name=f"sshd_config.{port}")
        checked = self.check_config(config)
        assert checked.returncode == 0, f"sshd -t -f {config}: {checked.stderr}"
        log = self.e2e_dir / f"sshd.{port}.log"
        proc = self.spawn([self.sshd_bin, "-D", "-e", "-f", str(config), "-E", str(log),
                           "-p", str(port), "-o", "ListenAddress=127.0.0.1"], name=self.unique(f"sshd-{port}"))
        wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        return Sshd(proc, port, config, log)

    def url(self, sshd: Sshd | int, box: str, user: str | None = None) -> str:
        port = sshd if isinstance(sshd, int) else sshd.port
        return f"ssh://{user or self.user.name}@127.0.0.1:{port}/{box}"

    def run_send(self, *args: str | os.PathLike[str], name: str = "send",
                 env: dict[str, str] | None = None, rsh: str | None = "default",
                 timeout: float = SEND_TIMEOUT) -> Proc:
        """rstash-send as the client (root), with ``-e`` our ssh unless ``rsh`` is None."""
        argv: list[str | os.PathLike[str]] = [self.send, "--no-progress"]
        if rsh is not None:
            argv += ["-e", self.rsh() if rsh == "default" else rsh]
        argv += list(args)
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                "HOME": str(self.e2e_dir / "client-home")}
        (self.e2e_dir / "client-home").mkdir(mode=0o700, exist_ok=True)
        base.update(env or {})
        proc = self.spawn(argv, name=self.unique(name), env=base, cwd=self.e2e_dir)
        proc.wait(timeout)
        return proc


@pytest.fixture
def ssh_env(e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser,
            spawn: ProcGroup) -> SshEnv:
    need(is_root(), "real sshds need root (they change to the service user)")
    need(not service_user.is_current, "needs a service user other than the runner")
    sshd_bin = need_program("sshd")
    need(find_program("ssh"), "ssh (openssh-client) is not installed")
    keygen = need_program("ssh-keygen")
    # The privilege separation directory sshd insists on.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.chmod("/run/sshd", 0o755)
    d = e2e_dir / "ssh"
    d.mkdir(mode=0o755, exist_ok=True)
    os.chown(d, 0, 0)
    host_key = d / "host_ed25519"
    client_key = e2e_dir / "client_ed25519"
    for path, comment in ((host_key, "e2e host"), (client_key, "e2e client")):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                       check=True, timeout=30, capture_output=True)
    client_pub = Path(f"{client_key}.pub").read_text().strip()
    return SshEnv(e2e_dir, e2e_venv, service_user, spawn, sshd_bin, client_key, client_pub,
                  e2e_dir / "known_hosts", host_key)


def payload(e2e_dir: Path, name: str = "backup.tar", size: int = 300_000) -> Path:
    path = e2e_dir / "src" / name
    path.parent.mkdir(mode=0o755, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def assert_stored(box: Box, src: Path, user: ServiceUser, name: str | None = None) -> None:
    stored = box.path / (name or src.name)
    assert stored.read_bytes() == src.read_bytes()
    st = stored.stat()
    assert st.st_uid == user.uid, f"{stored} owned by uid {st.st_uid}, not the service user"
    assert stat.S_IMODE(st.st_mode) == 0o640


def recv_log(e2e_dir: Path) -> str:
    path = e2e_dir / "rstash-recv.log"
    return path.read_text(errors="replace") if path.exists() else ""


def two_boxes(e2e_dir: Path) -> tuple[Box, Box, Path]:
    vm1, vm2 = make_box(e2e_dir, "vm1"), make_box(e2e_dir, "vm2")
    return vm1, vm2, write_config(e2e_dir, [vm1, vm2], idle_timeout=10, preauth_timeout=10)


def forced(recv: str, conf: Path, *extra: str, prefix: str = "") -> str:
    command = shlex.join([recv, "-c", str(conf), *extra])
    return f'restrict,command="{prefix}{command}"'


# --------------------------------------------------------------------------- 1. forced command


def test_forced_command_with_box_stores_as_the_service_user_and_pins_the_box(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, vm2, conf = two_boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "vm1")))
    # No Subsystem line at all: exec (the default) is what a forced command serves.
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir)

    # The client asks for the default remote command "rstash-recv", which is not on the service
    # user's PATH here: that this works at all shows the forced command replaced it.
    ok = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src, name="send-vm1")
    assert ok.returncode == OK, ok.describe()
    assert_stored(vm1, src, ssh_env.user)
    assert "stored backup.tar" in ok.stderr()

    # Same config, the other box's own key: the --box allow-list still says 535.
    other = ssh_env.run_send("-k", vm2.client_key, ssh_env.url(sshd, "vm2"), src, name="send-vm2")
    assert other.returncode == AUTH, other.describe()
    assert "authentication failed" in other.stderr()
    assert vm2.files() == {}

    log = recv_log(e2e_dir)
    # The peer address comes from SSH_CONNECTION: fd 0 is no TCP socket under sshd.
    assert re.search(r"event=session box=vm1 peer=127\.0\.0\.1 .*outcome=authenticated", log), log
    assert re.search(r"event=auth .*peer=127\.0\.0\.1 .*box=vm2", log), log
    assert "peer=unknown" not in log


# --------------------------------------------------------------------------- 2. subsystem and exec


def test_subsystem_and_remote_path_store(ssh_env: SshEnv, e2e_dir: Path) -> None:
    vm1, _vm2, conf = two_boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line("restrict"))
    sshd = ssh_env.start_sshd(
        authorized_keys=keys, extra=[f"Subsystem rstash {ssh_env.recv} -c {conf}"])
    src = payload(e2e_dir, "sub.tar")

    sub = ssh_env.run_send("--subsystem", "-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src,
                           name="send-subsystem")
    assert sub.returncode == OK, sub.describe()
    assert_stored(vm1, src, ssh_env.user)

    # Exec: --remote-path is one command name (ssh joins it into the remote command line); the
    # server needs -c, so a wrapper script supplies it.
    wrapper = e2e_dir / "rstash-recv-e2e"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(ssh_env.recv)} -c {shlex.quote(str(conf))}"
                       ' "$@"\n')
    os.chmod(wrapper, 0o755)
    src2 = payload(e2e_dir, "exec.tar")
    ex = ssh_env.run_send("--remote-path", wrapper, "-k", vm1.client_key,
                          ssh_env.url(sshd, "vm1"), src2, name="send-exec")
    assert ex.returncode == OK, ex.describe()
    assert_stored(vm1, src2, ssh_env.user)

    # The default remote command is "rstash-recv", not on the service user's PATH here: the
    # remote shell's complaint is ssh's last line, before any protocol byte.
    src3 = payload(e2e_dir, "default.tar")
    missing = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src3,
                               name="send-default")
    assert missing.returncode == TRANSPORT, missing.describe()
    assert re.search(r"rstash-send: .*rstash-recv: command not found", missing.stderr()), \
        missing.describe()
    assert not (vm1.path / "default.tar").exists()


# --------------------------------------------------------------------------- 3. unknown subsystem


def test_unknown_subsystem_is_refused_even_under_a_forced_command(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, _vm2, conf = two_boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "vm1")))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir)
    sub = ssh_env.run_send("--subsystem", "-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src)
    assert sub.returncode == TRANSPORT, sub.describe()
    assert vm1.files() == {}
    assert "subsystem" in sub.stderr().lower(), sub.describe()
    wait_until(lambda: "subsystem not found" in sshd.log_text(), timeout=5,
               what="sshd logging the refused subsystem")
    # The forced command itself still works for exec.
    ok = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src, name="send-exec")
    assert ok.returncode == OK, ok.describe()


# --------------------------------------------------------------------------- 4. ssh dies first


def test_ssh_failing_before_any_protocol_byte_is_exit_4_with_its_last_line(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, _vm2, conf = two_boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "vm1")))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir)

    closed = free_port()
    refused = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(closed, "vm1"), src,
                               name="send-closed-port")
    assert refused.returncode == TRANSPORT, refused.describe()
    err = refused.stderr()
    assert re.search(rf"rstash-send: .*port {closed}: Connection refused", err), err

    # An ssh key that authorized_keys does not list.
    stranger = e2e_dir / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True, timeout=30, capture_output=True)
    denied = ssh_env.run_send("-e", ssh_env.rsh(stranger), "-k", vm1.client_key,
                              ssh_env.url(sshd, "vm1"), src, rsh=None, name="send-stranger")
    assert denied.returncode == TRANSPORT, denied.describe()
    assert re.search(r"rstash-send: .*Permission denied \(publickey\)", denied.stderr()), \
        denied.describe()
    assert vm1.files() == {}


# --------------------------------------------------------------------------- 5. stray output


def test_non_protocol_bytes_first_are_exit_5_quoting_the_line(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, _vm2, conf = two_boxes(e2e_dir)
    line = forced(ssh_env.recv, conf, "--box", "vm1", prefix="echo Welcome to backup host; exec ")
    keys = ssh_env.authorized_keys(ssh_env.key_line(line))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir)
    motd = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src)
    assert motd.returncode == PROTOCOL, motd.describe()
    assert "Welcome to backup host" in motd.stderr(), motd.describe()
    assert vm1.files() == {}


# --------------------------------------------------------------------------- 6. --debug


def test_debug_in_the_forced_command_shows_the_server_log_on_the_client(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, vm2, conf = two_boxes(e2e_dir)
    keys = ssh_env.authorized_keys(
        ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "vm1", "--debug")))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir)
    ok = ssh_env.run_send("-k", vm1.client_key, ssh_env.url(sshd, "vm1"), src, name="send-ok")
    assert ok.returncode == OK, ok.describe()
    err = ok.stderr()
    assert re.search(r"rstash-recv\[\d+\]: info event=session box=vm1 peer=127\.0\.0\.1 ", err), err
    assert re.search(r"rstash-recv\[\d+\]: info event=file box=vm1 name=backup\.tar", err) or \
        "outcome=stored" in err, err
    assert_stored(vm1, src, ssh_env.user)

    # What an admin debugs for: why a client is refused. The reason is on the client's terminal.
    bad = ssh_env.run_send("-k", vm2.client_key, ssh_env.url(sshd, "vm2"), src, name="send-bad")
    assert bad.returncode == AUTH, bad.describe()
    assert re.search(r"rstash-recv\[\d+\]: warning event=auth .*box=vm2 .*reason=", bad.stderr()), \
        bad.describe()
    # No secret in what reaches the client.
    for box in (vm1, vm2):
        assert box.key.hex() not in err + bad.stderr()


# --------------------------------------------------------------------------- 7. injection


@pytest.mark.parametrize("dest", [
    "ssh://-oProxyCommand=touch%20{marker}@127.0.0.1/vm1",
    "ssh://-oProxyCommand=touch%20{marker}/vm1",
    "ssh://user@-oProxyCommand=touch%20{marker}/vm1",
    "ssh://-oProxyCommand=touch%20{marker}:22/vm1",
    "ssh://rstash-e2e@127.0.0.1/..",
    "ssh://rstash-e2e@127.0.0.1/-box",
])
def test_argument_injection_in_the_url_is_refused_before_ssh_runs(
    ssh_env: SshEnv, e2e_dir: Path, dest: str
) -> None:
    vm1 = make_box(e2e_dir, "vm1")
    marker = e2e_dir / "injected"
    ran = e2e_dir / "ssh-ran"
    # A stand-in for ssh that only records that it was started.
    fake = e2e_dir / "fake-ssh"
    fake.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(ran))}\nexit 255\n")
    os.chmod(fake, 0o755)
    src = payload(e2e_dir)
    proc = ssh_env.run_send("-k", vm1.client_key, dest.format(marker=marker), src,
                            rsh=str(fake), name="send-injection")
    assert proc.returncode == USAGE, proc.describe()
    assert not ran.exists(), "ssh was started"
    assert not marker.exists()
    # Refused with one line, never a traceback.
    assert "Traceback" not in proc.stderr()
    assert proc.stderr().startswith("rstash-send: "), proc.describe()


def test_url_parts_never_reach_the_remote_command(ssh_env: SshEnv, e2e_dir: Path) -> None:
    """The argv ssh gets: options before ``--``, then host and the remote path; box never."""
    vm1 = make_box(e2e_dir, "vm1")
    argv_file = e2e_dir / "ssh-argv"
    fake = e2e_dir / "fake-ssh"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > '
                    f"{shlex.quote(str(argv_file))}\nexit 255\n")
    os.chmod(fake, 0o755)
    src = payload(e2e_dir)
    for extra, want in (
        ((), ["-p", "2222", "-l", "someone", "-T", "-o", "BatchMode=yes", "--",
              "host.example", "rstash-recv"]),
        (("--subsystem",), ["-p", "2222", "-l", "someone", "-T", "-o", "BatchMode=yes", "-s",
                            "--", "host.example", "rstash"]),
    ):
        proc = ssh_env.run_send(*extra, "-k", vm1.client_key,
                                "ssh://someone@host.example:2222/vm1", src,
                                rsh=f"{fake} -o Marker=1", name="send-argv")
        assert proc.returncode == TRANSPORT, proc.describe()
        assert argv_file.read_text().splitlines() == ["-o", "Marker=1", *want]
    # Without port and user in the URL, ssh_config decides: no -p, no -l.
    proc = ssh_env.run_send("-k", vm1.client_key, "ssh://host.example/vm1", src,
                            rsh=str(fake), name="send-argv-bare")
    assert proc.returncode == TRANSPORT, proc.describe()
    assert argv_file.read_text().splitlines() == ["-T", "-o", "BatchMode=yes", "--",
                                                  "host.example", "rstash-recv"]
    # RSTASH_RSH is used when -e is absent.
    proc = ssh_env.run_send("-k", vm1.client_key, "ssh://h/vm1", src, rsh=None,
                            env={"RSTASH_RSH": f"{fake} -x"}, name="send-argv-env")
    assert proc.returncode == TRANSPORT, proc.describe()
    assert argv_file.read_text().splitlines()[0] == "-x"


# --------------------------------------------------------------------------- 8. shipped config


def shipped_sshd_conf(env: SshEnv, conf: Path, keys_dir: Path) -> Path:
    """config/sshd_config.d/rstash.conf with its paths and user pointed into e2e_dir."""
    text = SHIPPED_SSHD_CONF.read_text(encoding="utf-8")
    for old, new in (
        ("/usr/bin/rstash-recv", env.recv),
        ("/etc/rstash/rstash-recv.toml", str(conf)),
        ("/etc/ssh/authorized_keys/%u", f"{keys_dir}/%u"),
    ):
        assert old in text, f"{SHIPPED_SSHD_CONF} no longer mentions {old}"
        text = text.replace(old, new)
    text, n = re.subn(r"^Match User rstash$", f"Match User {env.user.name}", text, flags=re.M)
    assert n == 1, "the shipped config has no 'Match User rstash' line"
    # `Subsystem rstash /usr/bin/rstash-recv` has no -c: it would read /etc/rstash. The test
    # points it at the test config, as an admin with a non-default config would.
    text = re.sub(rf"^(Subsystem rstash {re.escape(env.recv)})$", rf"\1 -c {conf}", text,
                  flags=re.M)
    path = env.e2e_dir / "ssh" / "rstash.conf"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)
    return path


def test_shipped_sshd_config_passes_sshd_t_and_its_force_command_serves(
    ssh_env: SshEnv, e2e_dir: Path
) -> None:
    vm1, vm2, conf = two_boxes(e2e_dir)
    keys_dir = e2e_dir / "ssh" / "authorized_keys.d"
    keys_dir.mkdir(mode=0o755, parents=True)
    # A key line without command=: ForceCommand of the Match block is the backstop.
    ssh_env.authorized_keys(ssh_env.key_line("restrict"), name=f"authorized_keys.d/{ssh_env.user.name}")
    include = shipped_sshd_conf(ssh_env, conf, keys_dir)
    port = free_port()
    # The global AuthorizedKeysFile points at nothing: only the Match block's file may work.
    base = [line for line in ssh_env.base_config(port, "/nonexistent/%u")
            if not line.startswith("AllowUsers")]
    config = ssh_env.write_sshd_config([*base, f"Include {include}"], name="sshd_config.shipped")
    checked = ssh_env.check_config(config)
    assert checked.returncode == 0, checked.stderr
    extended = subprocess.run([ssh_env.sshd_bin, "-T", "-f", str(config), "-C",
                               f"user={ssh_env.user.name},host=localhost,addr=127.0.0.1"],
                              capture_output=True, text=True, timeout=30, check=False)
    assert extended.returncode == 0, extended.stderr
    effective = extended.stdout.lower()
    assert f"forcecommand {ssh_env.recv} -c {conf}".lower() in effective
    assert "disableforwarding yes" in effective and "permittty no" in effective

    sshd = ssh_env.start_sshd(authorized_keys="unused", config=config, port=port)
    src = payload(e2e_dir)
    # Whatever remote command the client asks for, ForceCommand runs rstash-recv.
    ok = ssh_env.run_send("--remote-path", "/bin/false", "-k", vm1.client_key,
                          ssh_env.url(sshd, "vm1"), src, name="send-forcecommand")
    assert ok.returncode == OK, ok.describe()
    assert_stored(vm1, src, ssh_env.user)
    # The Subsystem line is there, and ForceCommand serves subsystem requests too.
    src2 = payload(e2e_dir, "sub.tar")
    sub = ssh_env.run_send("--subsystem", "-k", vm2.client_key, ssh_env.url(sshd, "vm2"), src2,
                           name="send-forcecommand-subsystem")
    assert sub.returncode == OK, sub.describe()
    assert_stored(vm2, src2, ssh_env.user)

    # A shell command is not run: the account only ever reaches rstash-recv.
    marker = e2e_dir / "shell-ran"
    shell = ssh_env.spawn([*shlex.split(ssh_env.rsh()), "-T", "-p", str(sshd.port), "-l",
                           ssh_env.user.name, "--", "127.0.0.1", f"touch {marker}"],
                          name=ssh_env.unique("ssh-shell"))
    shell.wait(SEND_TIMEOUT)
    assert not marker.exists()
    assert shell.stdout().startswith("220 rstash/1 "), shell.describe()
