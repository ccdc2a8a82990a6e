"""The error tree, its codes and exit codes agree with what users are told.

Two drawings are parsed here so they cannot drift from the classes: the tree in the
docstring of ``errors.py`` (copied verbatim into ``docs/errors.md``) and the table of
codes in ``docs/errors.md``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from cloudbridge_core import errors
from cloudbridge_core.cli.main import cli
from cloudbridge_core.durations import parse_duration
from cloudbridge_core.errors import CircuitOpen, ExitCode, all_error_classes

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
TREE_LINE = re.compile(
    r"^(?P<indent>[│├└─ ]*)(?P<name>\w+) +(?P<code>\w+) +exit (?P<exit>\d+)"
    r"(?: +retry after (?P<delay>.+))?$"
)
TABLE_ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| (yes|no) \|([^|]*)\| (\d+) \|", re.MULTILINE)


def docstring_tree() -> list[str]:
    """The lines of the tree drawn in the docstring of ``errors.py``, dedented."""
    block = (errors.__doc__ or "").split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return textwrap.dedent(block).splitlines()


def documented_codes() -> dict[str, tuple[str, str, str, str]]:
    """code -> (class name, retryable, default delay, exit code) from docs/errors.md."""
    return {
        code: (name, retryable, delay.strip(), exit_code)
        for code, name, retryable, delay, exit_code in TABLE_ROW.findall(DOC.read_text())
    }


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(codes) == len(set(codes))


def test_docstring_tree_matches_the_classes() -> None:
    classes = {cls.__name__: cls for cls in all_error_classes()}
    parents: list[str] = []  # the last class seen at each depth
    drawn = []
    for line in docstring_tree():
        match = TREE_LINE.match(line)
        assert match, f"unreadable tree line {line!r}"
        depth = len(match["indent"]) // 4  # each level of the drawing is four characters
        cls = classes[match["name"]]
        parents[depth:] = [cls.__name__]
        if depth:
            assert cls.__bases__[0].__name__ == parents[depth - 1], line
        assert cls.code == match["code"], line
        assert int(match["exit"]) == cls.exit_code, line
        if cls.retry_delay is None:
            assert match["delay"] is None or cls is CircuitOpen, line
        else:
            assert parse_duration(match["delay"]) == cls.retry_delay, line
        drawn.append(cls.__name__)
    assert sorted(drawn) == sorted(classes)


def test_docs_show_the_same_tree() -> None:
    assert "\n".join(docstring_tree()) in DOC.read_text()


def test_docs_table_matches_the_classes() -> None:
    documented = documented_codes()
    assert set(documented) == {cls.code for cls in all_error_classes()}
    for cls in all_error_classes():
        name, retryable, delay, exit_code = documented[cls.code]
        assert name == cls.__name__
        assert (retryable == "yes") == cls.retryable, cls
        assert int(exit_code) == cls.exit_code, cls
        if cls.retry_delay is not None:
            assert parse_duration(delay) == cls.retry_delay, cls
        elif cls is not CircuitOpen:
            assert delay == "", cls


def test_retryable_errors_say_when() -> None:
    for cls in all_error_classes():
        if cls.retryable and cls is not CircuitOpen:
            assert cls.retry_delay is not None
            assert cls.retry_delay > 0
        if not cls.retryable:
            assert cls.retry_delay is None, cls


def test_exit_codes_are_documented_everywhere() -> None:
    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", DOC.read_text(), re.MULTILINE))
    assert {int(code) for code in table} == {int(code) for code in ExitCode}
    assert {int(code) for code in ExitCode} == {0, 1, 2, 3, 4, 5, 6, 130}
    help_text = cli.help or ""
    for code in ExitCode:
        assert f"{int(code)} " in help_text
