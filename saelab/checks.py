"""Type and range checks for values that enter from an option, a file or a request.

Every check returns the value (an int stays an int, a float is finite) or raises
`BadValueError` (exit 2) naming the value and what was expected. A file reader
passes `error=CorruptFileError` and a `where` ("cfg.json: d_sae") so the message
names the file and the field (exit 3). No truthiness: `"no"` is not a bool.

    tokens = integer("--tokens", tokens, low=1)
    lr = number("--lr", lr, low=0, low_open=True)
"""

from __future__ import annotations

import math
from typing import Any

from saelab.errors import BadValueError, SaelabError

# A count of tokens, contexts or steps past this is a typo, not a request: 10^11 tokens is
# twice the largest published SAE training run, and 115 TB as a bf16 cache of a 576-wide
# site. Options checked with `integer(..., high=ABSURD)` refuse it before any work.
ABSURD = 10**11
# Counts kept per feature (top examples, bins): d_sae x this rows must fit in memory.
PER_FEATURE = 10**4
# Samples of one prompt or study cell; each is a full generation, so more is a typo.
MAX_SAMPLES = 10**4
# Seeds: any value numpy and torch both take.
MAX_SEED = 2**63 - 1


def integer(where: str, value: Any, *, low: int | None = None, high: int | None = None,
            error: type[SaelabError] = BadValueError) -> int:
    """`value` as an int in [low, high]; bools and floats (even 3.0) are refused."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{where}={value!r}: expected an integer{_range(low, high)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{where}={value}: expected an integer{_range(low, high)}")
    return value


def number(where: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, error: type[SaelabError] = BadValueError) -> float:
    """`value` as a finite float in [low, high] ((low, high] with `low_open`); NaN/inf refused."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise error(f"{where}={value!r}: expected a number")
    value = float(value)
    ok = math.isfinite(value) and (low is None or value > low or (value == low and not low_open))
    ok = ok and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        want = " and ".join(p for p in (lo, hi) if p)
        raise error(f"{where}={value!r}: expected a finite number{' ' + want if want else ''}")
    return value


def boolean(where: str, value: Any, *, error: type[SaelabError] = BadValueError) -> bool:
    """A JSON true/false only: "no", 0 and None are not booleans."""
    if not isinstance(value, bool):
        raise error(f"{where}={value!r}: expected true or false")
    return value


def choice(where: str, value: Any, allowed: tuple[str, ...] | list[str], *,
           error: type[SaelabError] = BadValueError) -> str:
    """One of `allowed`."""
    if value not in allowed:
        raise error(f"{where}={value!r}: expected one of {', '.join(allowed)}")
    return value


def mapping(where: str, value: Any, *, error: type[SaelabError] = BadValueError) -> dict:
    """A JSON object."""
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__} {value!r:.40}")
    return value


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in {low:,}..{high:,}"
    if low is not None:
        return f" >= {low:,}"
    return f" <= {high:,}" if high is not None else ""
