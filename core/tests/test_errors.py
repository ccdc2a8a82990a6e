"""The error tree, its codes and exit codes agree with what users are told."""

from __future__ import annotations

import re
from pathlib import Path

from cloudbridge_core.cli.main import cli
from cloudbridge_core.errors import CircuitOpen, ExitCode, all_error_classes

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def documented_codes() -> dict[str, tuple[str, str, str]]:
    """code -> (class name, retryable, exit code) from the table in docs/errors.md."""
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (yes|no) \|[^|]*\| (\d+) \|", DOC.read_text(), re.M)
    return {code: (name, retryable, exit_code) for code, name, retryable, exit_code in rows}


def test_codes_are_unique_and_documented() -> None:
    classes = all_error_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    documented = documented_codes()
    assert set(documented) == set(codes)
    for cls in classes:
        name, retryable, exit_code = documented[cls.code]
        assert name == cls.__name__
        assert (retryable == "yes") == cls.retryable, cls
        assert int(exit_code) == cls.exit_code, cls


def test_retryable_errors_say_when() -> None:
    for cls in all_error_classes():
        if cls.retryable and cls is not CircuitOpen:
            assert cls.retry_delay is not None
            assert cls.retry_delay > 0


def test_exit_codes_are_documented_everywhere() -> None:
    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", DOC.read_text(), re.M))
    assert {int(code) for code in table} == {int(code) for code in ExitCode}
    help_text = cli.help or ""
    for code in ExitCode:
        assert f"{int(code)} " in help_text
