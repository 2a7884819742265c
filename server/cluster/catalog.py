"""The cluster's one adapter catalog: name -> version/source/digest, and which replica holds what.

Held by one Ray actor (:func:`server.cluster.launch.start_catalog`), so a replace is numbered once
for the whole cluster instead of once per replica. A replica publishes a new version only after
it has fetched, validated and loaded it itself (a bad source changes nothing); every request
carries the catalog version the ingress read when it arrived, and a replica holding an older one
loads the current version before answering. A caller who saw a replace acknowledged is therefore
never answered by an older version. Plain Python: the actor wrapper is applied by the launcher.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field


class CatalogEntry(BaseModel):
    """One published adapter version, as every replica must load it."""

    name: str
    version: int = Field(description="Cluster-wide version: 1 at first load, +1 per replace.")
    source: str = Field(description="Where replicas fetch it (redacted of credentials when shown).")
    digest: str = Field(description="Content digest of the adapter folder (the adapter cache's key).")
    sha256: str | None = Field(None, description="Checksum the publisher asked for, re-checked by every replica.")
    published_at: float = Field(default_factory=time.time)


class ReplicaHolding(BaseModel):
    """What one model replica reported last: the catalog version of each adapter it holds."""

    replica: str
    pid: int
    adapters: dict[str, int] = Field(default_factory=dict)
    loads: int = Field(0, description="Adapter loads this replica has done (first use, new version).")
    engine_versions: dict[str, int] = Field(
        default_factory=dict, description="adapter -> versions in this replica's engine (current + draining).")


class ClusterAdapter(BaseModel):
    object: str = "adapter"
    name: str
    version: int
    source: str
    digest: str
    default: bool = False
    published_at: int
    replicas: dict[str, int] = Field(default_factory=dict, description="replica -> the version it holds.")


class ClusterAdapterList(BaseModel):
    object: str = "list"
    data: list[ClusterAdapter]
    replicas: list[ReplicaHolding] = Field(default_factory=list)


class AdapterCatalog:
    """Methods run one at a time inside the actor, so versions are assigned without locks."""

    def __init__(self, default: str | None = None) -> None:
        self.entries: dict[str, CatalogEntry] = {}
        self.default = default
        self.holdings: dict[str, ReplicaHolding] = {}

    def publish(self, name: str, source: str, digest: str, sha256: str | None = None) -> CatalogEntry:
        """Install a new version of ``name`` (or its first). ``digest`` may be empty for the
        startup adapters (``--adapter``): the first replica to fetch one fills it in."""
        current = self.entries.get(name)
        entry = CatalogEntry(name=name, version=(current.version if current else 0) + 1, source=source,
                             digest=digest, sha256=sha256)
        self.entries[name] = entry
        if self.default is None:
            self.default = name
        return entry

    def fill_digest(self, name: str, version: int, digest: str) -> CatalogEntry | None:
        """The digest of a startup adapter, as the first replica fetched it; later replicas must match."""
        entry = self.entries.get(name)
        if entry is not None and entry.version == version and not entry.digest:
            entry.digest = digest
        return entry

    def get(self, name: str | None) -> CatalogEntry | None:
        """The entry of ``name``, or of the cluster's default adapter when ``name`` is None (one
        actor call for a request that names no adapter)."""
        return self.entries.get(self.default if name is None else name)

    def remove(self, name: str) -> CatalogEntry | None:
        entry = self.entries.pop(name, None)
        if self.default == name:
            self.default = next(iter(sorted(self.entries)), None)
        return entry

    def get_default(self) -> str | None:
        return self.default

    def set_default(self, name: str) -> None:
        self.default = name

    def report(self, holding: ReplicaHolding) -> None:
        self.holdings[holding.replica] = holding

    def forget_replica(self, replica: str) -> None:
        self.holdings.pop(replica, None)

    def listing(self) -> ClusterAdapterList:
        data = []
        for name in sorted(self.entries):
            e = self.entries[name]
            held = {r: h.adapters[name] for r, h in sorted(self.holdings.items()) if name in h.adapters}
            data.append(ClusterAdapter(name=name, version=e.version, source=e.source, digest=e.digest,
                                       default=name == self.default, published_at=int(e.published_at),
                                       replicas=held))
        return ClusterAdapterList(data=data, replicas=sorted(self.holdings.values(), key=lambda h: h.replica))
