"""Tenant ids: the one pattern every token, invite and wire message is checked against.

A tenant id scopes everything (sessions, egress rules, mesh peers, metrics labels, log
lines), so it is a short, plain name: lowercase letters, digits, ``.``, ``_`` and ``-``,
starting with a letter or digit, at most 63 characters. That rules out wildcards (``*``),
path tricks (``../../x``), control characters and NUL, and unbounded sizes (a security
limit). ``schemas/protocol/messages.schema.json`` carries the same pattern.
"""

from __future__ import annotations

import re

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_TENANT_ID = re.compile(TENANT_ID_PATTERN)


def is_tenant_id(value: object) -> bool:
    """Whether ``value`` is a string matching :data:`TENANT_ID_PATTERN`."""
    # fullmatch: "$" alone would accept a trailing newline
    return isinstance(value, str) and _TENANT_ID.fullmatch(value) is not None
