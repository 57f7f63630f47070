"""Command-line arguments the contract refuses are refused before anything is contacted:
exit 2 and one line naming the rule."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from reconciler.cli import main


@pytest.mark.parametrize("command", ["enable", "disable", "delete"])
@pytest.mark.parametrize("config_id", ["\udcff\udcfe", "", "two words", "x" * 201, "a/b"])
def test_an_invalid_config_id_exits_2_naming_the_rule(
    command: str, config_id: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A database that would refuse at once, were it contacted.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    result = CliRunner().invoke(main, ["config", command, config_id])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "is not valid: an id is 1 to 200 characters of A-Z a-z 0-9 . _ : -" in lines[0]
    assert "PostgreSQL" not in lines[0]


@pytest.mark.parametrize("instance_id", ["", "two words"])
def test_an_invalid_instance_id_on_the_command_line_is_refused_as_in_the_environment(
    instance_id: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none")
    result = CliRunner().invoke(main, ["run", "--instance-id", instance_id])
    assert result.exit_code == 2, result.output
    assert "invalid settings: RECONCILER_INSTANCE_ID" in result.output


def test_a_dot_env_file_that_is_not_utf8_is_refused_in_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / ".env").write_bytes(b"\xff\xfeRECONCILER_INSTANCE_ID=a\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "reconciler: invalid settings: the .env file in this folder is not UTF-8 text")
