"""The serving core without HTTP: add requests, step, collect outputs."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from loramux.engine.attention import KVCache
from loramux.engine.batch_invariant import make_batch_invariant
from loramux.engine.block_manager import BlockManager
from loramux.engine.config import EngineConfig
from loramux.engine.detokenizer import Detokenizer
from loramux.engine.gguf_weights import projection_kinds
from loramux.engine.lora_slots import LoraSlots
from loramux.engine.model_runner import ModelRunner
from loramux.engine.model_source import gguf_source
from loramux.engine.models.llama import PROJECTIONS, LlamaModel, StepYielded
from loramux.engine.models.loader import load_model
from loramux.engine.models.spec import ModelSpec
from loramux.engine.quantize import GGUF_MODES, resident_bytes, resolve_mode
from loramux.engine.sampler import Sampler, score_prompt
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import AdapterLeaser, ScheduledBatch, Scheduler
from loramux.engine.sequence import Sequence, TokenLogprob
from loramux.engine.structured import GrammarCompiler, accept, matcher_error

log = logging.getLogger("loramux.engine")


@dataclass
class StepOutput:
    """What one step produced for one sequence."""
    request_id: str
    index: int                          # which of the request's n choices
    token_id: int
    text_delta: str
    logprob: TokenLogprob | None
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None = None           # seconds from arrival to first token, on the first output
    error: str | None = None            # set when the request failed before producing tokens
    error_status: int = 500
    prompt_logprobs: list[TokenLogprob] | None = None   # prompt tokens 1.. (params.prompt_logprobs), first output


@dataclass
class EngineStats:
    steps: int = 0
    yielded_steps: int = 0              # long idle prefills stopped for an arriving request
    last_batch_size: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # drained by the metrics exporter


class LLMEngine:
    def __init__(self, config: EngineConfig, adapters: AdapterLeaser | None = None,
                 lora_stacks: LoraSlots | None = None) -> None:
        self.config = config
        self.spec = ModelSpec.from_dir(config.model_dir)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.max_model_len = min(config.max_model_len, self.spec.max_position_embeddings)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        self.model = self._load_model()
        per_token = KVCache.bytes_per_token(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim,
                                            self.dtype)
        num_blocks = max(config.kv_cache_bytes // (per_token * config.block_size),
                         -(-self.max_model_len // config.block_size) + 1)
        self.kv = KVCache(self.spec.num_layers, num_blocks, config.block_size, self.spec.num_kv_heads,
                          self.spec.head_dim, self.dtype, self.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_prefill_tokens=config.max_prefill_tokens, adapters=adapters)
        self.runner = ModelRunner(self.model, self.kv, self.blocks, self.device, lora_stacks,
                                  batch_invariant=config.batch_invariant)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = self._eos_ids()
        self.sampler = Sampler(self.spec.vocab_size, self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.spec.vocab_size)   # used by the server's threads
        self.stats = EngineStats()
        # True while requests wait to enter (AsyncEngine's inbox): a whole-prompt step of an idle engine
        # stops at the forward's next checkpoint for them: a short request never waits for a long prefill.
        self.arrivals: Callable[[], bool] | None = None
        self._yielded = False               # the last step yielded: this one runs to its end

    def _load_model(self) -> LlamaModel:
        t0 = time.perf_counter()
        gguf = gguf_source(self.config.model_dir)
        self.quantize = resolve_mode(self.config.quantize, dtype=self.dtype, device=self.device,
                                     gguf_kinds=(lambda: projection_kinds(gguf)) if gguf is not None else None)
        model = load_model(self.spec, self.config.model_dir, dtype=self.dtype, quantize=self.quantize,
                           max_positions=self.max_model_len, device=self.device, gguf=gguf)
        if self.config.batch_invariant:
            make_batch_invariant(model, PROJECTIONS)
        log.info("loaded %s (%s, quantize=%s%s) in %.1fs", self.config.model_dir, self.config.dtype, self.quantize,
                 f" from {gguf.name}'s own blocks" if self.quantize in GGUF_MODES and gguf else "",
                 time.perf_counter() - t0)
        return model

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        gen_cfg = self.config.model_dir / "generation_config.json"
        if gen_cfg.is_file():
            import json
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    @property
    def weight_bytes(self) -> int:
        """Resident base-model bytes: tied weights once, quantized storage + its scales as held."""
        return resident_bytes(self.model)

    # -- requests ---------------------------------------------------------------------------------

    def check_prompt(self, prompt_token_ids: list[int], max_tokens: int, num_prefix_tokens: int = 0) -> None:
        """Raise ValueError when a request cannot fit the context window (OpenAI wording)."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_token_ids):
            raise ValueError(f"token ids must be in [0, {self.spec.vocab_size})")
        total = num_prefix_tokens + len(prompt_token_ids) + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_token_ids)} in the prompt, {max_tokens} for the completion"
                + (f", {num_prefix_tokens} virtual prefix tokens" if num_prefix_tokens else "")
                + "). Please reduce the length of the prompt or the completion.")

    def check_params(self, params: SamplingParams) -> None:
        """Raise ValueError when a request names a token id the model does not have."""
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if any(t >= self.spec.vocab_size for t in ids):
                raise ValueError(f"{name} takes token ids in [0, {self.spec.vocab_size})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None = None, n: int = 1) -> list[Sequence]:
        seqs = []
        for i in range(n):
            seq = Sequence(request_id, list(prompt_token_ids), params, adapter_id=adapter_id, index=i,
                           arrival_time=time.monotonic())
            if not params.greedy and params.seed is not None:
                seq.generator = torch.Generator(device="cpu").manual_seed(params.seed + i)
            if params.grammar is not None:
                seq.matcher = params.grammar.matcher()
            self.scheduler.add(seq)
            seqs.append(seq)
        return seqs

    def abort(self, request_id: str) -> int:
        """Cancel every sequence of a request: frees its KV blocks and adapter reference."""
        seqs = self.scheduler.find(request_id)
        for seq in seqs:
            self.scheduler.finish(seq, "abort")
        return len(seqs)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step loop ----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule(arrivals_only=self._yielded)
        failed = [self._failure(s) for s in self.scheduler.failed]
        self.scheduler.failed.clear()
        if not batch:
            return failed
        self._record(batch)
        seqs = batch.sampled
        yieldable, self._yielded = self._yieldable(batch), False
        try:
            logits = self.runner.run(batch, self.arrivals if yieldable else None)
        except StepYielded:
            self._unwind(batch)
            return failed
        except BaseException:
            self.blocks.forget_step()        # what this step registered in the prefix cache was never written
            raise
        if self.runner.nonfinite:
            logits, seqs, failed = self._fail_nonfinite(batch, logits, seqs, failed)
        for seq, prompt_logits in self.runner.prompt_logits:     # prompt_logprobs: this step's prefill spans
            if not seq.is_finished:
                score_prompt(seq, prompt_logits)
        if not seqs:                         # only chunks of prompts still being prefilled
            return failed
        tokens, lps = self.sampler(logits, seqs)
        return failed + [self._append(seq, tok, lp) for seq, tok, lp in zip(seqs, tokens, lps)]

    def _yieldable(self, batch: ScheduledBatch) -> bool:
        """A step may stop for arrivals when it is one prompt's idle prefill longer than a streaming
        step (the scheduler's whole-prompt budget): no decode waits on it, and no other sequence of
        the step can have read a block it registers in the prefix cache. Never two steps running: a
        flood of requests the engine then refuses cannot hold a prompt back."""
        return (self.arrivals is not None and not self._yielded and not batch.decodes and len(batch.prefills) == 1
                and batch.num_tokens > self.scheduler.max_num_batched_tokens)

    def _unwind(self, batch: ScheduledBatch) -> None:
        """A yielded step: its chunk counts as not computed (the runner advances nothing before the
        forward returns), and the blocks it registered in the prefix cache are forgotten, to be
        registered again by the step that computes them. The next step carries only the arrivals
        (Scheduler.schedule's arrivals_only); the prompt goes on in streaming chunks beside them."""
        self.blocks.forget_step()
        for seq in batch.prefills:
            seq.num_hashed_blocks = min(seq.num_hashed_blocks, seq.num_computed_tokens // self.blocks.block_size)
        self.stats.yielded_steps += 1
        self._yielded = True

    def _fail_nonfinite(self, batch: ScheduledBatch, logits: torch.Tensor, seqs: list[Sequence],
                        failed: list[StepOutput]) -> tuple[torch.Tensor, list[Sequence], list[StepOutput]]:
        """Fail the sequences whose K/V overflowed this step (none of it reached the cache), and any
        sequence of the step that shares a block they registered in the prefix cache (same adapter
        and tokens: it read the dropped rows). The others' logits and outputs are untouched."""
        bad = {s.seq_id for s in self.runner.nonfinite}
        blocks = {b for s in batch.sequences if s.seq_id in bad for b in s.block_table}
        shared = self.blocks.forget_blocks(blocks)
        bad |= {s.seq_id for s in batch.sequences if shared.intersection(s.block_table)}
        for seq in batch.sequences:
            if seq.seq_id in bad:
                self.scheduler.finish(seq, "error")
                seq.error = ("the model's activations for this request overflowed (NaN or Inf in its keys and "
                             "values); it was stopped, and nothing of it was cached")
                seq.error_status = 500
                log.warning("request %s: non-finite K/V, failed", seq.request_id)
                failed.append(self._failure(seq))
        keep = [i for i, s in enumerate(seqs) if s.seq_id not in bad]
        return logits[keep], [seqs[i] for i in keep], failed

    def _failure(self, seq: Sequence) -> StepOutput:
        return StepOutput(seq.request_id, seq.index, -1, "", None, True, "error", len(seq.prompt_token_ids), 0,
                          error=seq.error, error_status=seq.error_status)

    def _record(self, batch: ScheduledBatch) -> None:
        self.stats.steps += 1
        self.stats.last_batch_size = len(batch.sequences)
        self.stats.batch_sizes.append(len(batch.sequences))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        now = time.monotonic()
        ttft = None
        if seq.first_token_time is None:
            seq.first_token_time = now
            ttft = now - seq.arrival_time
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        grammar_done = seq.matcher is not None and not accept(seq.matcher, token)
        if grammar_done and (error := matcher_error(seq.matcher)) is not None:
            # A limit hit mid-generation is no answer (never a "stop"): the request fails, the rest go on.
            seq.error, seq.error_status = f"structured output failed: {error}", 400
            self.scheduler.finish(seq, "error")
            return self._failure(seq)
        reason = self._finish_reason(seq, token, grammar_done)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        delta = self.detokenizer.pop_delta(seq)
        prompt_lps = seq.prompt_logprobs if ttft is not None and seq.params.prompt_logprobs is not None else None
        return StepOutput(seq.request_id, seq.index, token, delta, logprob, seq.is_finished, seq.finish_reason,
                          len(seq.prompt_token_ids), len(seq.output_token_ids), ttft, prompt_logprobs=prompt_lps)

    def _finish_reason(self, seq: Sequence, token: int, grammar_done: bool = False) -> str | None:
        p = seq.params
        # The stop token itself adds no text when it is special (skip_special_tokens drops it).
        stop_token = grammar_done or (len(seq.output_token_ids) > p.min_tokens and (
            (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids))
        length = len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len
        if self.detokenizer.update(seq, final=stop_token or length) or stop_token:
            return "stop"
        return "length" if length else None

    # -- convenience for tests and benchmarks -----------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapter_ids: list[str | None] | None = None) -> list[Sequence]:
        """Run prompts to completion together (continuous batching) and return their sequences."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_ids = adapter_ids or [None] * len(prompts)
        seqs = [self.add_request(f"gen-{i}-{time.monotonic_ns()}", p, sp, a)[0]
                for i, (p, sp, a) in enumerate(zip(prompts, params_list, adapter_ids))]
        while self.has_work:
            steps = self.stats.steps
            self.step()
            if self.stats.steps == steps:
                time.sleep(0.005)            # nothing ran: adapters still loading in the background
        return seqs
