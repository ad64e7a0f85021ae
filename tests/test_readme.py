"""The README's install and deployment commands are rstash-recv(8)'s, word for word.

One recipe, told twice: the README short, rstash-recv(8) in full. Every command line of the
README's shell blocks from "Install" on must appear in an example block of rstash-recv(8)
(trailing comments aside), so the two cannot drift apart. Running those commands is
tests/test_deb.py's and tests/test_install.py's business.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def roff_example_lines(page: str) -> set[str]:
    """The lines of every .EX/.EE block of a man page, as they render."""
    lines: set[str] = set()
    for block in re.findall(r"^\.EX\n(.*?)^\.EE", page, flags=re.M | re.S):
        for line in block.splitlines():
            text = (line.replace("\\(aq", "'").replace("\\(dq", '"').replace("\\-", "-")
                    .replace("\\e", "\\"))
            lines.add(text.strip())
    return lines


def readme_commands(section: str = "## Install", end: str = "## Security") -> list[str]:
    """Command lines of the README's ```sh blocks from ``section`` to ``end`` (the security
    figures' command belongs to the test suite, not to the deployment), trailing comments cut."""
    text = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    text = text[text.index(section):text.index(end)]
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}# .*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def test_the_readme_recipe_is_the_man_page_recipe() -> None:
    commands = readme_commands()
    # The recipe's landmarks: the package, pipx, the box, inetd, the ssh password field, the client.
    for must in ("apt-get install ./dist/rstash_", "pipx install .", "rstash-recv -t",
                 "/etc/inetd.conf", "usermod -s /bin/sh -p '*' rstash", "rstash-send --fingerprint"):
        assert any(must in c for c in commands), must
    man = roff_example_lines((CHECKOUT / "man/rstash-recv.8").read_text(encoding="utf-8"))
    missing = [c for c in commands if c not in man]
    assert not missing, "README commands not in rstash-recv(8):\n" + "\n".join(missing)


def test_one_shell_and_one_inetd_line_everywhere() -> None:
    """/bin/sh (never /bin/bash) for the ssh account; one inetd line, with -c."""
    inetd = "rstash stream tcp nowait.400 rstash /usr/bin/rstash-recv rstash-recv -c /etc/rstash/rstash-recv.toml"
    texts = {p: (CHECKOUT / p).read_text(encoding="utf-8")
             for p in ("README.md", "man/rstash-recv.8", "config/sshd_config.d/rstash.conf",
                       "config/inetd.conf")}
    for path, text in texts.items():
        plain = text.replace("\\-", "-")
        assert "--shell /bin/bash" not in plain and "-s /bin/bash" not in plain, path
    assert inetd in texts["README.md"]
    assert inetd in roff_example_lines(texts["man/rstash-recv.8"]) or inetd in texts["man/rstash-recv.8"]
    shipped = [" ".join(line.split()) for line in texts["config/inetd.conf"].splitlines()
               if line.startswith("rstash\t") and "\ttcp\t" in line]
    assert shipped == [inetd]


def test_the_deb_version_named_in_the_docs_is_the_project_version() -> None:
    version = re.search(r'^version = "(.+)"$', (CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"),
                        flags=re.M)
    assert version
    for path in ("README.md", "man/rstash-recv.8"):
        text = (CHECKOUT / path).read_text(encoding="utf-8").replace("\\-", "-")
        named = set(re.findall(r"rstash_([0-9][^_]*)_amd64\.deb", text))
        assert named == {version.group(1)}, (path, named)


def test_troubleshooting_covers_each_message_with_cause_command_and_fix() -> None:
    page = (CHECKOUT / "man/rstash-recv.8").read_text(encoding="utf-8")
    section = page[page.index(".SH TROUBLESHOOTING\n"):page.index(".SH FILES\n")].replace("\\-", "-")
    entries = re.split(r"^\.SS ", section, flags=re.M)[1:]
    # Each entry quotes a message as the programs print it: the quoted part is in the code too.
    messages = ("the server closed the connection before its greeting: rstash-recv could not start there",
                "was refused for box", "key file unusable", "the server could not write into the box",
                "must be readable by its owner only (chmod 600", "must be a quoted octal string, e.g. file_mode = ",
                "no delivery log yet", "the server does not offer method ssh for this box")
    code = "\n".join(p.read_text(encoding="utf-8") for p in (CHECKOUT / "rstash").rglob("*.py"))
    for must in messages:
        assert must in section, must
        assert must in code, f"TROUBLESHOOTING quotes a message the programs no longer print: {must}"
    for must in ("535 authentication failed", "Permission denied (publickey)", "RSTASH_DEMO_PORT", "--status"):
        assert must in section, must
    for entry in entries:
        assert all(f".B {w}" in entry for w in ("Cause:", "Shows it:", "Fix:")), entry[:80]
