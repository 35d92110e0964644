"""Naming an utterance: cache_key (the SHA-256 of a canonical JSON form of what the
audio depends on) and the shape every key must have.
"""

from __future__ import annotations

import hashlib as _hashlib
import json as _json
import math as _math
import re as _re

import numpy as np

from luna_shm import _lowlevel

KEY = _re.compile(r"[A-Za-z0-9_-]{1,128}")


def cache_key(text: str, *, voice: object = None, engine: object = None,
              **options: object) -> str:
    """A stable key for an utterance: the SHA-256 of a canonical JSON form of the arguments.

    The same arguments give the same key in every process and Python version
    (keys sorted, no whitespace, floats as their shortest repr). numpy scalars count
    as the Python numbers of their value (``np.int64(1)`` as ``1``).

    Args:
        text: what is said.
        voice, engine, options: anything else the audio depends on; JSON values
            only (str, int, float, bool, None, lists and str-keyed dicts of them).

    Returns:
        64 lowercase hex digits.

    Raises:
        TypeError: text is not a str, a value is not JSON, or a dict has a key that is
            not a str (JSON would turn ``1`` and ``None`` into ``"1"`` and ``"null"``, so
            two different values would get one key); the message names where.
        ValueError: a float is NaN or infinite, an int has more than 4300 digits, a
            str holds a lone surrogate (it has no UTF-8 form), a list or dict
            contains itself, or lists and dicts are nested more than 100 deep.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {_lowlevel.brief(text)}")
    form = {"text": _json_form("text", text, ()), "voice": _json_form("voice", voice, ()),
            "engine": _json_form("engine", engine, ()),
            "options": {name: _json_form(name, value, ()) for name, value in options.items()}}
    try:
        canonical = _json.dumps(form, sort_keys=True, ensure_ascii=False,
                                separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # sys.set_int_max_str_digits lowered below 4300 digits
        raise ValueError(f"cache_key arguments have no canonical JSON form: {exc}") from None
    return _hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# Ints of more digits than this have no str form under Python's default limit (and the
# limit is a per-process setting: a key must not depend on it).
_MAX_KEY_INT = 10**4300
# Lists and dicts nested deeper than this are refused (a ValueError naming the argument):
# the form is built, and json.dumps writes it, by recursion, which ends in RecursionError
# far sooner than any real option needs (the interpreter's limit is a per-process setting).
_MAX_KEY_DEPTH = 100


def _utf8_str(where: str, text: str) -> str:
    """text, when it has a UTF-8 form (no lone surrogate); else ValueError naming where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"cache_key argument {where} holds a lone surrogate "
                         f"{text[exc.start]!r} at index {exc.start}, which has no UTF-8 "
                         f"form: got {_lowlevel.brief(text)}") from None
    return text


def _json_form(where: str, value: object, within: tuple[int, ...]) -> object:
    """value as plain JSON values (numpy scalars as Python numbers), checked so that
    json.dumps gives its one canonical form; where names it in an error (``speed['a'][0]``),
    within holds the ids of the lists and dicts around it (a cycle is refused)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _utf8_str(where, value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        number = int(value)
        if not -_MAX_KEY_INT < number < _MAX_KEY_INT:
            raise ValueError(f"cache_key argument {where} is too large an int for a key (at "
                             f"most 4300 digits), got {_lowlevel.brief(number)}")
        return number
    if isinstance(value, float | np.floating):
        real = float(value)
        if not _math.isfinite(real):
            raise ValueError(f"cache_key arguments must be finite numbers: {where} is {real!r}")
        return real
    if isinstance(value, list | tuple | dict):
        if id(value) in within:
            raise ValueError(f"cache_key argument {where} contains itself")
        if len(within) >= _MAX_KEY_DEPTH:
            argument = where.partition("[")[0]  # the whole path would be 100 indexes long
            raise ValueError(f"cache_key argument {argument} is nested more than "
                             f"{_MAX_KEY_DEPTH} lists or dicts deep")
        inner = (*within, id(value))
        if isinstance(value, dict):
            form: dict[str, object] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"cache_key argument {where} has a dict key that is not a "
                                    f"str: {_lowlevel.brief(key)} (only str-keyed dicts have "
                                    "one JSON form)")
                name = _utf8_str(f"{where} (a dict key)", key)
                form[name] = _json_form(f"{where}[{_lowlevel.brief(key)}]", item, inner)
            return form
        return [_json_form(f"{where}[{i}]", item, inner) for i, item in enumerate(value)]
    raise TypeError(f"cache_key arguments must be JSON values (str, int, float, bool, None, "
                    f"lists and str-keyed dicts of them): {where} is a {type(value).__name__}, "
                    f"{_lowlevel.brief(value)}")


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (see cache_key), got {_lowlevel.brief(key)}")
    if not KEY.fullmatch(key):
        raise ValueError(f"key must be 1 to 128 characters of A-Z, a-z, 0-9, '_' or '-' "
                         f"(cache_key makes one), got {key!r}")
    return key
