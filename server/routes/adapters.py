"""GET/POST/DELETE /v1/adapters[/{name}]: list, load or replace (hot swap), unload.

Tenants see only the adapters they may use; loading, replacing and unloading need an admin key
(or a tenant with ``manage: true``, for names in its own list). A name outside a tenant's list
answers 403 whether it exists or not.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.adapter_admin import adapter_info, load_from_source
from server.errors import BadRequest
from server.protocol import AdapterDeleted, AdapterInfo, AdapterList, AdapterLoadRequest, error_responses
from server.state import ServerState
from server.tenancy import Principal, authenticate

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.aura


def _default_for(state: ServerState, who: Principal) -> str | None:
    return who.default_adapter or state.registry.default


@router.get("/v1/adapters", response_model=AdapterList, responses=error_responses(401))
async def list_adapters(request: Request, who: Principal = Depends(authenticate)) -> AdapterList:
    """Adapters the caller may use, with version, residency and draining versions."""
    state = _state(request)
    resident = await state.engine.list_loras()
    default = _default_for(state, who)
    return AdapterList(data=[adapter_info(v, state.registry, resident, default)
                             for v in state.registry.versions() if who.may_use(v.name)],
                       engine_lora_ids=sorted(resident) if who.is_admin and resident is not None else None)


@router.get("/v1/adapters/{name}", response_model=AdapterInfo, responses=error_responses(401, 403, 404))
async def get_adapter(name: str, request: Request, who: Principal = Depends(authenticate)) -> AdapterInfo:
    state = _state(request)
    who.check_adapter(name)
    version = state.registry.get(name)
    return adapter_info(version, state.registry, await state.engine.list_loras(), _default_for(state, who))


@router.post("/v1/adapters", response_model=AdapterInfo,
             responses=error_responses(400, 401, 403, 404, 409, 413, 422, 502, 504))
async def load_adapter(body: AdapterLoadRequest, request: Request, who: Principal = Depends(authenticate)) -> AdapterInfo:
    """Load, or replace with a new version (atomic: running requests finish on the old one)."""
    state = _state(request)
    who.check_manage(body.name)
    if body.name in (state.model_name, "default"):
        raise BadRequest(f"'{body.name}' is reserved (it means the default adapter); choose another name",
                         code="reserved_name", param="name")
    version, previous = await load_from_source(state.registry, state.adapter_cache, body.name, body.source,
                                               trusted=who.is_admin, pin=body.pin, sha256=body.sha256)
    return adapter_info(version, state.registry, await state.engine.list_loras(), _default_for(state, who),
                        previous_version=previous)


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=error_responses(401, 403, 404))
async def unload_adapter(name: str, request: Request, who: Principal = Depends(authenticate)) -> AdapterDeleted:
    """Unload: new requests get 404 at once; running ones finish, then the engine frees the LoRA."""
    state = _state(request)
    who.check_adapter(name)
    who.check_manage(name)
    old = await state.registry.unload(name)
    return AdapterDeleted(name=name, version=old.version, draining_requests=old.active)
