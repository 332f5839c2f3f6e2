"""The wire format between the sandbox's processes: strict JSON and tagged plain values.

Standard library C modules only (``_json``, ``math``), because every sandboxed process pays for
its imports at start-up. This file is prepended to ``harness.py`` to make the one program the
sandbox runs (see ``sandbox.HARNESS_SOURCE``); the parent imports it like any module.
"""

import _json
import math

# -- JSON without the json package (it imports re, which costs more than the interpreter) ----


class _Strict:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name):
        raise ValueError("JSON constant " + name + " refused")


_scan = _json.make_scanner(_Strict())


def loads(text):
    """Strict JSON (no NaN/Infinity, nothing after the value) into plain values."""
    text = text.strip()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("truncated JSON") from None
    if end != len(text):
        raise ValueError("trailing data after JSON value")
    return value


def dumps(obj):
    """JSON for plain values (str keys, finite floats); anything else is a TypeError."""
    t = type(obj)
    if obj is None:
        return "null"
    if t is bool:
        return "true" if obj else "false"
    if t is int:
        return int.__repr__(obj)
    if t is float:
        if not math.isfinite(obj):
            raise ValueError("non-finite float")
        return float.__repr__(obj)
    if t is str:
        return _json.encode_basestring_ascii(obj)
    if t is list:
        return "[" + ",".join([dumps(x) for x in obj]) + "]"
    if t is dict:
        parts = []
        for key, value in obj.items():
            if type(key) is not str:
                raise TypeError("JSON object keys must be str")
            parts.append(_json.encode_basestring_ascii(key) + ":" + dumps(value))
        return "{" + ",".join(parts) + "}"
    raise TypeError("cannot write " + t.__name__ + " as JSON")


# -- tagged JSON: exact builtin types only, so decoding yields plain values -----------------


def encode(obj, depth=0):
    """Plain data as JSON-able values; tuples, sets, bytes, complex and odd floats tagged."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is int or t is str:
        return obj
    if t is float:
        return obj if math.isfinite(obj) else {"__f": repr(obj)}
    if t is list:
        return [encode(x, depth + 1) for x in obj]
    if t is tuple:
        return {"__t": [encode(x, depth + 1) for x in obj]}
    if t is dict:
        return {"__d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in obj.items()]}
    if t is set or t is frozenset:
        return {"__s" if t is set else "__fs": [encode(x, depth + 1) for x in obj]}
    if t is bytes:
        return {"__b": obj.hex()}
    if t is complex:
        return {"__c": [obj.real, obj.imag]}
    raise TypeError("cannot send a value of type " + t.__name__)


def decode(obj):
    """Inverse of :func:`encode`; anything else is an error, never a foreign object."""
    t = type(obj)
    if obj is None or t in (bool, int, float, str):
        return obj
    if t is list:
        return [decode(x) for x in obj]
    if t is dict and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__t":
            return tuple(decode(x) for x in value)
        if tag == "__d":
            return {decode(k): decode(v) for k, v in value}
        if tag == "__s":
            return {decode(x) for x in value}
        if tag == "__fs":
            return frozenset(decode(x) for x in value)
        if tag == "__b":
            return bytes.fromhex(value)
        if tag == "__c":
            return complex(float(value[0]), float(value[1]))
        if tag == "__f" and value in ("inf", "-inf", "nan"):
            return float(value)
    raise ValueError("malformed value")


def plain_json(obj):
    """A decoded value as JSON (tuples become lists, sets sorted lists) for the parent."""
    if isinstance(obj, (list, tuple)):
        return [plain_json(x) for x in obj]
    if isinstance(obj, (set, frozenset)):
        items = [plain_json(x) for x in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, dict):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, (bytes, complex)):
        return repr(obj)
    return obj
