"""Every documented nightly backup (README, config/cron/rstash-backup, rstash-send(1) EXAMPLES)
stores nothing when its producer fails, and stores the file when it succeeds.

Each example is run as written through ``/bin/sh -c`` (as cron runs it, ``\\%`` as ``%``), with
only its paths moved: the server becomes a real ``rstash-recv --listen`` on loopback with boxes
vm1 and db1, the key files become the test's, and the producers (``pg_dumpall``, ``pg_dump``,
``tar``) are stand-ins on PATH that write part of a dump and then fail, or write it whole.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    make_box,
    venv_bin,
    wait_for_port,
    write_config,
)

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent
CRON_LINE = re.compile(r"^#?\s*(\d+ \d+ \* \* \*)\s+(\w+)\s+(\S.*)$")
PRODUCERS = ("pg_dumpall", "pg_dump", "tar")


def _roff_text(text: str) -> str:
    """The plain text of man-page example lines (the escapes the EXAMPLES section uses)."""
    text = re.sub(r"\\\n\s*", "", text.replace("\\e\n", "\\\n"))
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\")


def _fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.M | re.S)


def documented_examples() -> list[tuple[str, str]]:
    """(where, command line) of every nightly example: each cron line, and each --from-command
    command of rstash-send(1) EXAMPLES."""
    found: list[tuple[str, str]] = []
    for block in _fenced_blocks((CHECKOUT / "README.md").read_text(encoding="utf-8")):
        for line in block.splitlines():
            if m := CRON_LINE.match(line):
                found.append(("README.md", m.group(3)))
    for line in (CHECKOUT / "config/cron/rstash-backup").read_text(encoding="utf-8").splitlines():
        if m := CRON_LINE.match(line):
            found.append(("config/cron/rstash-backup", m.group(3)))
    man = (CHECKOUT / "man/rstash-send.1").read_text(encoding="utf-8")
    examples = man[man.index(".SH EXAMPLES"):man.index(".SH SECURITY")]
    for block in re.findall(r"^\.EX\n(.*?)^\.EE", examples, flags=re.M | re.S):
        for line in _roff_text(block).splitlines():
            if m := CRON_LINE.match(line):
                found.append(("rstash-send(1)", m.group(3)))
            elif line.startswith("rstash-send ") and "--from-command" in line:
                found.append(("rstash-send(1)", line.replace("\\%", "%")))
    return found


def test_every_documented_nightly_example_uses_from_command() -> None:
    examples = documented_examples()
    assert {where for where, _ in examples} == {"README.md", "config/cron/rstash-backup", "rstash-send(1)"}
    assert len(examples) >= 7, examples
    for where, line in examples:
        assert "--from-command" in line and not re.search(r"\|\s*rstash-send", line), (where, line)
        if "|" in line:  # a pipeline runs under a shell that reports a failure anywhere in it
            assert "bash -o pipefail -c '" in line, (where, line)


def _stand_ins(bin_dir: Path, *, fail: bool) -> None:
    """Producers that write a partial dump and exit 1 (``fail``), or a whole one and exit 0."""
    bin_dir.mkdir(exist_ok=True)
    status = 1 if fail else 0
    for name in PRODUCERS:
        script = bin_dir / name
        script.write_text("#!/bin/sh\nprintf 'part of a dump\\n'\n"
                          + ("" if fail else "printf 'the rest of it\\n'\n")
                          + f"exit {status}\n")
        script.chmod(0o755)


def _moved(line: str, port: int, boxes: dict[str, Box]) -> str:
    line = re.sub(r"rstash://[A-Za-z.-]+/(\w+)", rf"rstash://127.0.0.1:{port}/\1", line)
    for name, box in boxes.items():
        line = line.replace(f"/etc/rstash/send/{name}.key", str(box.client_key))
    return line


def _run(line: str, *, cwd: Path, path: str, key: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": str(cwd), "LANG": "C.UTF-8", "RSTASH_KEY_FILE": str(key)}
    # cron hands the line to /bin/sh after turning \% into %
    return subprocess.run(["/bin/sh", "-c", line.replace("\\%", "%")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _empty(boxes: dict[str, Box]) -> None:
    for box in boxes.values():
        for f in box.path.iterdir():
            f.unlink()


def test_a_failing_producer_stores_nothing_in_every_nightly_example(
        e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup) -> None:
    boxes = {name: make_box(e2e_dir, name) for name in ("vm1", "db1")}
    conf = write_config(e2e_dir, list(boxes.values()))
    port = free_port()
    server = spawn(as_service([venv_bin(e2e_venv, "rstash-recv"), "-c", str(conf),
                               "--listen", f"127.0.0.1:{port}"]), name="listen")
    wait_for_port("127.0.0.1", port, proc=server)
    cwd = e2e_dir / "client"
    cwd.mkdir()
    for box in boxes.values():  # rstash-send(1) also names keys relative to the current directory
        shutil.copy(box.client_key, cwd / f"{box.name}.key")
        os.chmod(cwd / f"{box.name}.key", 0o600)
    failing, working = e2e_dir / "failing-bin", e2e_dir / "working-bin"
    _stand_ins(failing, fail=True)
    _stand_ins(working, fail=False)
    venv = str(e2e_venv / "bin")

    ran = 0
    for where, documented in documented_examples():
        if "ssh://" in documented:
            continue  # same rstash-send, another transport: tests/test_e2e_ssh.py
        line = _moved(documented, port, boxes)
        key = boxes["vm1"].client_key
        bad = _run(line, cwd=cwd, path=f"{failing}:{venv}:/usr/bin:/bin", key=key)
        stored = {n: box.files() for n, box in boxes.items() if box.files()}
        assert bad.returncode == 2 and not stored, (where, documented, bad.stderr, stored)
        good = _run(line, cwd=cwd, path=f"{working}:{venv}:/usr/bin:/bin", key=key)
        assert good.returncode == 0, (where, documented, good.stderr)
        stored = {n: box.files() for n, box in boxes.items() if box.files()}
        assert len(stored) == 1 and len(next(iter(stored.values()))) == 1, (where, documented, stored)
        _empty(boxes)
        ran += 1
    assert ran >= 6
