"""What a browser request may carry: its body (length, JSON depth) and each field's type.

Every value a client sends is checked here before the server uses it, by JSON
type, not by truthiness: `true` is not the integer 1, `"no"` is not a boolean,
`5.0` is not a feature id. Bodies are JSON by Content-Type too (415 otherwise). A body nested deeper than MAX_DEPTH is refused before
the parser recurses, and a POST without one valid Content-Length is answered at
once (411/400) instead of waiting for bytes that never come.

All refusals are `HttpError(status, message)`; the message names the field and
the type or range it must have.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from email.message import Message
from typing import Any, BinaryIO

MAX_BODY = 64 * 1024  # bytes of a POST body
MAX_DEPTH = 32  # nesting of [ and { in a body; our bodies are flat objects (depth 1)

_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
# A JSON string: one character or one escape at a time (no nested quantifier, so
# an unterminated string costs one linear scan, never a backtracking blow-up).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_UINT = re.compile(r"[0-9]{1,18}")
_INT = re.compile(r"-?[0-9]{1,18}")


class HttpError(Exception):
    """A request refused with an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- the body


def content_length(headers: Message) -> int:
    """The declared size of a POST body in bytes, 0..MAX_BODY.

    Raises HttpError 411 (absent, or a chunked body), 400 (negative, not a
    number, given twice with different values), 413 (over MAX_BODY).
    """
    if headers.get("Transfer-Encoding") is not None:
        raise HttpError(411, "chunked request bodies are not accepted: send the JSON body "
                             "with a Content-Length header")
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        raise HttpError(411, "a POST needs a Content-Length header (the size of its JSON body "
                             "in bytes)")
    if len(set(values)) != 1 or not _UINT.fullmatch(values[0]):
        shown = ", ".join(values)[:40]
        raise HttpError(400, f"Content-Length must be one non-negative integer, got {shown!r}")
    length = int(values[0])
    if length > MAX_BODY:
        raise HttpError(413, f"request body of {length} bytes; at most {MAX_BODY}")
    return length


def read_json_body(headers: Message, rfile: BinaryIO) -> dict[str, Any]:
    """Read and parse a POST body that must be a JSON object (an empty body is `{}`).

    Raises HttpError 411/400/413 (see `content_length`), 415 unless the
    Content-Type is application/json, 408 when the client
    stops sending before Content-Length bytes (the socket's read timeout), 400
    for a body that is cut short, not UTF-8, nested deeper than MAX_DEPTH, not
    JSON (NaN and Infinity included), holds a key twice, or is not an object.
    """
    length = content_length(headers)
    # Only JSON: a page on another site can send a text/plain or form POST to localhost
    # without asking, but a JSON one needs a CORS preflight that this server never grants.
    ctype = headers.get_content_type() if headers.get("Content-Type") else None
    if ctype != "application/json":
        raise HttpError(415, f"the request body must be sent as Content-Type: application/json, "
                             f"got {str(headers.get('Content-Type'))[:60]!r}")
    try:
        raw = rfile.read(length) if length else b""
    except TimeoutError:
        raise HttpError(408, f"the request body stopped arriving before its {length} bytes "
                             "(Content-Length); send the whole body at once") from None
    if len(raw) < length:
        raise HttpError(400, f"the request body has {len(raw)} bytes but Content-Length says "
                             f"{length}")
    if not raw.strip():
        return {}
    depth = json_depth(raw)
    if depth > MAX_DEPTH:
        raise HttpError(400, f"the request body is nested {depth} deep; at most {MAX_DEPTH} "
                             "(the API takes a flat JSON object)")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                          object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise HttpError(400, "the request body is not UTF-8 text") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise HttpError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { in `raw` outside strings (an upper bound when it is not JSON)."""
    depth = peak = 0
    for byte in _STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            peak = max(peak, depth)
        else:
            depth -= 1
    return peak


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out


# ---------------------------------------------------------------- body fields


def check_keys(body: dict[str, Any], allowed: Iterable[str], what: str) -> None:
    """Refuse (400) fields that `what` does not take: a typo must not be silently ignored."""
    allowed = tuple(allowed)
    extra = sorted(set(body) - set(allowed))
    if extra:
        takes = ", ".join(allowed) if allowed else "no fields"
        raise HttpError(400, f"{what} takes {takes}; unknown field(s): "
                             f"{', '.join(repr(k[:40]) for k in extra[:5])}")


def int_field(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    """An integer field in [lo, hi] (JSON true/false and 5.0 are refused); default None: required."""
    value = _get(body, key, default, "an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(key, "an integer (a JSON number without a fraction)", value)
    if not lo <= value <= hi:
        raise HttpError(400, f'field "{key}" must be an integer in [{lo}, {hi}], got {value}')
    return value


def number_field(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """A finite number field in [lo, hi] (JSON true/false and strings are refused)."""
    value = _get(body, key, default, "a number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(key, "a number", value)
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise HttpError(400, f'field "{key}" must be a number in [{lo:g}, {hi:g}], got {value!r}')
    return value


def bool_field(body: dict[str, Any], key: str, default: bool) -> bool:
    """A JSON true/false field ("no", 0 and null are refused, not read by truthiness)."""
    value = _get(body, key, default, "true or false")
    if not isinstance(value, bool):
        raise _wrong_type(key, "true or false", value)
    return value


def text_field(body: dict[str, Any], key: str, max_chars: int) -> str:
    """A required non-blank string field; longer than max_chars: 413."""
    value = _get(body, key, None, "a string")
    if not isinstance(value, str):
        raise _wrong_type(key, "a string", value)
    if not value.strip():
        raise HttpError(400, f'field "{key}" is blank; give some text')
    if len(value) > max_chars:
        raise HttpError(413, f'field "{key}" has {len(value)} characters; at most {max_chars}')
    return value


def choice_field(body: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """A string field that must be one of `choices`."""
    value = _get(body, key, default, "a string")
    if not isinstance(value, str):
        raise _wrong_type(key, f"one of the strings {', '.join(choices)}", value)
    if value not in choices:
        raise HttpError(400, f'field "{key}" must be one of {", ".join(choices)}, got {value[:40]!r}')
    return value


def _get(body: dict[str, Any], key: str, default: Any, expected: str) -> Any:
    if key in body:
        return body[key]
    if default is None:
        raise HttpError(400, f'field "{key}" is missing; it must be {expected}')
    return default


def _wrong_type(key: str, expected: str, value: Any) -> HttpError:
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return HttpError(400, f'field "{key}" must be {expected}, got {shown} ({_json_type(value)})')


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


# ---------------------------------------------------------------- URL parts


def path_int(text: str, what: str) -> int:
    """A non-negative integer from a URL segment: ASCII digits only ("+3", "1_0", " 3" refused)."""
    if not _UINT.fullmatch(text):
        raise HttpError(400, f"{what} {text[:40]!r} is not an integer (up to 18 ASCII digits)")
    return int(text)


def check_query(query: dict[str, list[str]], allowed: Iterable[str], what: str) -> None:
    """Refuse (400) unknown query parameters and any parameter given twice."""
    allowed = tuple(allowed)
    extra = sorted(set(query) - set(allowed))
    if extra:
        takes = ", ".join(allowed) if allowed else "no query parameters"
        raise HttpError(400, f"{what} takes {takes}; unknown: {', '.join(repr(k[:40]) for k in extra[:5])}")
    twice = sorted(k for k, v in query.items() if len(v) > 1)
    if twice:
        raise HttpError(400, f"query parameter {twice[0]!r} is given {len(query[twice[0]])} times; give it once")


def query_int(query: dict[str, list[str]], key: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in [lo, hi] (ASCII digits, optional minus)."""
    raw = query.get(key, [str(default)])[0]
    if not _INT.fullmatch(raw):
        raise HttpError(400, f"{key} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise HttpError(400, f"{key}={value} is out of range [{lo}, {hi}]")
    return value


def query_choice(query: dict[str, list[str]], key: str, default: str, choices: tuple[str, ...]) -> str:
    """A query parameter that must be one of `choices`."""
    value = query.get(key, [default])[0]
    if value not in choices:
        raise HttpError(400, f"{key} must be one of {', '.join(choices)}; got {value[:40]!r}")
    return value
