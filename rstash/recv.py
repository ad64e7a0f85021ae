"""rstash-recv: the server's command line (rstash-recv(8)).

Serves one session on stdin/stdout, or an accept loop when fd 0 or
LISTEN_FDS is a listening socket, or with --listen; plus the admin commands.
Imports stay lazy: inetd starts this program once per connection.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from .config import Config
    from .log import Logger


def _fd2_hygiene() -> None:
    """Point fd 2 at /dev/null when it is the connection (inetd) or a stray socket.

    Runs before any other import, so that nothing, not even an import-time
    warning, can write into the client's stream.
    """
    import stat

    # A closed fd 0-2 would be handed to the next open(): pin /dev/null there first.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    st2 = os.fstat(2)
    same = False
    for fd in (0, 1):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (st2.st_dev, st2.st_ino):
            same = True
    if not same and stat.S_ISSOCK(st2.st_mode):
        journal = os.environ.get("JOURNAL_STREAM", "")
        same = journal != f"{st2.st_dev}:{st2.st_ino}"
    if same:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)


def _isolate() -> None:
    """Re-exec under ``python -I`` when PYTHON* variables could steer the interpreter.

    A serving process trusts its interpreter's environment; sshd can pass
    variables (AcceptEnv, PermitUserEnvironment) that we must not honour.
    """
    if sys.flags.isolated:
        return
    if any(name.startswith("PYTHON") for name in os.environ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        argv = [sys.executable, "-I", "-m", "rstash.recv", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)  # noqa: S606 - our own interpreter, no shell


USAGE = """\
rstash-recv [-c FILE] [--box NAME]... [--debug]
rstash-recv [-c FILE] --listen [HOST:]PORT ...
rstash-recv [-c FILE] --check-config [--json] [--user NAME]
rstash-recv [-c FILE] -t [--user NAME]
rstash-recv [-c FILE] --dump-config [--json]
rstash-recv [-c FILE] --status [BOX] [--json] [--stale-after DURATION]
            [--critical-after DURATION] [--expect BOX:PATTERN>=SIZE]...
rstash-recv [-c FILE] --metrics [--output FILE]
rstash-recv --gen-key FILE|- [--comment TEXT]
rstash-recv --fingerprint FILE
rstash-recv -V | --version"""


def _parser() -> argparse.ArgumentParser:
    from . import cliformat
    from .settings import DEFAULT_CONFIG

    p = cliformat.parser(
        "rstash-recv", USAGE, "Receive files into write-only boxes (rstash-recv(8)).",
        "Exit status: 0 session ended as the protocol defines / admin check passed; "
        "1 peer broke the protocol / admin check found a problem; 2 local error. "
        "--status with --stale-after, --critical-after or --expect is a Nagios check: "
        "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.")
    p.add_argument("-c", "--config", metavar="FILE", default=DEFAULT_CONFIG,
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--box", metavar="NAME", action="append",
                   help="serve only this box (repeatable): defence for ssh forced commands")
    p.add_argument("--debug", action="store_true", help="log at debug level to stderr")
    p.add_argument("--listen", metavar="[HOST:]PORT", action="append",
                   help="standalone server on this address (repeatable; [::]:7370)")
    p.add_argument("--check-config", action="store_true",
                   help="report every box, key and problem; exit 0 when usable")
    p.add_argument("-t", dest="test_config", action="store_true",
                   help="validate the configuration silently (exit 0 or 1)")
    p.add_argument("--dump-config", action="store_true",
                   help="print the effective settings of every box")
    p.add_argument("--status", nargs="?", const="", metavar="BOX",
                   help="recent deliveries and refusals per box, last use per key")
    p.add_argument("--stale-after", metavar="DURATION",
                   help="with --status: a Nagios check; WARNING (exit 1) for a box without "
                        "a delivery for this long, e.g. 26h")
    p.add_argument("--critical-after", metavar="DURATION",
                   help="with --status: CRITICAL (exit 2) for a box without a delivery for this long")
    p.add_argument("--expect", metavar="BOX:PATTERN>=SIZE", action="append", default=[],
                   help="with --status (repeatable): the newest file of BOX matching PATTERN "
                        "has at least SIZE bytes, else CRITICAL; e.g. 'vm1:db-*.sql.zst>=1MiB'")
    p.add_argument("--metrics", action="store_true",
                   help="print OpenMetrics text (for node_exporter's textfile collector)")
    p.add_argument("--output", metavar="FILE",
                   help="with --metrics: replace FILE atomically (mode 0644) instead of printing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--user", metavar="NAME", help="with --check-config or -t: the service user to check for "
                        "(overrides the service_user setting)")
    p.add_argument("--gen-key", metavar="FILE", help="write a new key (never overwrites); - for stdout")
    p.add_argument("--comment", metavar="TEXT", default="", help="comment for --gen-key")
    p.add_argument("--fingerprint", metavar="FILE", help="print a key file's fingerprint")
    p.add_argument("-V", "--version", action="store_true", help="print program and protocol version")
    return p


def _err(message: str) -> None:
    sys.stderr.write(f"rstash-recv: {message}\n")


def main(argv: list[str] | None = None) -> int:
    _fd2_hygiene()
    if argv is None:
        _isolate()
        argv = sys.argv[1:]
    from .errors import ConfigError, Exit, RstashError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.output is not None and not args.metrics:
        parser.error("--output needs --metrics")
    if (args.critical_after or args.expect) and args.status is None:
        parser.error("--critical-after and --expect need --status")
    try:
        if args.version:
            from . import PROTOCOL, __version__

            print(f"rstash-recv {__version__} (protocol {PROTOCOL})")
            return Exit.OK
        if args.gen_key:
            return _gen_key(args.gen_key, args.comment)
        if args.fingerprint:
            from .auth import load_key_file

            print(load_key_file(args.fingerprint).describe())
            return Exit.OK
        if args.metrics or (args.status is not None and (
                args.stale_after or args.critical_after or args.expect)):
            from . import monitor  # type: ignore[attr-defined,unused-ignore]

            if args.metrics:
                return int(monitor.metrics(args.config, args.output))
            return int(monitor.check(args.config, args.status or None, as_json=args.json,
                                     stale_after=args.stale_after, critical_after=args.critical_after,
                                     expect=args.expect))
        if args.test_config or args.check_config or args.dump_config or args.status is not None:
            from . import admin  # type: ignore[attr-defined,unused-ignore]

            if args.test_config:
                return int(admin.test_config(args.config, args.user))
            if args.check_config:
                return int(admin.check_config(args.config, as_json=args.json, user=args.user))
            if args.dump_config:
                return int(admin.dump_config(args.config, as_json=args.json))
            return int(admin.status(args.config, args.status or None, as_json=args.json,
                                    stale_after=args.stale_after))
        return _serve(args)
    except ConfigError as e:
        for problem in e.problems:
            _err(problem)
        if _serving(args):
            log_config_problems(args.config, e.problems)
        return Exit.LOCAL
    except RstashError as e:
        _err(e.message)
        return e.exit_status if e.exit_status != Exit.PROTOCOL else Exit.REFUSED
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        _err(f"internal error: {type(e).__name__}: {e}")
        return Exit.LOCAL


def log_config_problems(path: str, problems: list[str]) -> None:
    """A serving process whose config does not load says so where an admin will look:
    under inetd stderr is /dev/null, so ``auto`` with no syslog writes the fallback file
    of the file's own state_dir when it can be read, else of the default one."""
    import tomllib

    from .log import Logger, fallback_path
    from .settings import ServerSettings, check_abs_path

    state_dir = ServerSettings().state_dir
    try:
        with open(path, "rb") as f:
            state_dir = check_abs_path(tomllib.load(f).get("state_dir", str(state_dir)))
    except (OSError, ValueError):  # tomllib's error is a ValueError too
        pass
    log = Logger("auto", fallback=fallback_path(state_dir))
    for problem in problems:
        log.error(event="config", outcome="error", detail=problem)


def _serving(args: argparse.Namespace) -> bool:
    return not (args.version or args.gen_key or args.fingerprint or args.test_config or args.check_config
                or args.dump_config or args.status is not None or args.metrics)


def _gen_key(target: str, comment: str) -> int:
    from .errors import Exit
    from .keys import write_key_file

    text, desc = write_key_file(target, comment)
    if target == "-":
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        sys.stderr.write(desc + "\n")
    else:
        print(desc)
    return Exit.OK


def _serve(args: argparse.Namespace) -> int:
    # No third-party pydantic plugins (entry points of whatever else is installed)
    # run inside a serving process; skipping their scan also shortens start-up.
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    # pydantic only when the configuration changed since the last connection.
    from .errors import Exit
    from .log import Logger, server_logger
    from .snapshot import load_config
    from .transport import is_listening_socket, is_socket

    if os.geteuid() == 0:
        _err("refusing to serve as root: run rstash-recv as its service user")
        return Exit.LOCAL
    cfg = load_config(args.config)
    if args.debug:
        log = Logger("stderr", "debug", cfg.syslog_facility)
    else:
        log = server_logger(cfg)
    boxes = frozenset(args.box) if args.box else None
    listen: list[str] = args.listen or []
    fds = _listen_fds()
    if not listen and not fds and is_listening_socket(0):
        fds = [0]  # inetd "wait", systemd-socket-activate without --accept
    if not listen and len(fds) == 1 and is_socket(fds[0]) and not is_listening_socket(fds[0]):
        # A connected socket in LISTEN_FDS (systemd-socket-activate -a, Accept=yes
        # without StandardInput=socket): one session on it.
        from .session import run_session
        from .transport import peer_address

        return run_session(cfg, log, fds[0], peer=peer_address(fds[0]), boxes=boxes)
    if listen or fds:
        from . import serve  # type: ignore[attr-defined,unused-ignore]

        return int(serve.run(args.config, cfg, log, listen=listen, fds=fds, boxes=boxes, debug=args.debug))
    return serve_stdio(cfg, log, boxes)


def _listen_fds() -> list[int]:
    """Sockets passed by systemd (sd_listen_fds): fds 3.. when LISTEN_PID is us."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return list(range(3, 3 + n))


def serve_stdio(cfg: Config, log: Logger, boxes: frozenset[str] | None) -> int:
    """One session on fd 0 (reads) and fd 1 (writes): inetd nowait, ssh, Accept=yes."""
    from .session import run_session
    from .sshlogin import ssh_login
    from .transport import is_socket, peer_address, widen_pipe

    # A socket on fd 0 is the whole connection (inetd, systemd Accept=yes);
    # fd 1 may be a log file then. Pipes (ssh) read fd 0 and write fd 1.
    if not is_socket(0):
        widen_pipe(0)  # ssh: sshd writes the stream into this pipe
    # Only here, one session on stdin/stdout, may an SSH login stand in for a key.
    return run_session(cfg, log, 0, 0 if is_socket(0) else 1, peer=peer_address(0), boxes=boxes,
                       login=ssh_login(boxes))


if __name__ == "__main__":
    sys.exit(main())
