"""The ``cloudbridge`` command's entry point.

Loading the CLI takes a few hundred milliseconds (click, jsonschema, the plugins' entry
points); a Ctrl-C in that time would otherwise end in Python's KeyboardInterrupt traceback.
This module imports nothing before its guard, so that the window before it is little more
than the interpreter's start.
"""

import sys


def main() -> None:
    try:
        from cloudbridge_core.cli.main import main as run_cli  # noqa: PLC0415 - guarded import
    except KeyboardInterrupt:
        from cloudbridge_core.errors import ExitCode  # noqa: PLC0415 - only once interrupted

        sys.stderr.write("interrupted\n")
        sys.exit(ExitCode.INTERRUPTED)
    run_cli()
