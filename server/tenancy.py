"""Who is calling: API keys -> tenants -> the adapters each may use.

The config file (``aura serve --config FILE``, YAML) is the only place keys live::

    admin_keys:
      - "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    tenants:
      acme:
        keys: ["sha256:<hex of the key>"]      # echo -n KEY | python -m server.tenancy; plain keys
                                               # work too, but a leaked config then leaks them
        adapters: [support-en, support-de]     # or "*" for every loaded adapter
        default_adapter: support-en            # used when a request names no adapter
        manage: false                          # true lets this tenant load/unload its own adapters
    adapters:                                  # loaded at start, in this order
      - {name: support-en, source: s3://models/support-en/, pin: true}
      - {name: support-de, source: /srv/adapters/support-de, sha256: null}
    default_adapter: support-en                # server-wide default (else the first loaded)

Keys arrive as ``Authorization: Bearer <key>``. The server only ever keeps sha256 digests and
compares them in constant time against *every* configured key, so neither the timing nor the
order of the config tells an attacker anything. A tenant asking for an adapter outside its list
gets the same 403 whether that adapter exists or not, so tenants cannot probe each other's names.

Without a config file the server runs open: one implicit tenant that may use and manage all
adapters (a development setup; the startup log says so).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import Forbidden, Unauthorized, first_error_text
from server.protocol import AdapterLoadRequest

log = logging.getLogger("server")

_HASH = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
OPEN_TENANT = "open"
ADMIN_TENANT = "admin"


class TenancyConfigError(ValueError):
    """The config file is unreadable or inconsistent; the server refuses to start with it."""


def hash_key(key: str) -> str:
    """The form a key should be stored in: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _digest(entry: str) -> tuple[bytes, bool]:
    """(sha256 digest, was the entry a plain key) for one configured key."""
    m = _HASH.match(entry)
    if m:
        return bytes.fromhex(m.group(1)), False
    return hashlib.sha256(entry.encode()).digest(), True


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(..., min_length=1, description="sha256:<hex> digests (preferred) or plain keys.")
    adapters: list[str] | Literal["*"] = Field(default_factory=list, description="Adapter names, or '*' for all.")
    default_adapter: str | None = None
    manage: bool = Field(False, description="May load/replace/unload the adapters it may use.")

    @field_validator("keys")
    @classmethod
    def _keys_not_blank(cls, v: list[str]) -> list[str]:
        if any(not k or not k.strip() for k in v):
            raise ValueError("keys must not be empty strings")
        return v

    @model_validator(mode="after")
    def _default_is_allowed(self) -> "TenantConfig":
        if self.default_adapter and self.adapters != "*" and self.default_adapter not in self.adapters:
            raise ValueError(f"default_adapter '{self.default_adapter}' is not in this tenant's adapters")
        return self


class TenancyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin_keys: list[str] = Field(default_factory=list)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    # The same shape as a POST /v1/adapters body: one definition of a valid name, source and digest.
    adapters: list[AdapterLoadRequest] = Field(default_factory=list)
    default_adapter: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TenancyConfig":
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapters listed twice: {dupes}")
        for reserved in (ADMIN_TENANT, OPEN_TENANT):
            if reserved in self.tenants:
                raise ValueError(f"'{reserved}' is a reserved tenant name")
        return self


def load_config(path: str | Path) -> TenancyConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise TenancyConfigError(f"{path}: cannot read the config file ({e})") from e
    except yaml.YAMLError as e:
        raise TenancyConfigError(f"{path}: not valid YAML ({e})") from e
    try:
        return TenancyConfig.model_validate(raw)
    except ValidationError as e:
        loc, msg = first_error_text(e.errors())
        raise TenancyConfigError(f"{path}: field '{loc}': {msg}") from e


@dataclass(frozen=True)
class Principal:
    """The caller of one request (what :func:`authenticate` returns to the routes)."""

    tenant: str
    is_admin: bool = False
    adapters: frozenset[str] | None = None  # None: every adapter
    default_adapter: str | None = None
    manage: bool = False

    def may_use(self, name: str) -> bool:
        return self.is_admin or self.adapters is None or name in self.adapters

    def check_adapter(self, name: str) -> None:
        """403 for any adapter outside the tenant's list, existing or not: no name probing."""
        if not self.may_use(name):
            raise Forbidden(f"adapter '{name}' is not available to this API key; GET /v1/models lists yours",
                            code="adapter_forbidden", param="model")

    def may_manage(self, name: str) -> bool:
        return self.is_admin or (self.manage and self.may_use(name))

    def check_manage(self, name: str | None = None) -> None:
        allowed = self.is_admin if name is None else self.may_manage(name)
        if not allowed:
            raise Forbidden("managing adapters needs an admin key (or a tenant with manage: true, for its "
                            "own adapters)", code="admin_required")


OPEN_PRINCIPAL = Principal(tenant=OPEN_TENANT, is_admin=True)


@dataclass
class KeyRing:
    """Configured keys as digests; lookup compares against all of them in constant time."""

    entries: list[tuple[bytes, Principal]] = field(default_factory=list)
    plain_keys: int = 0

    @classmethod
    def from_config(cls, config: TenancyConfig) -> "KeyRing":
        ring = cls()
        admin = Principal(tenant=ADMIN_TENANT, is_admin=True)
        seen: set[bytes] = set()

        def add(entry: str, who: Principal) -> None:
            digest, plain = _digest(entry)
            if digest in seen:
                raise TenancyConfigError(f"the same key is configured twice (for tenant '{who.tenant}')")
            seen.add(digest)
            ring.plain_keys += plain
            ring.entries.append((digest, who))

        for k in config.admin_keys:
            add(k, admin)
        for name, t in config.tenants.items():
            who = Principal(tenant=name, adapters=None if t.adapters == "*" else frozenset(t.adapters),
                            default_adapter=t.default_adapter, manage=t.manage)
            for k in t.keys:
                add(k, who)
        return ring

    def lookup(self, key: str) -> Principal | None:
        digest = hashlib.sha256(key.encode()).digest()
        found: Principal | None = None
        for stored, who in self.entries:  # no early exit: every key costs the same
            if hmac.compare_digest(stored, digest):
                found = who
        return found


class Tenancy:
    """The server's auth state: either open (no config) or a key ring from the config file."""

    def __init__(self, config: TenancyConfig | None = None) -> None:
        self.config = config
        self.ring = KeyRing.from_config(config) if config is not None else None

    @property
    def open(self) -> bool:
        return self.ring is None

    def log_startup(self, path: Path | None) -> None:
        if self.ring is None:
            log.warning("no --config given: running OPEN as a single tenant; every client may use and manage "
                        "all adapters without an API key")
            return
        assert self.config is not None
        log.info("tenancy configured", extra={"config": str(path), "tenants": sorted(self.config.tenants),
                                              "admin_keys": len(self.config.admin_keys)})
        if self.ring.plain_keys:
            log.warning("the config holds plain API keys; store 'sha256:<hex>' digests instead so a leaked "
                        "config does not leak keys", extra={"plain_keys": self.ring.plain_keys})

    def authenticate(self, authorization: str | None) -> Principal:
        if self.ring is None:
            return OPEN_PRINCIPAL
        if not authorization:
            raise Unauthorized("missing API key; send 'Authorization: Bearer <key>'", code="missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("malformed Authorization header; send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        who = self.ring.lookup(key)
        if who is None:
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return who


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency for every /v1 route: the caller (or 401). Routes take it as a parameter;
    nothing is stored on ``request.state``."""
    tenancy: Tenancy | None = getattr(request.app.state.aura, "tenancy", None)
    return tenancy.authenticate(request.headers.get("authorization")) if tenancy else OPEN_PRINCIPAL


def main() -> int:
    """``python -m server.tenancy`` reads a key on stdin and prints the form to store in the config."""
    import sys

    key = sys.stdin.readline().strip()
    if not key:
        print("usage: echo -n KEY | python -m server.tenancy   (prints sha256:<hex> for the config file)",
              file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
