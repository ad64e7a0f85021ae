"""rstash.tomlfile: one TOML file read, and every configuration problem on one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from rstash.tomlfile import field_path, problem_line, read_toml


@pytest.mark.parametrize(("parts", "path"), [
    (("box", "vm1", "quota"), "box.vm1.quota"),
    (("box", "vm 1", "quota"), 'box."vm 1".quota'),
    (("box", 'a"b\\c'), 'box."a\\"b\\\\c"'),
    (("box", "x\ny"), 'box."x\\u000Ay"'),
    (("listen", 0, "port"), "listen[0].port"),
])
def test_field_paths_are_quoted_the_way_toml_needs(parts: tuple[str | int, ...], path: str) -> None:
    assert field_path(*parts) == path


def test_a_problem_is_one_line_with_file_and_field() -> None:
    assert problem_line("r.toml", "box.vm1", "too\n  many\tspaces") == "r.toml: box.vm1: too many spaces"
    assert problem_line("r.toml", "", "cannot read") == "r.toml: cannot read"


def test_a_valid_file_is_read_and_adds_no_problem(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('state_dir = "/var/lib/rstash"\n[box.vm1]\npath = "/srv/vm1"\n')
    problems: list[str] = []
    assert read_toml(str(f), problems) == {"state_dir": "/var/lib/rstash", "box": {"vm1": {"path": "/srv/vm1"}}}
    assert problems == []


def test_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    problems: list[str] = []
    assert read_toml(str(tmp_path / "absent.toml"), problems) is None
    [line] = problems
    assert line.startswith(f"{tmp_path / 'absent.toml'}: cannot read: ")


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_bytes(b'a = "x"\nb = "\xff"\n')
    problems: list[str] = []
    assert read_toml(str(f), problems) is None
    assert problems == [f"{f}: line 2: not valid UTF-8"]


def test_a_toml_error_names_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('a = 1\nb = = 2\n')
    problems: list[str] = []
    assert read_toml(str(f), problems) is None
    [line] = problems
    assert line.startswith(f"{f}: line 2: ") and "(column " in line and "\n" not in line


def test_an_unquoted_file_mode_says_what_to_write(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text("file_mode = 0640\n")
    problems: list[str] = []
    assert read_toml(str(f), problems) is None
    assert problems == [f'{f}: line 1: file_mode must be a quoted octal string, e.g. file_mode = "0640"']
