"""Hot-swap semantics of the adapter registry, in-process (fast): leases keep a request on its
version, swaps are atomic, failed loads change nothing, same-name loads serialise, unloading
really frees the engine's copy (checked on the reference engine's own list of LoRAs)."""

from __future__ import annotations

import asyncio

import pytest

from adapter_helpers import copy_adapter, edit_json
from adapters.adapter import LORA_CONFIG
from adapters.base_model import read_base_model
from adapters.validate import AdapterValidationError
from server.engine.base import LoraHandle
from server.errors import Conflict, NotFound
from server.registry import AdapterRegistry


class RecordingEngine:
    """Just the LoRA bookkeeping of an engine, with an optional slow add_lora."""

    def __init__(self, add_delay: float = 0.0, fail_add: bool = False) -> None:
        self.loaded: set[int] = set()
        self.pinned: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.add_delay = add_delay
        self.fail_add = fail_add

    async def add_lora(self, lora: LoraHandle, *, pin: bool = False) -> None:
        self.calls.append(("add", lora.lora_id))
        await asyncio.sleep(self.add_delay)
        if self.fail_add:
            raise RuntimeError("engine refused the LoRA")
        self.loaded.add(lora.lora_id)
        if pin:
            self.pinned.add(lora.lora_id)

    async def remove_lora(self, lora: LoraHandle) -> None:
        self.calls.append(("remove", lora.lora_id))
        self.loaded.discard(lora.lora_id)
        self.pinned.discard(lora.lora_id)

    async def list_loras(self) -> set[int]:
        return set(self.loaded)


@pytest.fixture(scope="module")
def base(tiny):
    return read_base_model(tiny.llm)


def registry(base, engine=None, **kw) -> AdapterRegistry:
    return AdapterRegistry(engine or RecordingEngine(), base, max_lora_rank=64, **kw)


async def test_running_requests_keep_their_version_new_ones_get_the_new_one(tiny, base):
    reg = registry(base)
    v1 = await reg.load("x", tiny.adapters["alpha"])
    lease = reg.lease("x")  # a request in flight on v1
    v2 = await reg.load("x", tiny.adapters["beta"])
    assert lease.version is v1 and reg.get("x") is v2
    # LoRA and audio layer travel together in the version object
    assert v1.adapter.path == v1.lora.path != v2.lora.path == v2.adapter.path
    assert v1.status == "draining" and v1.lora.lora_id in reg.engine.loaded  # still serving its request
    assert reg.lease("x").version is v2
    lease.release()
    lease.release()  # twice is harmless
    await reg.wait_idle()
    assert v1.lora.lora_id not in reg.engine.loaded and v1.status == "unloaded"
    assert v2.lora.lora_id in reg.engine.loaded
    assert (v1.version, v2.version) == (1, 2) and v1.lora.lora_id != v2.lora.lora_id


async def test_failed_loads_change_nothing(tiny, base, tmp_path):
    reg = registry(base)
    v1 = await reg.load("x", tiny.adapters["alpha"])
    broken = copy_adapter(tiny.adapters["beta"], tmp_path / "broken")
    edit_json(broken, LORA_CONFIG, r=128)
    with pytest.raises(AdapterValidationError):
        await reg.load("x", broken)
    reg.engine.fail_add = True
    with pytest.raises(RuntimeError):
        await reg.load("x", tiny.adapters["beta"])

    async def failing_fetch():
        raise OSError("the network is down")

    with pytest.raises(OSError):
        await reg.load("x", fetch=failing_fetch)
    assert reg.get("x") is v1 and v1.status == "serving" and reg.names() == ["x"]
    assert reg.engine.loaded == {v1.lora.lora_id}
    with pytest.raises(AdapterValidationError):
        await reg.load("fresh", broken)
    assert "fresh" not in reg


async def test_concurrent_loads_of_one_name_serialise_in_arrival_order(tiny, base):
    engine = RecordingEngine(add_delay=0.2)
    reg = registry(base, engine)
    order: list[str] = []

    def fetcher(label: str, path, delay: float):
        async def fetch():
            order.append(f"start {label}")
            await asyncio.sleep(delay)
            order.append(f"end {label}")
            return path
        return fetch

    first = asyncio.create_task(reg.load("x", fetch=fetcher("a", tiny.adapters["alpha"], 0.3)))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(reg.load("x", fetch=fetcher("b", tiny.adapters["beta"], 0.0)))
    va, vb = await asyncio.gather(first, second)
    assert order == ["start a", "end a", "start b", "end b"]  # no interleaving, even though b is faster
    assert (va.version, vb.version) == (1, 2) and reg.get("x") is vb
    await reg.wait_idle()
    assert engine.loaded == {vb.lora.lora_id}


async def test_unload_frees_the_engine_after_the_last_request(tiny, base):
    reg = registry(base)
    v = await reg.load("x", tiny.adapters["alpha"])
    await reg.load("y", tiny.adapters["beta"])
    lease = reg.lease("x")
    await reg.unload("x")
    with pytest.raises(NotFound):
        reg.lease("x")
    assert v.lora.lora_id in reg.engine.loaded
    lease.release()
    await reg.wait_idle()
    assert v.lora.lora_id not in reg.engine.loaded
    assert reg.default == "y"


async def test_pins_leave_a_slot_free(tiny, base):
    reg = registry(base, max_pinned=1)
    await reg.load("x", tiny.adapters["alpha"], pin=True)
    with pytest.raises(Conflict) as e:
        await reg.load("y", tiny.adapters["beta"], pin=True)
    assert e.value.code == "too_many_pinned"
    await reg.load("y", tiny.adapters["beta"])  # unpinned is fine


async def test_reference_engine_really_drops_the_lora(tiny, base):
    """The same through a real engine: its own list of loaded LoRAs shrinks on unload."""
    from transformers import AutoTokenizer

    from server.engine.reference import ReferenceEngine

    engine = ReferenceEngine(model=str(tiny.llm), tokenizer=AutoTokenizer.from_pretrained(str(tiny.llm)))
    reg = registry(base, engine)
    a = await reg.load("a", tiny.adapters["alpha"])
    b = await reg.load("b", tiny.adapters["beta"])
    assert await engine.list_loras() == {a.lora.lora_id, b.lora.lora_id}
    b2 = await reg.load("b", tiny.adapters["alpha"])
    assert await engine.list_loras() == {a.lora.lora_id, b2.lora.lora_id}
    await reg.unload("a")
    assert await engine.list_loras() == {b2.lora.lora_id}
