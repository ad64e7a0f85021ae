"""Destinations and the ssh command line (rstash/client/destinations.py): pure functions,
no process started. That a refused destination stops rstash-send before any connection is in
tests/test_send.py."""

from __future__ import annotations

import pytest

from rstash.client.destinations import Dest, parse_dest, ssh_argv
from rstash.errors import UsageError


@pytest.mark.parametrize(("text", "want"), [
    ("rstash://backup.example.org/vm1", Dest("rstash", "backup.example.org", None, "vm1")),
    ("rstash://192.0.2.7:7371/vm1", Dest("rstash", "192.0.2.7", 7371, "vm1")),
    ("rstash://[::1]/vm1", Dest("rstash", "::1", None, "vm1")),
    ("rstash://[::1]:7370/a.b_c-d", Dest("rstash", "::1", 7370, "a.b_c-d")),
    ("rstash://[2001:db8::7]:1/vm1", Dest("rstash", "2001:db8::7", 1, "vm1")),
    ("ssh://host/vm1", Dest("ssh", "host", None, "vm1")),
    ("ssh://rstash@host:2222/vm1", Dest("ssh", "host", 2222, "vm1", "rstash")),
    ("ssh://rstash@[::1]:22/vm1", Dest("ssh", "::1", 22, "vm1", "rstash")),
])
def test_destinations_parse(text: str, want: Dest) -> None:
    assert parse_dest(text) == want


@pytest.mark.parametrize("text", [
    # argument injection into ssh: an option where a host or user belongs
    "ssh://-oProxyCommand=x/box",
    "ssh://-x@host/box",
    "ssh://user@-oProxyCommand=x/box",
    "rstash://-h/box",
    # a shell reaches the host through --proxy-command %h (and ssh's ProxyCommand)
    "rstash://$(id>&2)/vm1",
    "ssh://`id`@host/vm1",
    "ssh://a@b@c/vm1",
    "rstash://a;b/vm1",
    "rstash://a b/vm1",
    "rstash://[::1;id]/vm1",
    # the box travels in HELLO and must be a box name
    "ssh://host/-box",
    "ssh://host/.box",
    "ssh://host/../etc",
    "ssh://host/a b",
    "ssh://host/" + "b" * 65,
    # not a destination
    "ssh://host/",
    "ssh://host",
    "host:/box",
    "http://host/box",
    "rstash://user@host/vm1",
    "rstash://host:0/vm1",
    "rstash://host:65536/vm1",
    "rstash://host:/vm1",
    "rstash://[::1/vm1",
    "",
])
def test_bad_destinations_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_dest(text)


def test_ssh_argv_is_exactly_the_documented_one() -> None:
    plain = Dest("ssh", "host", None, "vm1")
    assert ssh_argv("ssh", plain, "rstash-recv", False) == [
        "ssh", "-T", "-o", "BatchMode=yes", "--", "host", "rstash-recv"]
    full = Dest("ssh", "host", 2222, "vm1", "backup")
    assert ssh_argv("ssh", full, "rstash-recv", False) == [
        "ssh", "-p", "2222", "-l", "backup", "-T", "-o", "BatchMode=yes", "--", "host", "rstash-recv"]
    only_user = Dest("ssh", "host", None, "vm1", "backup")
    assert ssh_argv("ssh", only_user, "/opt/bin/rstash-recv", False) == [
        "ssh", "-l", "backup", "-T", "-o", "BatchMode=yes", "--", "host", "/opt/bin/rstash-recv"]
    only_port = Dest("ssh", "::1", 22, "vm1")
    assert ssh_argv("ssh", only_port, "rstash-recv", True) == [
        "ssh", "-p", "22", "-T", "-o", "BatchMode=yes", "-s", "--", "::1", "rstash"]
    assert ssh_argv("ssh", full, "ignored", True) == [
        "ssh", "-p", "2222", "-l", "backup", "-T", "-o", "BatchMode=yes", "-s", "--", "host", "rstash"]


def test_the_box_never_reaches_the_remote_command() -> None:
    argv = ssh_argv("ssh", parse_dest("ssh://u@h:2/secretbox"), "rstash-recv", False)
    assert not any("secretbox" in a for a in argv)


def test_rsh_is_split_like_a_shell_and_never_run_by_one() -> None:
    dest = Dest("ssh", "host", None, "vm1")
    rsh = """/usr/bin/ssh -i '/keys/my key' -o "ProxyJump=jump host" -F /dev/null;touch\\ x"""
    assert ssh_argv(rsh, dest, "rstash-recv", False) == [
        "/usr/bin/ssh", "-i", "/keys/my key", "-o", "ProxyJump=jump host", "-F", "/dev/null;touch x",
        "-T", "-o", "BatchMode=yes", "--", "host", "rstash-recv"]
    with pytest.raises(UsageError):
        ssh_argv("   ", dest, "rstash-recv", False)
    with pytest.raises(ValueError):  # shlex: an unbalanced quote is not guessed at
        ssh_argv("ssh -i 'x", dest, "rstash-recv", False)

