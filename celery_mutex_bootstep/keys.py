"""Mutex keys: from a task's arguments to one bounded ZooKeeper node name.

A key is ``sha256(canonical_json([mutex_name, [value, ...]]))`` in hex, where
``mutex_name`` is the task name (or a shared ``mutex_name``) and the values are
the selected arguments in ``mutex_keys`` order. Parameter names are not part of
the key, so tasks that share a mutex name agree on a key when their values do.

Guarantees:

* the node name is 64 characters of ``[0-9a-f]`` whatever the values hold
  (slashes, unicode, megabytes), so it is always a valid, bounded znode name;
* equal JSON values give equal keys on every worker and Python version: the
  encoding is canonical (sorted object keys, no whitespace, ASCII escapes,
  shortest round-trip floats, integral floats written as integers);
* a value that JSON cannot encode canonically (bytes, sets, datetimes, NaN,
  objects with non-string keys, ...) raises :class:`MutexKeyError` naming the
  task and the parameter; it never falls back to ``repr``.

``KEY_FORMAT`` is part of the stored data: changing the encoding or the digest
would silently split a mutex across worker versions, so the test suite pins
the digest with fixed vectors.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Sequence

from .exceptions import MutexKeyError

__all__ = ('KEY_FORMAT', 'canonical_json', 'key_digest', 'CanonicalJSONError')

KEY_FORMAT = 1

# Floats with an integral value below this are written as integers, so 1.0
# and 1 share a key (as in JavaScript and RFC 8785); above it floats are not
# exact integers anyway.
_EXACT_FLOAT_INT = 2 ** 53

_encode_str = json.JSONEncoder(ensure_ascii=True).encode


class CanonicalJSONError(TypeError):
    """The value has no canonical JSON form; ``path`` says where inside it."""

    def __init__(self, reason: str, path: str = '') -> None:
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        where = f' at {self.path}' if self.path else ''
        return f'{self.reason}{where}'


def canonical_json(value: Any) -> str:
    """Encode ``value`` as canonical JSON text, or raise CanonicalJSONError."""
    parts: list[str] = []
    try:
        _encode(value, parts, '')
    except RecursionError:
        raise CanonicalJSONError('value is nested too deeply') from None
    return ''.join(parts)


def _encode(value: Any, out: list[str], path: str) -> None:
    # bool before int: True is an int in Python but not in JSON.
    if value is None:
        out.append('null')
    elif value is True:
        out.append('true')
    elif value is False:
        out.append('false')
    elif isinstance(value, str):
        out.append(_encode_str(value))
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalJSONError(f'{value!r} is not a JSON number', path)
        if value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
            out.append(int.__repr__(int(value)))
        else:
            out.append(float.__repr__(value))
    elif isinstance(value, (list, tuple)):
        out.append('[')
        for i, item in enumerate(value):
            if i:
                out.append(',')
            _encode(item, out, f'{path}[{i}]')
        out.append(']')
    elif isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise CanonicalJSONError(
                    f'object key {k!r} is not a string', path)
        out.append('{')
        for i, k in enumerate(sorted(value)):
            if i:
                out.append(',')
            out.append(_encode_str(k))
            out.append(':')
            _encode(value[k], out, f'{path}[{k!r}]')
        out.append('}')
    else:
        raise CanonicalJSONError(
            f'{type(value).__name__} is not a JSON type', path)


def key_digest(name: str, values: Sequence[Any], *,
               task: str | None = None,
               params: Sequence[str] | None = None) -> str:
    """Return the 64-hex-digit key of ``values`` under mutex ``name``.

    ``task`` and ``params`` only name things in the error raised when a value
    cannot be encoded.
    """
    encoded = []
    for i, value in enumerate(values):
        try:
            encoded.append(canonical_json(value))
        except CanonicalJSONError as exc:
            param = params[i] if params and i < len(params) else f'#{i}'
            raise MutexKeyError(
                f'task {task or name!r}: mutex key parameter {param!r} '
                f'cannot be encoded as canonical JSON ({exc}); mutex keys '
                f'must be JSON values (str, int, float, bool, None, lists '
                f'and str-keyed dicts of those)') from None
    payload = '[' + _encode_str(name) + ',[' + ','.join(encoded) + ']]'
    return hashlib.sha256(payload.encode('ascii')).hexdigest()
