"""loramux on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint, routed by adapter.

    client -> Ray HTTP proxy -> Ingress (FastAPI: validates, reads `adapter_id`/`model`)
           -> handle.options(multiplexed_model_id=<adapter id>) -> EngineReplica (server/ray_replica.py:
              a whole loramux ServerState from build_state, answering through run_request)

Run it with `loramux serve --ray --replicas N`, or `serve run loramux.server.ray_app:app` (defaults), or
`serve run loramux.server.ray_app:build_app replicas=4 dtype=float32 allowed_roots=/srv/adapters`.

Routing is Ray Serve's model multiplexing: each replica's `@serve.multiplexed` loader registers an
adapter from the shared AdapterStore into that replica's own registry, Serve learns which ids each
replica holds, and sends a request to a replica holding its adapter (else to the one holding fewest).
Serve's LRU over `adapters_per_replica` ids unloads the coldest adapter from the replica's registry.

Registering (POST /v1/adapters) goes to one replica: it copies the folder into the store and loads
it there (full validation; a refused adapter leaves the store). Others load it lazily on first use.
Unloading (DELETE) removes it from the store, then is broadcast to every live replica, freeing it
at once (running requests finish). A replica also checks on every use that the folder it serves is
still the store's current version, so one that missed the broadcast (starting up) or holds an id
that was deleted and registered again never serves stale weights.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from loramux.adapters_registry import AdapterError
from loramux.adapters_registry.store import AdapterStore
from loramux.engine.model_source import cache_root
from loramux.server.admin_routes import _error, _json_body, _RegisterByPath
from loramux.server.body_limit import BodyLimit
from loramux.server.bootstrap import ServeConfig
from loramux.server.errors import error_response, install_error_handlers
from loramux.server.json_body import document_models, json_body_doc, parse_request
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.server.ray_replica import EngineReplica

RETRIES_HEADER = "x-loramux-retries"      # re-sends after the replica serving the request died
log = logging.getLogger("loramux.ray")
_RETRYABLE = (RayActorError, ReplicaUnavailableError)   # the replica died or vanished under the request


@dataclass
class RayConfig:
    serve: ServeConfig = field(default_factory=ServeConfig)   # per replica (each in a private dir under data_dir)
    replicas: int = 2
    replica_cpus: float = 1.0          # Ray CPUs reserved per replica; also its torch threads by default
    store_dir: Path | None = None      # shared adapter store (default <cache>/adapter_store)
    adapters_per_replica: int = 64     # multiplexing LRU: adapters registered per replica at once
    retries: int = 3                   # re-sends of a request whose replica died before answering

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.replica_cpus <= 0 or self.adapters_per_replica < 1 or self.retries < 0:
            raise ValueError(f"invalid RayConfig: {self}")
        self.store_dir = Path(self.store_dir or cache_root() / "adapter_store").expanduser().resolve()


class Ingress:
    """The one endpoint: OpenAI routes forwarded by adapter id, admin routes, gathered replica stats.
    Deployed as `serve.ingress()(Ingress)`: its FastAPI app is built in the replica (ingress_app)."""

    def __init__(self, engines, cfg: RayConfig) -> None:
        self.engines, self.cfg = engines, cfg
        self.store = AdapterStore(cfg.store_dir)
        self._base: str | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self)

    async def base_name(self) -> str:
        if self._base is None:
            self._base = await self.engines.options(method_name="base_model_name").remote()
        return self._base

    async def forward(self, endpoint: str, req, raw: bytes) -> Response:
        name = req.adapter_id or req.model
        mux = {} if getattr(req, "adapters", None) or name == await self.base_name() else \
            {"multiplexed_model_id": name}
        handle = self.engines.options(method_name="respond", stream=True, **mux)
        for attempt in range(self.cfg.retries + 1):
            gen = handle.remote(endpoint, raw)
            try:
                head = await gen.__anext__()
                headers = {**head["headers"], **({RETRIES_HEADER: str(attempt)} if attempt else {})}
                if head["media_type"] != "text/event-stream":  # buffered whole: a replica death stays retryable
                    body = b"".join([chunk async for chunk in gen])
                    return Response(body, head["status"], headers, head["media_type"])
                return StreamingResponse(_rest(gen), head["status"], headers, head["media_type"])
            except _RETRYABLE as e:
                log.warning("%s request for %r: replica gone (%s); retry %d", endpoint, name, type(e).__name__,
                            attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        return error_response(503, "no replica could answer; retry later", code="replica_unavailable",
                              headers={"Retry-After": "1"})

    async def gather(self, method: str, *args) -> list:
        """Call `method` on every live replica (Serve's broadcast); replicas that fail are left out."""
        results = await self.engines.broadcast(method, *args).results_async(timeout_s=60, return_exceptions=True)
        return [r for r in results if not isinstance(r, Exception)]

    def check_auth(self, request: Request) -> None:
        key = self.cfg.serve.admin_key
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if key is not None and (scheme.lower() != "bearer" or
                                not hmac.compare_digest(token.strip().encode(), key.encode())):
            raise AdapterError(401, "admin routes need `Authorization: Bearer <admin key>`", code="invalid_api_key")


def ingress_app(ing: Ingress) -> FastAPI:
    app = FastAPI(title="loramux on Ray Serve")
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=ing.cfg.serve.max_request_bytes)   # no uploads here
    document_models(app, [CompletionRequest, ChatCompletionRequest])

    # Parsed as the single server does (server/json_body.py); the replica tokenizes off its event loop.
    @app.post("/v1/completions", openapi_extra=json_body_doc(CompletionRequest))
    async def completions(request: Request):
        req = await parse_request(request, CompletionRequest)
        return await ing.forward("completions", req, await request.body())

    @app.post("/v1/chat/completions", openapi_extra=json_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await parse_request(request, ChatCompletionRequest)
        return await ing.forward("chat", req, await request.body())

    @app.get("/v1/models")
    async def models():
        base, ids = await ing.base_name(), await asyncio.to_thread(ing.store.list)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "loramux", "root": base,
                                            "parent": None if m == base else base} for m in [base, *ids]]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/replicas")
    async def replicas():
        return {"object": "list", "data": sorted(await ing.gather("stats"), key=lambda s: s["replica"])}

    @app.get("/metrics")
    async def metrics():
        texts = dict(await ing.gather("metrics_text"))
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/adapters")
    async def create_adapter(request: Request):
        try:
            ing.check_auth(request)
            if not request.headers.get("content-type", "").startswith("application/json"):
                raise AdapterError(415, "on Ray Serve, register with JSON {\"id\", \"path\"} (a path every "
                                        "replica can read, under an allowed root)")
            body = await _json_body(request, _RegisterByPath)
            status, out = await ing.engines.options(method_name="register", multiplexed_model_id=body.id).remote(
                body.id, body.path)
            return JSONResponse(out, status_code=status)
        except AdapterError as e:
            return _error(e)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        try:
            ing.check_auth(request)
        except AdapterError as e:
            return _error(e)
        where = {s["replica"]: {a["id"] for a in s["adapters"]} for s in await ing.gather("stats")}
        return {"object": "list", "data": [{"id": i, "object": "adapter", "replicas": sorted(
            r for r, ids in where.items() if i in ids)} for i in await asyncio.to_thread(ing.store.list)]}

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str, request: Request):
        try:
            ing.check_auth(request)
            await asyncio.to_thread(ing.store.delete, adapter_id)
        except AdapterError as e:
            return _error(e)
        await ing.gather("forget", adapter_id)   # every live replica drops it now
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    return app


async def _rest(gen):
    try:
        async for chunk in gen:
            yield chunk
    except _RETRYABLE:
        yield b'data: {"error": {"message": "the replica serving this stream died", "type": "server_error", ' \
              b'"param": null, "code": "replica_unavailable"}}\n\n'


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's Prometheus exposition as one, each sample labelled with its `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def build(cfg: RayConfig):
    """The Serve application: `serve.run(build(cfg))`. Seeds the store from `--adapters DIR`."""
    if cfg.serve.adapters_dir is not None:
        store = AdapterStore(cfg.store_dir, sweep=True)
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
