"""GET /v1/models: the base model and the adapters the caller may use."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.protocol import ModelCard, ModelList, error_responses
from server.tenancy import Principal, authenticate

router = APIRouter()

UNTRAINED_NOTE = "UNTRAINED: freshly initialised adapter; its answers to speech are noise"


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request, principal: Principal = Depends(authenticate)) -> ModelList:
    state = request.app.state.aura
    created = int(state.started_at)
    default = principal.default_adapter or state.registry.default
    cards = [ModelCard(id=state.model_name, created=created, kind="base", root=str(state.model_path))]
    for v in state.registry.versions():
        if not principal.may_use(v.name):
            continue
        cards.append(ModelCard(
            id=v.name, created=int(v.loaded_at), kind="adapter", root=v.source, parent=state.model_name,
            trained=v.trained, version=v.version, default=v.name == default,
            description=None if v.trained else UNTRAINED_NOTE,
        ))
    return ModelList(data=cards)
