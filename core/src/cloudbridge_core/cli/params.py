"""Parameter types for flags written like config values."""

from __future__ import annotations

import click

from cloudbridge_core.durations import parse_duration


class Duration(click.ParamType[float]):
    """A duration flag (``--ttl 24h``), in seconds; a bad one is a usage error naming the flag."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
