"""A plugin's settings as the core hands them over, for its tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator

from cloudbridge_core.config.schema import core_schema, defaults
from cloudbridge_core.settings import convert


def plugin_settings(section_schema: Mapping[str, Any], **values: Any) -> Mapping[str, Any]:
    """The section ``section_schema`` describes, holding ``values`` over the schema's
    defaults, validated and converted as ``load(settings)`` receives it (durations in
    seconds). Raises ``jsonschema.ValidationError`` for values the schema refuses."""
    root = {**core_schema(), "properties": {"section": section_schema}}
    data = {**defaults(root).get("section", {}), **values}
    Draft202012Validator(root).validate({"section": data})
    converted: Mapping[str, Any] = convert(data, section_schema, root)
    return converted
