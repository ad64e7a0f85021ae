"""The settings model (rstash/settings.py): defaults, checks and --dump-config once each."""

from __future__ import annotations

import dataclasses

import pytest

from rstash.settings import BoxPolicy, ServerSettings, dump_settings, settings_fields


def test_every_setting_has_a_check_and_the_defaults_pass_the_policy() -> None:
    assert {f.name for f in settings_fields(BoxPolicy)} == {
        f.name for f in dataclasses.fields(BoxPolicy)}
    assert BoxPolicy().overwrite == "refuse" and BoxPolicy().file_mode == 0o640
    assert ServerSettings().replay_window == 300


def test_a_policy_refuses_executable_modes_and_unknown_overwrite() -> None:
    with pytest.raises(ValueError, match="07111"):
        BoxPolicy(file_mode=0o750)
    with pytest.raises(ValueError, match="overwrite"):
        BoxPolicy(overwrite="clobber")  # type: ignore[arg-type]


def test_checks_turn_toml_values_into_settings() -> None:
    checks = {f.name: f.metadata["check"] for f in settings_fields(BoxPolicy)}
    assert checks["file_mode"]("0600") == 0o600
    assert checks["max_file_size"]("1KiB") == 1024
    assert checks["on_receive"]([]) is None
    with pytest.raises(ValueError, match="true or false"):
        checks["pipe_mode"]("yes")


def test_dump_is_json_ready() -> None:
    dumped = dump_settings(BoxPolicy(allow_names=("*.gz",)))
    assert dumped["file_mode"] == "0640" and dumped["allow_names"] == ["*.gz"]
    assert dump_settings(ServerSettings())["state_dir"] == "/var/lib/rstash"


def test_an_empty_allow_list_means_any_and_other_empty_lists_none() -> None:
    from rstash.settings import empty_means

    assert (empty_means("allow_names"), empty_means("allow_from")) == ("any", "any")
    assert (empty_means("deny_names"), empty_means("keys")) == ("none", "none")
