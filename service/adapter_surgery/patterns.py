"""Regex strings the request hands to ``peft``, refused when matching them could take exponential time.

``peft`` matches a string ``target_modules``/``exclude_modules`` with ``re.fullmatch`` against every module name,
``rank_pattern``/``alpha_pattern`` keys with ``re.match`` and ``layers_pattern`` inside a larger pattern. Python's
``re`` backtracks and holds the GIL while it does, so a pattern such as ``(.*)*z$`` freezes the whole service on
a long module name. Refused (a 422 naming the field): patterns over :data:`MAX_PATTERN` characters; a repeated
group whose body holds a quantifier (``(.*)*``, ``(a+)+``, ``(\\w+\\s?)*``) or an alternation (``(.|.)*``,
``(a|ab)*``: overlapping branches backtrack exponentially too); more than :data:`MAX_UNBOUNDED` unbounded
quantifiers in all (``.*.*.*.*z`` costs n^k steps per failing name).
A list of names is matched by suffix, never as a regex, and is not checked here.
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python >= 3.11
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN = 256
#: Unbounded quantifiers (``*``, ``+``, ``{n,}``) per pattern at most: a failing match costs about n^k steps.
MAX_UNBOUNDED = 3
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)} - {None}
FIX = "Send a list of module names (e.g. ['q_proj', 'v_proj']) or a simpler pattern without a repeated group " \
      "that holds a quantifier or an alternation (e.g. '.*\\.(q_proj|v_proj)')."


def _bodies(op: Any, arg: Any) -> list[Any]:
    """The sub-patterns of one parsed item (groups, branches, lookarounds, conditionals)."""
    if op is sre_parse.SUBPATTERN:
        return [arg[-1]]
    if op is sre_parse.BRANCH:
        return list(arg[1])
    if op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
        return [arg[1]]
    if op is getattr(sre_parse, "ATOMIC_GROUP", None):
        return [arg]
    if op is sre_parse.GROUPREF_EXISTS:
        return [b for b in arg[1:] if b is not None]
    return []


def _repeats(items: Any, inside: bool) -> bool:
    """True where a repeat or an alternation lies inside a repeat of more than once (``inside``: under one)."""
    for op, arg in items:
        if op in _REPEATS:
            if inside:
                return True
            _, high, body = arg
            if _repeats(body, high is sre_parse.MAXREPEAT or high > 1):
                return True
        elif (op is sre_parse.BRANCH and inside) or any(_repeats(body, inside) for body in _bodies(op, arg)):
            return True
    return False


def _unbounded(items: Any) -> int:
    """How many unbounded quantifiers the parsed pattern holds."""
    count = 0
    for op, arg in items:
        if op in _REPEATS:
            count += arg[1] is sre_parse.MAXREPEAT
            count += _unbounded(arg[2])
        else:
            count += sum(_unbounded(body) for body in _bodies(op, arg))
    return count


def why_unsafe(pattern: str) -> str | None:
    """Why matching ``pattern`` could take exponential time, or None (invalid regexes are left to the caller)."""
    if len(pattern) > MAX_PATTERN:
        return f"is {len(pattern)} characters long, over the {MAX_PATTERN} accepted for a regular expression"
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None
    if _repeats(list(parsed), False):
        return (f"{pattern!r} repeats a group that itself holds a quantifier or an alternation (like '(.*)*', "
                "'(a+)+' or '(.|.)*'), which makes regular-expression matching take exponential time")
    if _unbounded(list(parsed)) > MAX_UNBOUNDED:
        return (f"{pattern!r} holds more than {MAX_UNBOUNDED} unbounded quantifiers ('*', '+', '{{n,}}'), which "
                "makes a failing match take polynomial time of that degree")
    return None


def check(value: Any, field: str) -> Any:
    """``value`` (a regex string, a list of names, a dict keyed by regexes, or None) if safe to match.

    Raises:
        ValueError: naming the field and the fix (pydantic answers 422 with ``field`` set).
    """
    if isinstance(value, str):
        patterns = [value]
    elif isinstance(value, dict):
        patterns = [k for k in value if isinstance(k, str)]
    elif isinstance(value, list) and field == "layers_pattern":
        patterns = [v for v in value if isinstance(v, str)]
    else:
        return value
    for pattern in patterns:
        reason = why_unsafe(pattern)
        if reason is not None:
            raise ValueError(f"the regular expression {reason}. {FIX}")
    return value


def checked(value: Any, info: Any) -> Any:
    """A pydantic ``field_validator`` (mode ``after``) running :func:`check` on the field it validates."""
    return check(value, info.field_name)
