"""loramux on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint, routed by adapter.

    client -> Ray HTTP proxy -> Ingress (server/ray_ingress.py: the single server's routes, server/api.py)
           -> handle.options(multiplexed_model_id=<adapter id>) -> EngineReplica (server/ray_replica.py:
              a whole loramux ServerState from build_state, answering through run_request)

Run it with `loramux serve --ray --replicas N`, or `serve run loramux.server.ray_app:app` (defaults), or
`serve run loramux.server.ray_app:build_app replicas=4 dtype=float32 allowed_roots=/srv/adapters`.

Routing is Ray Serve's model multiplexing: each replica's `@serve.multiplexed` loader registers an
adapter from the shared AdapterStore into that replica's own registry, Serve learns which ids each
replica holds, and sends a request to a replica holding its adapter (else to the one holding fewest).
Serve's LRU over `adapters_per_replica` ids unloads the coldest adapter from the replica's registry.
How adapters enter and leave the store: server/ray_admin.py.
"""
from __future__ import annotations

import signal
from dataclasses import fields, replace
from pathlib import Path

from ray import serve

from loramux.adapters_registry.store import AdapterStore
from loramux.server.bootstrap import ServeConfig
from loramux.server.ray_config import RayConfig
from loramux.server.ray_ingress import Ingress
from loramux.server.ray_replica import EngineReplica


def build(cfg: RayConfig):
    """The Serve application: `serve.run(build(cfg))`. Seeds the store from `--adapters DIR`."""
    store = AdapterStore(cfg.store_dir, sweep=True)     # what a stopped run left mid-put or mid-upload
    if cfg.serve.adapters_dir is not None:
        for sub in sorted(Path(cfg.serve.adapters_dir).iterdir()):
            if sub.is_dir() and not sub.name.startswith(".") and sub.name not in store:
                store.put(sub.name, sub)
    replica_cfg = replace(cfg.serve, adapters_dir=None, threads=cfg.serve.threads or max(1, round(cfg.replica_cpus)))
    engines = serve.deployment(EngineReplica, name="LoramuxEngine").options(
        num_replicas=cfg.replicas, ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=cfg.serve.max_num_seqs)   # the engine batches: let Serve send it a batch
    ingress = serve.deployment(serve.ingress()(Ingress), name="LoramuxIngress").options(
        max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines.bind(replica_cfg, cfg.store_dir, cfg.adapters_per_replica), cfg)


def run(cfg: RayConfig, host: str, port: int) -> int:
    """`loramux serve --ray`: join the Ray cluster (RAY_ADDRESS, or one started with `ray start`) or
    start a local one, and serve on host:port until interrupted."""
    import ray

    ray.init()
    signal.signal(signal.SIGTERM, _interrupt)   # stop as on Ctrl-C: replicas drain and clean up
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(cfg), name="loramux", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def build_app(args: dict) -> object:
    """`serve run loramux.server.ray_app:build_app replicas=4 dtype=float32 allowed_roots=/a,/b ...`: keys are
    fields of RayConfig or ServeConfig, values parsed by the field's type."""
    kinds = {f.name: str(f.type).split(" ")[0] for cls in (ServeConfig, RayConfig) for f in fields(cls)}
    unknown = set(args) - set(kinds) | ({"serve"} & set(args))
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}: use fields of RayConfig or ServeConfig")

    def parse(key: str, value):
        kind = kinds[key]
        if not isinstance(value, str) or kind == "str":
            return value
        if kind.startswith("tuple"):
            return tuple(Path(p) for p in value.split(",") if p)
        return {"int": int, "float": float, "Path": Path, "bool": lambda v: v.lower() in ("1", "true", "yes")
                }.get(kind, str)(value)
    ray_keys = {f.name for f in fields(RayConfig)}
    serve_cfg = ServeConfig(**{k: parse(k, v) for k, v in args.items() if k not in ray_keys})
    return build(RayConfig(serve=serve_cfg, **{k: parse(k, v) for k, v in args.items() if k in ray_keys}))


app = build_app({})  # `serve run loramux.server.ray_app:app`: 2 replicas, defaults everywhere
