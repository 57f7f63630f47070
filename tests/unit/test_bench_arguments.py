"""The benchmark's command line: settings passed on to the product's instances."""

from __future__ import annotations

import pytest

from bench.__main__ import instance_settings, parse_arguments


def test_instance_settings_become_the_instances_variables() -> None:
    arguments = parse_arguments(["--instance-setting", "RECONCILER_WORKERS=32",
                                 "--instance-setting", "RECONCILER_DB_POOL_SIZE=a=b"])
    assert instance_settings(arguments) == {"RECONCILER_WORKERS": "32",
                                            "RECONCILER_DB_POOL_SIZE": "a=b"}
    assert instance_settings(parse_arguments([])) == {}


@pytest.mark.parametrize("setting", ["RECONCILER_WORKERS", "KAFKA_BOOTSTRAP_SERVERS=x", "=1"])
def test_anything_but_a_reconciler_variable_is_refused(
    setting: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--instance-setting", setting])
    assert exit_info.value.code == 2
    assert "expected RECONCILER_<NAME>=<value>" in capsys.readouterr().err
