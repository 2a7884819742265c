"""``aura serve --replicas N``: a Ray cluster (local or joined), the catalog actor, and the Serve app.

The app is one ingress deployment (FastAPI via ``serve.ingress``, :mod:`server.cluster.ingress`)
bound to one model deployment (:mod:`server.cluster.replica`) with ``--replicas`` replicas (or an
``AutoscalingConfig`` up to ``--autoscale-max-replicas``). Replicas reserve no Ray CPUs: vLLM's
engine and the audio front end size their own threads, and on a small machine a CPU reservation
per replica would only stop the second replica from being scheduled.

SIGTERM/SIGINT drains: the ingress stops admitting (503, ``/ready`` 503), running streams finish
(up to ``drain_timeout_s``), then Serve and Ray shut down.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from server.config import Settings

log = logging.getLogger("server.cluster")

APP_NAME = "aura"
NAMESPACE = "aura"
CATALOG_NAME = "aura-adapter-catalog"
ROOT = Path(__file__).resolve().parent.parent.parent  # where `server` is importable from


def startup_adapters(settings: Settings, model_path: Path) -> tuple[list[tuple[str, str, str | None]], str | None]:
    """(name, source, sha256) to publish at start, and the default adapter: the same choice as
    the single server (``--adapter`` flags, the config file's preloads, else the demo adapter).
    Local folders are validated here, so a typo fails in a second, not at the first request."""
    from adapters.base_model import read_base_model
    from adapters.validate import validate_adapter
    from server.state import default_adapter_path
    from server.tenancy import load_config

    config = load_config(settings.config_file) if settings.config_file else None
    base = read_base_model(model_path)
    adapters: list[tuple[str, str, str | None]] = [(n, str(p), None) for n, p in settings.adapters.items()]
    adapters += [(a.name, a.source, a.sha256) for a in (config.adapters if config else [])]
    if not adapters:
        path, trained = default_adapter_path(settings, model_path, base)
        adapters = [("aura-demo" if trained else "default", str(path), None)]
    for name, source, _ in adapters:
        if Path(source).is_dir():
            validate_adapter(Path(source), base=base, max_lora_rank=settings.max_lora_rank)
    default = settings.default_adapter or (config.default_adapter if config else None) or adapters[0][0]
    return adapters, default


def _runtime_env() -> dict:
    """Workers import ``server`` from this checkout (also when it is not pip-installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}}


def deployment_options(settings: Settings) -> dict:
    """The model deployment's Serve options (replica count or autoscaling, queue size, drain)."""
    opts: dict = {
        "name": "Model",
        "ray_actor_options": {"num_cpus": 0, "runtime_env": _runtime_env()},
        "max_ongoing_requests": settings.max_concurrent_requests + settings.max_queued_requests,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if settings.autoscale_max_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": settings.replicas or 1,
            "max_replicas": max(settings.autoscale_max_replicas, settings.replicas or 1),
            "target_ongoing_requests": settings.autoscale_target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = settings.replicas or 1
    return opts


def start(settings: Settings, stop: threading.Event | None = None) -> tuple[object, object]:
    """Connect to (or start) Ray, publish the startup adapters, run the Serve app; returns the
    ingress handle (for the drain) and the catalog actor's handle, which the caller must keep:
    the actor lives as long as a handle to it does."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from server.cluster.catalog import AdapterCatalog
    from server.cluster.ingress import Ingress
    from server.cluster.replica import ModelReplica
    from server.state import resolve_model

    model_path, model_name = resolve_model(settings)  # converts the demo model once, before the replicas
    adapters, default = startup_adapters(settings, model_path)
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=_runtime_env())
    else:
        ray.init(num_cpus=settings.ray_num_cpus or os.cpu_count(), object_store_memory=settings.ray_object_store_bytes,
                 include_dashboard=False, namespace=NAMESPACE, runtime_env=_runtime_env())
    if stop is not None:  # ours replace ray.init's handlers before the app serves: a SIGTERM from then on drains
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    catalog = ray.remote(AdapterCatalog).options(name=CATALOG_NAME, namespace=NAMESPACE, num_cpus=0,
                                                 get_if_exists=False).remote(default)
    ray.get([catalog.publish.remote(name, source, "", sha) for name, source, sha in adapters])
    ray.get(catalog.set_default.remote(default))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    model = serve.deployment(ModelReplica).options(**deployment_options(settings))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0, "runtime_env": _runtime_env()},
        max_ongoing_requests=settings.max_concurrent_requests + settings.max_queued_requests + 16,
        graceful_shutdown_timeout_s=settings.drain_timeout_s)
    app = ingress.bind(settings, model.bind(settings, CATALOG_NAME, NAMESPACE), CATALOG_NAME, NAMESPACE,
                       model_name, str(model_path))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    log.info("Ray Serve app ready", extra={"url": f"http://{settings.host}:{settings.port}",
                                           "replicas": settings.replicas, "adapters": [a[0] for a in adapters],
                                           "ray_address": address or "local"})
    return serve.get_deployment_handle("Ingress", app_name=APP_NAME), catalog


def _delete_app(timeout_s: float) -> None:
    """Delete the app after the drain and wait for its replicas to stop, up to ``timeout_s``.

    Why not ``serve.delete(APP_NAME)``: it gives up after a fixed 60 s and raises, while a replica that Serve was
    still starting (one restarting after a crash, loading its engine) only stops when its graceful-shutdown period
    (the drain timeout, 60 s by default) runs out, so the two raced and a clean drain exited 1 with a traceback. The
    drain has already finished every stream, so a replica that outlives the wait holds none: the caller's
    ``serve.shutdown()`` ends it and the exit stays 0.
    """
    from ray import serve

    serve.delete(APP_NAME, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is None or app.status == "NOT_STARTED":
            return
        time.sleep(0.5)
    log.warning("app not deleted in time; its replicas are shut down with Serve", extra={"timeout_s": timeout_s})


def run_cluster(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, then drain and shut down; the process exit status."""
    from server.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    import ray
    from ray import serve

    try:
        ingress, catalog = start(settings, stop)
        while not stop.wait(0.5):
            pass
        log.info("SIGTERM: draining", extra={"drain_timeout_s": settings.drain_timeout_s})
        left = ingress.drain.remote(settings.drain_timeout_s).result(timeout_s=settings.drain_timeout_s + 10)
        log.info("drained", extra={"unfinished": left})
        _delete_app(settings.drain_timeout_s + 30)
        del catalog
    finally:
        if ray.is_initialized():
            if not (settings.ray_address or os.environ.get("RAY_ADDRESS")):
                serve.shutdown()
            ray.shutdown()
    return 0
