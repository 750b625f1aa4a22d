"""What the HTTP handlers share: the engine, tokenizer, adapter registry, metrics and settings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from loramux.engine.async_engine import AsyncEngine
from loramux.engine.llm_engine import StepOutput
from loramux.server.body_limit import DEFAULT_MAX_REQUEST_BYTES
from loramux.server.errors import APIError
from loramux.server.metrics import MIXTURE_LABEL, Metrics
from loramux.server.token_bound import TokenBound

# Worker threads preparing requests (parsing large bodies, chat templates, tokenizing): a few,
# so that however many large requests arrive at once they cannot crowd out the engine's cores.
PREP_THREADS = 2


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any
    base_model_name: str
    registry: Any = None                 # adapters_registry.AdapterRegistry, or None (base model only)
    admin_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    request_timeout: float | None = None     # seconds from arrival to the last token; None: no limit
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # bound on a request body (413 beyond)
    token_bound: TokenBound | None = None    # default: read from the tokenizer
    data_dir_lock: Any = None                # adapters_registry.DataDirLock, held for the server's life
    prep_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(PREP_THREADS))

    def __post_init__(self) -> None:
        if self.token_bound is None:
            self.token_bound = TokenBound.of(self.tokenizer)

    def resolve_model(self, name: str, param: str = "model") -> tuple[str, str | None]:
        """`model` (or `adapter_id`: the request field `param` names) -> (name to report, adapter id or
        None for the bare base model)."""
        if name == self.base_model_name:
            return name, None
        if self.registry is not None:
            from loramux.adapters_registry.errors import AdapterError
            try:
                self.registry.get(name)
                return name, name
            except AdapterError:
                pass
        raise APIError(404, f"The model `{name}` does not exist.", param=param, code="model_not_found")

    def resolve_mixture(self, req) -> tuple[str, str]:
        """A request's `adapters` -> (mixture id to report, its adapter id), merging on first use:
        this can take seconds, so call it off the event loop. `model` must name the base model."""
        if req.model != self.base_model_name or req.adapter_id is not None:
            raise APIError(400, f"with `adapters`, `model` must be the base model `{self.base_model_name}` "
                                f"(and no `adapter_id`)", param="model" if req.model != self.base_model_name else "adapter_id",
                           code="invalid_value")
        if self.registry is None:
            raise APIError(400, "this server serves no adapters", param="adapters", code="invalid_value")
        from loramux.adapters_registry.errors import AdapterError
        from loramux.adapters_registry.mixtures import MixtureRecipe
        try:
            mix_id = self.registry.mixture(MixtureRecipe.create(**req.recipe_args(fallback_seed=req.seed)))
        except AdapterError as e:
            raise APIError(e.status, e.message, param=e.param, code=e.code) from None
        return mix_id, mix_id

    def num_prefix_tokens(self, adapter_id: str | None) -> int:
        if adapter_id is None or self.registry is None:
            return 0
        return int(getattr(self.registry.get(adapter_id), "num_virtual_tokens", 0) or 0)

    def track(self, model: str, endpoint: str, prompt_tokens: int, mixture: bool = False) -> RequestTracker:
        """Metrics of one request, under its model's label (every per-request mixture under one)."""
        return RequestTracker(self.metrics, MIXTURE_LABEL if mixture else model, endpoint, prompt_tokens)

    def serves_label(self, model: str) -> bool:
        """Whether a metrics `model` label still names something served: the base model, the mixtures'
        label, a registered adapter."""
        return model in (self.base_model_name, MIXTURE_LABEL) or (self.registry is not None and model in self.registry)


class RequestTracker:
    """Per-request Prometheus bookkeeping: TTFT, per-token gaps, totals, outcome."""

    def __init__(self, metrics: Metrics, model: str, endpoint: str, prompt_tokens: int) -> None:
        self.m, self.model, self.endpoint = metrics, model, endpoint
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.finished = False
        metrics.of_model(metrics.prompt_tokens, model).inc(prompt_tokens)

    def on_token(self, out: StepOutput) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.m.of_model(self.m.ttft, self.model).observe(now - self.start)
        self.last = now
        self.tokens += 1
        self.m.of_model(self.m.generation_tokens, self.model).inc()

    def done(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.m.of_model(self.m.requests, self.model, self.endpoint, status).inc()
        if self.first is not None and self.last is not None:
            self.m.of_model(self.m.latency, self.model).observe(self.last - self.start)
            if self.tokens > 1:
                self.m.of_model(self.m.tpot, self.model).observe((self.last - self.first) / (self.tokens - 1))
