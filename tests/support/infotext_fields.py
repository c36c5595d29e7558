"""Read the ``key: value`` line of an image's generation parameters the way the WebUIs do.

A1111 1.10 (``modules/infotext_utils.py`` ``quote``/``unquote``), Forge and Neo write a value that
holds a comma, colon or newline as a JSON string (``SEG layers: "d0,s0"``) and read it back with
``json.loads``; other values stand bare up to the next comma.  The e2e tests read SEG's fields through
this, so they do not depend on whether a host quotes.  Written from that documented behaviour.
"""

from __future__ import annotations

import json


def _quoted_end(text: str, start: int) -> int:
    """Index just past the JSON string that opens at ``text[start] == '"'``."""
    index = start + 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == '"':
            return index + 1
        index += 1
    raise ValueError(f"unterminated quoted value in {text[start:]!r}")


def parameter_fields(parameters: str) -> dict[str, str]:
    """``{key: value}`` of the last line of ``parameters`` (the host's ``Steps: 3, Sampler: ...`` line)."""
    line = parameters.strip().splitlines()[-1] if parameters.strip() else ""
    fields: dict[str, str] = {}
    index = 0
    while index < len(line):
        colon = line.find(":", index)
        if colon < 0:
            break
        key = line[index:colon].strip()
        index = colon + 1
        while index < len(line) and line[index] == " ":
            index += 1
        if index < len(line) and line[index] == '"':
            end = _quoted_end(line, index)
            value = json.loads(line[index:end])
            index = line.find(",", end)
        else:
            comma = line.find(",", index)
            value = line[index:] if comma < 0 else line[index:comma]
            index = comma
        fields[key] = value.strip()
        if index < 0:
            break
        index += 1
    return fields
