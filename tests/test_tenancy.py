"""API keys -> tenants -> adapters, in-process: config parsing, key lookup, 401/403 rules, and the
FastAPI dependency on a small app. The end-to-end version runs in test_adapters_api.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import httpx
import pytest
from fastapi import Depends, FastAPI

from server.errors import APIError, Forbidden, Unauthorized
from server.tenancy import (
    OPEN_PRINCIPAL, Principal, Tenancy, TenancyConfig, TenancyConfigError, authenticate, hash_key, load_config,
)

CONFIG_YAML = f"""
admin_keys: ["{hash_key('root-key')}"]
tenants:
  acme:
    keys: ["{hash_key('acme-key')}", "acme-plain-key"]
    adapters: [support-en, support-de]
    default_adapter: support-en
  globex:
    keys: ["{hash_key('globex-key')}"]
    adapters: "*"
  ops:
    keys: ["{hash_key('ops-key')}"]
    adapters: [ops-a]
    manage: true
adapters:
  - {{name: support-en, source: /srv/a, pin: true}}
default_adapter: support-en
"""


@pytest.fixture
def tenancy(tmp_path) -> Tenancy:
    path = tmp_path / "aura.yaml"
    path.write_text(CONFIG_YAML)
    return Tenancy(load_config(path))


def test_keys_map_to_tenants_hashed_or_plain(tenancy):
    assert tenancy.authenticate("Bearer acme-key").tenant == "acme"
    assert tenancy.authenticate("Bearer acme-plain-key").tenant == "acme"
    assert tenancy.authenticate("bearer   globex-key ").tenant == "globex"
    root = tenancy.authenticate("Bearer root-key")
    assert root.is_admin and root.may_use("anything")
    assert tenancy.ring.plain_keys == 1
    assert all(len(d) == 32 for d, _ in tenancy.ring.entries)  # only digests are kept


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong-key", "Basic YWNtZTprZXk=",
                                    f"Bearer {hash_key('acme-key')}"])  # the digest itself is not a key
def test_missing_or_unknown_keys_are_401(tenancy, header):
    with pytest.raises(Unauthorized) as e:
        tenancy.authenticate(header)
    assert e.value.status_code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"


def test_adapter_permissions_do_not_reveal_existence(tenancy):
    acme = tenancy.authenticate("Bearer acme-key")
    acme.check_adapter("support-de")
    errors = []
    for name in ("globex-secret-adapter", "does-not-exist"):
        with pytest.raises(Forbidden) as e:
            acme.check_adapter(name)
        errors.append(e.value.to_dict()["error"] | {"message": e.value.message.replace(name, "NAME")})
    assert errors[0] == errors[1]  # same status, code and wording for existing and unknown names
    assert tenancy.authenticate("Bearer globex-key").may_use("whatever")
    assert acme.default_adapter == "support-en"


def test_management_rights(tenancy):
    acme = tenancy.authenticate("Bearer acme-key")
    ops = tenancy.authenticate("Bearer ops-key")
    root = tenancy.authenticate("Bearer root-key")
    with pytest.raises(Forbidden):
        acme.check_manage("support-en")
    ops.check_manage("ops-a")
    with pytest.raises(Forbidden):
        ops.check_manage("support-en")
    root.check_manage("anything")


@pytest.mark.parametrize("bad, words", [
    ("tenants: {a: {keys: []}}", "keys"),
    ("tenants: {a: {keys: [k], adapters: [x], default_adapter: y}}", "default_adapter"),
    ("tenants: {a: {keys: [k]}, b: {keys: [k]}}", "twice"),
    ("tenants: {admin: {keys: [k]}}", "reserved"),
    ("adapters: [{name: 'bad name', source: x}]", "name"),
    ("unknown_field: 1", "unknown_field"),
    ("tenants: [", "YAML"),
])
def test_bad_configs_fail_with_a_clear_message(tmp_path, bad, words):
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(TenancyConfigError) as e:
        Tenancy(load_config(path))
    assert words in str(e.value)


def test_open_mode_says_so(caplog):
    t = Tenancy(None)
    assert t.open and t.authenticate(None) is OPEN_PRINCIPAL
    with caplog.at_level(logging.INFO, logger="server"):
        t.log_startup(None)
    assert [r for r in caplog.records if "OPEN" in r.getMessage()]


def test_plain_keys_are_accepted_with_a_warning(caplog):
    t = Tenancy(TenancyConfig.model_validate({"tenants": {"a": {"keys": ["plain"]}}}))
    with caplog.at_level(logging.INFO, logger="server"):
        t.log_startup(None)
    assert any("sha256" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_dependency_gives_the_route_its_principal(tenancy):
    app = FastAPI()
    app.state.aura = SimpleNamespace(tenancy=tenancy)

    @app.exception_handler(APIError)
    async def _err(request, exc: APIError):
        from fastapi.responses import JSONResponse
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.get("/v1/whoami")
    async def whoami(p: Principal = Depends(authenticate)):
        return {"tenant": p.tenant, "admin": p.is_admin}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/v1/whoami")).status_code == 401
        r = await c.get("/v1/whoami", headers={"Authorization": "Bearer acme-key"})
        assert r.json() == {"tenant": "acme", "admin": False}
        r = await c.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
