"""JSON parsing with limits on size and nesting depth, for anything a caller controls.

Why: ``json.loads`` on a hostile document either recurses until ``RecursionError`` (100,000
nested brackets) or builds a structure whose size is bounded only by the input (8 million
``{}`` in a 400 KB file). Request bodies, adapter configs and manifests all go through
:func:`loads`, so every JSON a tenant controls is bounded by size before parsing and by depth
and node count after, and fails with one exception type the callers turn into a 4xx.

This module must stay free of any web-framework or server import: ``adapters/`` uses it too.
"""

from __future__ import annotations

from collections.abc import Iterator

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_NODES = 1_000_000


class JSONLimitError(ValueError):
    """The document is not JSON, or exceeds a size, depth or node-count limit.

    ``kind`` is one of ``invalid``, ``too_large``, ``too_deep``, ``too_many_nodes``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _children(value: JSONValue) -> Iterator[JSONValue]:
    if isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, list):
        yield from value


def check_shape(value: JSONValue, *, max_depth: int = DEFAULT_MAX_DEPTH,
                max_nodes: int = DEFAULT_MAX_NODES) -> None:
    """Raise :class:`JSONLimitError` when ``value`` nests deeper than ``max_depth`` containers or
    holds more than ``max_nodes`` values; iterative, so a deep document cannot overflow the stack."""
    stack: list[tuple[JSONValue, int]] = [(value, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise JSONLimitError("too_many_nodes", f"the JSON holds more than {max_nodes} values")
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise JSONLimitError("too_deep", f"the JSON nests deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in _children(node))


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH,
          max_nodes: int = DEFAULT_MAX_NODES) -> JSONValue:
    """Parse ``data`` as JSON within the given limits; every failure is a :class:`JSONLimitError`."""
    import json

    if len(data) > max_bytes:
        raise JSONLimitError("too_large", f"the JSON is {len(data)} bytes; the limit is {max_bytes}")
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONLimitError("too_deep", f"the JSON nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise JSONLimitError("invalid", f"not valid JSON: {e}") from None
    check_shape(value, max_depth=max_depth, max_nodes=max_nodes)
    return value
