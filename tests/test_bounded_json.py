"""Bounded JSON: hostile documents fail with one exception type, quickly, without recursion."""

import time

import pytest

from adapters.bounded_json import JSONLimitError, loads


def test_a_normal_document_parses_unchanged():
    assert loads('{"a": [1, {"b": null}], "c": "x"}', max_bytes=100) == {"a": [1, {"b": None}], "c": "x"}


@pytest.mark.parametrize("doc, kind", [
    ("[" * 100_000 + "]" * 100_000, "too_deep"),
    ("[" * 40 + "]" * 40, "too_deep"),
    ("{" * 3, "invalid"),
    ("[" + ",".join(["{}"] * 2000) + "]", "too_many_nodes"),
])
def test_hostile_documents_are_refused_with_their_kind(doc, kind):
    t = time.perf_counter()
    with pytest.raises(JSONLimitError) as e:
        loads(doc, max_bytes=10**7, max_depth=32, max_nodes=1000)
    assert e.value.kind == kind
    assert time.perf_counter() - t < 2.0


def test_size_is_checked_before_parsing():
    with pytest.raises(JSONLimitError) as e:
        loads(b"[" + b"1," * 1000 + b"1]", max_bytes=100)
    assert e.value.kind == "too_large"
