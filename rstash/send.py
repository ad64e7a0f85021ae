"""rstash-send: the client's command line (rstash-send(1)).

Owns argparse, telling a profile name from a destination URL, the key file lookup,
the retry of a session refused ``421 busy``, and the one place that maps errors to
exit statuses and one-line messages. The session itself (destinations, connecting,
sources, streaming, receipts) is in ``rstash.client``; nothing imports this module.
``rstash.client.profiles`` (and with it pydantic) is imported only when a profile,
``-F`` or ``--profiles`` is used: a plain send never reads a profile file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import PROTOCOL, __version__, auth, cliformat
from .client.connect import connect
from .client.destinations import parse_dest
from .client.options import Options, Profile
from .client.session import ServerBusy, complain, run_interactive, run_pipe
from .client.sources import make_sources
from .errors import ConfigError, Exit, KeyFileError, Reply, RstashError, UsageError
from .names import is_box_name

USAGE = """\
rstash-send [OPTIONS] DEST FILE...
rstash-send [OPTIONS] --name NAME --from-command DEST -- CMD [ARG...]
rstash-send [OPTIONS] --stdout BOX FILE...
rstash-send --fingerprint -k KEY
rstash-send [-F FILE] --profiles [--json]
  DEST = rstash://HOST[:PORT]/BOX | ssh://[USER@]HOST[:PORT]/BOX | PROFILE"""


def _parser() -> argparse.ArgumentParser:
    p = cliformat.parser(
        "rstash-send", USAGE, "Send files into an rstash box (rstash-send(1)).",
        "Exit status: 0 all stored; 1 a file refused; 2 usage or local error; "
        "3 authentication failed; 4 network or ssh failure; 5 protocol error; "
        "75 temporary refusal, try later.")
    p.add_argument("dest", nargs="?", help="rstash://HOST[:PORT]/BOX, ssh://[USER@]HOST[:PORT]/BOX, "
                   "a profile name (no '://'), or BOX with --stdout")
    p.add_argument("files", nargs="*", metavar="FILE", help="files to send; - for stdin")
    p.add_argument("-k", "--key", metavar="FILE", help="box key (else the profile's, else RSTASH_KEY_FILE)")
    p.add_argument("-F", "--config", metavar="FILE", dest="config_file",
                   help="profiles file (default $XDG_CONFIG_HOME/rstash/send.toml; "
                        "for root also /etc/rstash/send.toml)")
    p.add_argument("--profiles", action="store_true", help="list the profiles and exit")
    p.add_argument("--name", help="remote name (one FILE only; default the file's base name)")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout, one object per file")
    p.add_argument("--ignore-existing", action="store_true",
                   help="a file refused as 'exists' counts as success (any file under that name, "
                        "even a different one)")
    p.add_argument("--dry-run", action="store_true", help="ask the server's verdict, send no data")
    p.add_argument("--no-resume", action="store_true",
                   help="no transfer id: an interrupted file starts again from zero, a re-run "
                        "after a lost receipt is refused as 'exists'")
    p.add_argument("--test", action="store_true", help="authenticate and disconnect")
    p.add_argument("--fingerprint", action="store_true", help="print the key's fingerprint and exit")
    p.add_argument("--from-command", action="store_true",
                   help="stream the stdout of the command after --; nothing stored if it fails")
    p.add_argument("--stdout", action="store_true",
                   help="pipe mode: write a one-way stream to stdout (… | nc -N host 7370)")
    p.add_argument("-e", "--rsh", metavar="CMD",
                   help='ssh command for ssh:// (else the profile\'s, else RSTASH_RSH; default "ssh")')
    p.add_argument("--remote-path", metavar="CMD", help="remote command for ssh:// (default rstash-recv)")
    p.add_argument("--subsystem", action=argparse.BooleanOptionalAction,
                   help='request the sshd subsystem "rstash" (default: no)')
    p.add_argument("--proxy-command", metavar="CMD", help="reach rstash:// through CMD (%%h %%p)")
    # No defaults here: None is "not on the command line", so a profile's setting applies.
    p.add_argument("--connect-timeout", type=float, metavar="S",
                   help="limit for connecting and the greeting (default 30)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="limit for any one read or write (default 120)")
    p.add_argument("--busy-wait", type=float, metavar="S",
                   help="retry '421 busy' for up to S seconds (default 120)")
    p.add_argument("--bwlimit", metavar="RATE", help="bytes per second, e.g. 20MiB; 0 for no limit")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="a progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no line for a stored file (nor one found existing with --ignore-existing)")
    p.add_argument("-v", "--verbose", action="store_true", help="say more (retries)")
    p.add_argument("--server-id", metavar="ID", help="must match the server's server_id")
    p.add_argument("-V", "--version", action="store_true", help="print program and protocol version")
    return p


def profile_of(ns: argparse.Namespace) -> Profile | None:
    """The profile DEST names, if it names one (rstash-send(1), PROFILES).

    DEST is a URL when it has ``://`` and a profile name otherwise; with ``--stdout``
    it is a box name and no profile applies. No file is read, and pydantic is not
    imported, unless DEST is a profile name or ``-F`` is given.
    """
    if ns.stdout:
        if ns.config_file is not None:
            raise UsageError("-F: profiles do not apply to --stdout BOX; give the options themselves")
        return None
    named = ns.dest is not None and "://" not in ns.dest
    if named and not is_box_name(ns.dest):
        raise UsageError(f"{ns.dest}: not a destination: give rstash://HOST[:PORT]/BOX, "
                         "ssh://[USER@]HOST[:PORT]/BOX or a profile name (see --profiles)")
    if not named and ns.config_file is None:
        return None
    from .client import profiles

    found = profiles.load(ns.config_file)
    return found.get(ns.dest) if named else None


def _list_profiles(ns: argparse.Namespace) -> int:
    if ns.dest is not None or ns.stdout:
        raise UsageError("--profiles takes no DEST or FILE")
    from .client import profiles

    found = profiles.load(ns.config_file)
    if not found.by_name and not ns.json:
        complain(f"no profiles in {found.where()}")
    profiles.show(found, as_json=ns.json)
    return Exit.OK


def _load_key(opts: Options) -> auth.Key:
    key = _find_key(opts)
    if key is None:
        raise UsageError("no key: give -k FILE or set RSTASH_KEY_FILE")
    return key


def _find_key(opts: Options) -> auth.Key | None:
    """The box key, or None when none is given (ssh:// then uses the SSH login: method ssh)."""
    path = opts.key or os.environ.get("RSTASH_KEY_FILE")
    return auth.load_key_file(path, client=True) if path else None


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in raw:
        i = raw.index("--")
        raw, cmd = raw[:i], raw[i + 1:]
    ns = _parser().parse_args(raw)
    try:
        if ns.profiles:
            return _list_profiles(ns)
        return run(Options.from_namespace(ns, cmd, profile_of(ns)))
    except KeyFileError as e:
        complain(e.message)
        return Exit.LOCAL
    except RstashError as e:
        if ns.json and not ns.stdout:
            # "code" is a reply the server sent (set on the instance), never a class default:
            # our own timeout is not a "421", a receipt failing its MAC is not a "500".
            code = vars(e).get("reply")
            print(json.dumps({"status": "error", "code": code, "message": e.message}), flush=True)
        for line in e.problems if isinstance(e, ConfigError) else [e.message]:
            complain(line)
        return int(e.exit_status)
    except KeyboardInterrupt:
        return 130


def run(opts: Options) -> int:
    if opts.version:
        print(f"rstash-send {__version__} (protocol {PROTOCOL})")
        return Exit.OK
    if opts.fingerprint:
        print(_load_key(opts).describe())
        return Exit.OK
    if opts.dest is None:
        raise UsageError("no destination given (see --help)")
    if opts.stdout:
        return _pipe(opts, opts.dest)
    dest = parse_dest(opts.dest)
    # Only over ssh:// may the SSH login stand in for the box key (rstash(7) CONSTRUCTION 11).
    key = _find_key(opts) if dest.scheme == "ssh" else _load_key(opts)
    sources = [] if opts.test else make_sources(opts)
    deadline = time.monotonic() + opts.busy_wait
    delay = 1.0
    while True:
        try:
            return run_interactive(opts, key, dest.box, connect(dest, opts), sources)
        except ServerBusy:
            import random

            left = deadline - time.monotonic()
            if left <= 0:
                raise RstashError("server busy: try later", exit_status=Exit.TEMPFAIL,
                                  reply=Reply.BUSY) from None
            pause = min(left, random.uniform(0.5, 1.0) * delay)
            if opts.verbose:
                complain(f"server busy; retrying in {pause:.1f} s")
            time.sleep(pause)
            delay = min(delay * 2, 30.0)


def _pipe(opts: Options, box: str) -> int:
    """Pipe mode's checks: nothing comes back, so nothing that needs a reply is allowed."""
    if opts.json:
        raise UsageError("--json cannot be used with --stdout (nothing comes back to read)")
    if os.isatty(1):
        raise UsageError("refusing to write a stream to a terminal: pipe it (… | nc -N host 7370)")
    if not is_box_name(box):
        raise UsageError(f"{box!r} is not a box name")
    if opts.dry_run or opts.test:
        raise UsageError("--dry-run and --test need a reply: not with --stdout")
    return run_pipe(opts, _load_key(opts), box, make_sources(opts))


if __name__ == "__main__":
    sys.exit(main())
