"""Turning an HTTP body into JSON values, with every failure the client's (a 400).

FastAPI's own body parsing turns invalid UTF-8 and very deep nesting into
exceptions that escape as 500s, and lets lone surrogates (``"\\ud800"``)
through to the tokenizer. This parser is strict instead:

- the bytes must be UTF-8;
- the JSON must parse, and nest at most :data:`MAX_DEPTH` deep;
- no string (key or value) may hold a lone surrogate, since such a string
  can't be encoded as UTF-8 by the tokenizer or written back to the client.

Each failure is an :class:`InvalidRequestError` naming where it is
(``body``, or the path of the offending string, e.g. ``messages[0].content``).
"""

from __future__ import annotations

import json
from typing import Any

from autoglm_server.errors import InvalidRequestError

MAX_DEPTH = 64  # tool schemas nest; nothing legitimate nests deeper than this


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequestError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            "body", f"is not valid UTF-8 (byte {exc.start} of the body)"
        ) from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidRequestError("body", f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            "body", f"is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    check_json_value(value)
    return value


def check_json_value(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Depth and lone surrogates, walked without recursion (the input is untrusted)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or "body")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                top = path.split("[", 1)[0].split(".", 1)[0]
                raise InvalidRequestError(top or "body", f"nests deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    sub = f"{path}.{key}" if path else str(key)
                    _check_text(key, path or "body")
                    stack.append((child, sub, depth + 1))
            else:
                for i, child in enumerate(item):
                    stack.append((child, f"{path}[{i}]", depth + 1))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            path, f"holds a lone surrogate (U+{ord(text[exc.start]):04X}), which is not text"
        ) from None
