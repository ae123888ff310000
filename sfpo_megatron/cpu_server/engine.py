"""The CPU rollout server's generation engine: one thread owns the HF model and runs batches
(prefill, decode, sampling with per-sequence generators, aborts, pauses) and weight updates
between them. Semantics: see :mod:`sfpo_megatron.cpu_server.server`.

The model may sit on a GPU (the server's ``--device cuda``): forwards and the KV cache run
there; token ids, masks, logits and sampling stay on the host, so sampling is the same code (and
the same per-sequence CPU generators) on either device.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sfpo_megatron.cpu_server.requests import FLOAT32_MIN, RequestError, SamplingConfig, SeqSpec

logger = logging.getLogger("sfpo_megatron.cpu_server.server")

THROUGHPUT_WINDOW_S = 10.0
# An idle engine that receives a request waits a little for the requests sent with it (a client's
# concurrent HTTP calls arrive milliseconds apart): a request that misses the first prefill joins
# after the first decode step and finishes one step later than its batch, so the wait is worth up
# to a small share of one decode step. It stops as soon as no request arrives for the gap; both
# scale with the measured decode step, within these bounds (the lower ones before any step).
ADMISSION_WINDOW_SHARE, ADMISSION_WINDOW_S = 0.25, (0.005, 0.05)
ARRIVAL_GAP_SHARE, ARRIVAL_GAP_S = 0.05, (0.001, 0.01)

# ============================================================================================
# Generation engine: one thread owns the model; batches, sampling, weight updates.
# ============================================================================================



def expert_views(table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps an MoE layer's experts fused in memory (``experts.gate_up_proj``
    [E, 2F, H] with gate rows first, ``experts.down_proj`` [E, H, F]) while checkpoints and the
    trainer's weight updates name them one by one (``experts.{x}.gate_proj.weight`` ...): views
    into the fused tensors under those names, so writing a view writes the model."""
    views = {}
    for name, t in table.items():
        if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            prefix = name[: -len("gate_up_proj")]
            for x in range(t.shape[0]):
                gate, up = t[x].chunk(2)
                views[f"{prefix}{x}.gate_proj.weight"] = gate
                views[f"{prefix}{x}.up_proj.weight"] = up
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            prefix = name[: -len("down_proj")]
            for x in range(t.shape[0]):
                views[f"{prefix}{x}.down_proj.weight"] = t[x]
    return views

class EngineError(RuntimeError):
    pass


class QueueFullError(EngineError):
    """A request would take the queued and running sequences over the engine's limit."""


def _samplable(logits: torch.Tensor) -> torch.Tensor:
    """Per row of ``logits``: whether it is a distribution to sample from (no NaN, no +inf, and
    at least one finite logit; -inf only masks a token out). One reduction: the row's max is NaN,
    +inf or -inf exactly when it is not."""
    return torch.isfinite(logits.amax(-1))


class _Unsamplable(Exception):
    """Raised by the stage of the logits processing after which a row is not samplable."""


@dataclass
class Sequence:
    spec: SeqSpec
    generator: torch.Generator
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    created: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    output_ids_lp: list[list[float]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[tuple[list[float], list[int]] | None] = field(default_factory=list)
    input_ids_lp: list[list[float] | None] = field(default_factory=list)
    finish_reason: dict | None = None
    stop_text_cut: int | None = None

    @property
    def rid(self) -> str:
        return self.spec.rid


@dataclass
class _Batch:
    seqs: list[Sequence]
    cache: Any
    mask: torch.Tensor  # (B, T) attention mask over cache + next token
    next_pos: torch.Tensor  # (B,) position id of the token to feed next
    logits: torch.Tensor  # (B, V) next-token logits, float32
    counts: torch.Tensor | None  # (B, V) generated-token counts, only when a row is penalised


class GenerationEngine:
    """Owns the model. All model access (forward, weight updates, offload) runs on its thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: set[int],
        max_batch_size: int = 64,
        max_total_tokens: int | None = None,
        max_queued_sequences: int | None = None,
        weight_version: str = "default",
        return_original_logprob: bool = False,
        tokenizer: Any | None = None,
        offload_dir: str | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            # The prefill's head sees the last position of every row, a strided (B, 1, H) view. With
            # weights that do not require grad, torch's matmul then broadcasts the weight into a
            # batched GEMM instead of one GEMM: about 1.6x the prefill's time on a 152k vocabulary.
            head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]) if args else None)
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_total_tokens = max_total_tokens
        self.max_queued_sequences = max_queued_sequences
        self.weight_version = weight_version
        self.return_original_logprob = return_original_logprob
        self.tokenizer = tokenizer
        self.offload_dir = Path(offload_dir or tempfile.gettempdir())
        self._seed_rng = random.Random(seed)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._commands: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: list[Sequence] = []
        self._paused = False
        self._pause_mode = "abort"
        self._released = False
        self._abort_all = False
        self._abort_rids: set[str] = set()
        self._stop = False
        self._offload_path: Path | None = None
        self._param_shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        # Tensors received for a weight update that is not complete yet, by weight-update group:
        # applied together (on this thread) when the update commits, dropped if it fails.
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
        self._staged_lock = threading.Lock()
        # Host buffers this engine allocated to receive weights, by data pointer, and the spare
        # ones by (shape, dtype): a commit adopts received buffers as the parameters, so the
        # buffers it replaces (from the previous update) receive the next one. Fresh memory costs
        # a page fault per page on first touch: filling it runs at about 40 % of a warm copy.
        self._own_buffers: set[int] = set()
        self._spare: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.stats = {"requests": 0, "sequences": 0, "generated_tokens": 0, "batches": 0, "prefills": 0, "weight_updates": 0}
        self._started = time.monotonic()
        # (time, tokens) of each sampling step in the last THROUGHPUT_WINDOW_S: the current tokens/s.
        self._steps: deque[tuple[float, int]] = deque()
        self._step_s = 0.0  # the last decode step's seconds: scales the admission wait
        self._thread = threading.Thread(target=self._loop, name="rollout-engine", daemon=True)

    # ---- thread-safe API ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def released(self) -> bool:
        return self._released

    @property
    def pause_mode(self) -> str | None:
        return self._pause_mode if self._paused else None

    def submit(self, specs: list[SeqSpec], limited: bool = True) -> list[Sequence]:
        """Queue ``specs``; with ``limited``, raise QueueFullError rather than take the queued and
        running sequences over ``max_queued_sequences``."""
        with self._cond:
            if self._stop:
                raise EngineError("the engine is shutting down")
            queued = len(self._waiting) + len(self._running)
            limit = self.max_queued_sequences
            if limited and limit is not None and queued + len(specs) > limit:
                raise QueueFullError(
                    f"the server's queue is full: {queued} sequences are queued or running, this request adds "
                    f"{len(specs)}, and --max-queued-sequences is {limit}; retry later")
            seqs = []
            for spec in specs:
                g = torch.Generator()
                base = spec.params.seed if spec.params.seed is not None else self._seed_rng.getrandbits(62)
                g.manual_seed(base + spec.sample_index)
                seqs.append(Sequence(spec, g))
            self._waiting.extend(seqs)
            self.stats["requests"] += 1
            self.stats["sequences"] += len(seqs)
            self._cond.notify_all()
        return seqs

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between batches (or between decode steps while paused)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append((fn, fut))
            self._cond.notify_all()
        return fut

    def abort(self, rids: set[str] | None = None, message: str = "Aborted by request", prefix: str | None = None) -> int:
        """Abort waiting and running sequences: those in ``rids``, those whose rid starts with
        ``prefix`` (SGLang's /abort_request matching), or all when both are None."""

        def hit(rid: str) -> bool:
            if rids is None and prefix is None:
                return True
            return (rids is not None and rid in rids) or (prefix is not None and rid.startswith(prefix))

        with self._cond:
            waiting = [s for s in self._waiting if hit(s.rid)]
            for s in waiting:
                self._waiting.remove(s)
                self._finish(s, {"type": "abort", "message": message})
            running = [s for s in self._running if hit(s.rid) and not s.future.done()]
            if rids is None and prefix is None:
                self._abort_all = bool(running)
            else:
                self._abort_rids |= {s.rid for s in running}
            self._cond.notify_all()
            return len(waiting) + len(running)

    def pause(self, mode: str) -> int:
        aborted = self.abort(message="Aborted by /pause_generation") if mode == "abort" else 0
        with self._cond:
            self._paused = True
            self._pause_mode = mode
            self._cond.notify_all()
        return aborted

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {
                "num_reqs": len(self._waiting) + len(self._running),
                "num_waiting_reqs": len(self._waiting),
                "num_running_reqs": len(self._running),
                "num_tokens": sum(len(s.spec.prompt_ids) + len(s.output_ids) for s in self._running),
            }

    def metrics(self) -> dict[str, Any]:
        """SGLang's scheduler metrics: the load, the limits, and ``last_gen_throughput`` (generated
        tokens/s over the last ``THROUGHPUT_WINDOW_S`` seconds, or since start when younger)."""
        now = time.monotonic()
        with self._cond:
            self._expire_steps(now)
            tokens = sum(n for _, n in self._steps)
            reserved = sum(self._reserved(s) for s in self._running)
        span = min(THROUGHPUT_WINDOW_S, now - self._started)
        return {**self.load(), "last_gen_throughput": tokens / span if span > 0 else 0.0,
                "reserved_tokens": reserved, "max_running_requests": self.max_batch_size,
                "max_total_num_tokens": self.max_total_tokens}

    def _expire_steps(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - THROUGHPUT_WINDOW_S:
            self._steps.popleft()

    @staticmethod
    def _reserved(s: Sequence) -> int:
        """The KV tokens a sequence may come to hold: its prompt and all its new tokens."""
        return len(s.spec.prompt_ids) + s.spec.params.max_new_tokens

    def _take_waiting(self, running: list[Sequence]) -> list[Sequence]:
        """Under the lock: pop the waiting sequences that may join ``running``, in arrival order,
        within ``max_batch_size`` sequences and ``max_total_tokens`` reserved tokens. A sequence
        over the token budget on its own still runs when nothing else does."""
        taken: list[Sequence] = []
        budget = self.max_total_tokens
        used = sum(self._reserved(s) for s in running)
        while self._waiting and len(running) + len(taken) < self.max_batch_size:
            need = self._reserved(self._waiting[0])
            if budget is not None and used + need > budget and (running or taken):
                break
            used += need
            taken.append(self._waiting.popleft())
        return taken

    # ---- engine thread -----------------------------------------------------------------

    def _can_run(self) -> bool:
        return not self._paused and not self._released

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._commands and not (self._waiting and self._can_run()):
                    self._cond.wait()
                if self._stop:
                    break
                if not self._commands:
                    self._gather_arrivals()
                commands = list(self._commands)
                self._commands.clear()
                batch: list[Sequence] = []
                if not commands:
                    batch = self._take_waiting([])
                    self._running = batch
                    self._abort_all, self._abort_rids = False, set()
            for fn, fut in commands:
                self._run_command(fn, fut)
            if batch:
                try:
                    self._run_batch(batch)
                except Exception as e:  # the batch fails; the server keeps serving
                    logger.exception("generation batch failed")
                    with self._cond:
                        failed = batch + self._running  # includes sequences admitted mid-batch
                    for s in failed:
                        if not s.future.done():
                            s.future.set_exception(EngineError(f"generation failed: {e}"))
                finally:
                    with self._cond:
                        self._running = []
        with self._cond:
            leftovers = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for s in leftovers:
            if not s.future.done():
                s.future.set_exception(EngineError("server shut down"))

    def _gather_arrivals(self) -> None:
        """Under the lock, idle engine: let requests sent together arrive (see ADMISSION_WINDOW_SHARE)."""
        window = min(max(ADMISSION_WINDOW_SHARE * self._step_s, ADMISSION_WINDOW_S[0]), ADMISSION_WINDOW_S[1])
        gap = min(max(ARRIVAL_GAP_SHARE * self._step_s, ARRIVAL_GAP_S[0]), ARRIVAL_GAP_S[1])
        deadline = time.monotonic() + window
        seen = len(self._waiting)
        while not self._stop and not self._commands and seen < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(left, gap))
            if len(self._waiting) == seen:
                return
            seen = len(self._waiting)

    @staticmethod
    def _run_command(fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)

    def _checkpoint(self) -> None:
        """Between decode steps: return once the batch may go on or has aborts to apply. While paused
        in place (or released) serve commands, e.g. weight updates, and wait."""
        while True:
            with self._cond:
                if self._can_run() or self._abort_all or self._abort_rids:
                    return
                commands = list(self._commands)
                self._commands.clear()
                if not commands:
                    self._cond.wait()
                    continue
            for fn, fut in commands:
                self._run_command(fn, fut)

    def _finish(self, seq: Sequence, reason: dict) -> None:
        seq.finish_reason = reason
        if not seq.future.done():
            seq.future.set_result(self._result(seq))

    @torch.inference_mode()
    def _run_batch(self, seqs: list[Sequence]) -> None:
        self.stats["batches"] += 1
        batch = self._prefill(seqs)
        while batch.seqs:
            self._sample_step(batch)
            self._retire(batch)
            while batch.seqs:
                self._checkpoint()
                self._apply_aborts(batch)
                if self._can_run():
                    break
            if not batch.seqs:
                break
            self._decode(batch)
            self._admit(batch)

    def _admit(self, batch: _Batch) -> None:
        """Continuous batching: prefill waiting sequences and merge them into the running batch, so
        a batch never waits for its longest row while requests queue. Stops while commands (weight
        updates) wait, so the batch drains and they run between batches."""
        if not self._mergeable(batch.cache):
            return
        with self._cond:
            if self._commands or not self._can_run():
                return
            new = self._take_waiting(batch.seqs)
            if not new:
                return
            self._running = self._running + new
        fresh = self._prefill(new)
        if fresh.seqs:
            self._merge(batch, fresh)

    @staticmethod
    def _mergeable(cache: Any) -> bool:
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def _merge(self, batch: _Batch, fresh: _Batch) -> None:
        """Append ``fresh``'s rows to ``batch``, left-padding whichever cache is shorter (the padded
        positions are masked out, as in any left-padded batch)."""
        t_old, t_new = batch.mask.shape[1], fresh.mask.shape[1]
        width = max(t_old, t_new)

        def pad(x: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
            if extra == 0:
                return x
            shape = list(x.shape)
            shape[dim] = extra
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old_layer, new_layer in zip(batch.cache.layers, fresh.cache.layers):
            old_layer.keys = torch.cat([pad(old_layer.keys, width - t_old, 2), pad(new_layer.keys, width - t_new, 2)])
            old_layer.values = torch.cat([pad(old_layer.values, width - t_old, 2), pad(new_layer.values, width - t_new, 2)])
        batch.mask = torch.cat([pad(batch.mask, width - t_old, 1), pad(fresh.mask, width - t_new, 1)])
        batch.next_pos = torch.cat([batch.next_pos, fresh.next_pos])
        batch.logits = torch.cat([batch.logits, fresh.logits])
        if batch.counts is not None or fresh.counts is not None:
            zeros = lambda b: torch.zeros(len(b.seqs), self.vocab_size)  # noqa: E731
            batch.counts = torch.cat([batch.counts if batch.counts is not None else zeros(batch),
                                      fresh.counts if fresh.counts is not None else zeros(fresh)])
        batch.seqs = batch.seqs + fresh.seqs

    def _prefill(self, seqs: list[Sequence]) -> _Batch:
        self.stats["prefills"] += 1
        lengths = [len(s.spec.prompt_ids) for s in seqs]
        L, B = max(lengths), len(seqs)
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding: every row's next token sits in column L
            ids[r, L - lengths[r]:] = torch.tensor(s.spec.prompt_ids)
            mask[r, L - lengths[r]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        full = any(s.spec.return_logprob and s.spec.logprob_start_len >= 0 for s in seqs)
        cache = DynamicCache(config=self.model.config)
        dev = self.device
        out = self.model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
            past_key_values=cache, use_cache=True, logits_to_keep=0 if full else 1,
        )
        logits = out.logits.float().cpu()
        if full:
            for r, s in enumerate(seqs):
                if s.spec.return_logprob and s.spec.logprob_start_len >= 0:
                    self._prompt_logprobs(s, logits[r, L - lengths[r]:])
        penalised = any(s.spec.params.penalised for s in seqs)
        counts = torch.zeros(B, self.vocab_size, dtype=torch.float32) if penalised else None
        batch = _Batch(list(seqs), cache, mask, pos[:, -1] + 1, logits[:, -1], counts)
        # max_new_tokens == 0 is a prefill-only (scoring) request.
        done = [s for s in seqs if s.spec.params.max_new_tokens == 0]
        for s in done:
            self._finish(s, {"type": "length", "length": 0})
        if done:
            self._select(batch, [r for r, s in enumerate(seqs) if s.spec.params.max_new_tokens > 0])
        return batch

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Logprob of prompt token k given tokens < k (raw distribution); None for the first token."""
        logp = torch.log_softmax(logits, dim=-1).clamp(min=FLOAT32_MIN)
        prompt = seq.spec.prompt_ids
        k_top, ids = seq.spec.top_logprobs_num, seq.spec.token_ids_logprob
        for k in range(seq.spec.logprob_start_len, len(prompt)):
            if k == 0:
                seq.input_logprobs.append(None)
                seq.input_top.append(None)
                seq.input_ids_lp.append(None)
                continue
            row = logp[k - 1]
            seq.input_logprobs.append(float(row[prompt[k]]))
            if k_top:
                v, i = torch.topk(row, k_top)
                seq.input_top.append((v.tolist(), i.tolist()))
            if ids:
                seq.input_ids_lp.append(row[ids].tolist())

    def _decode(self, batch: _Batch) -> None:
        last = torch.tensor([s.output_ids[-1] for s in batch.seqs], dtype=torch.long)
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.seqs), 1, dtype=batch.mask.dtype)], dim=1)
        dev = self.device
        start = time.perf_counter()
        out = self.model(
            input_ids=last[:, None].to(dev), attention_mask=batch.mask.to(dev),
            position_ids=batch.next_pos[:, None].to(dev), past_key_values=batch.cache, use_cache=True,
        )
        batch.logits = out.logits[:, -1].float().cpu()
        batch.next_pos = batch.next_pos + 1
        self._step_s = time.perf_counter() - start

    def _sample_step(self, batch: _Batch) -> None:
        logits = batch.logits
        # Each full pass over (rows x vocab) costs about as much as a small model's decode step
        # per row, so the row maxima are computed once: NaN anywhere makes its row's max NaN. One
        # max() pass gives the maxima and the greedy tokens together (first index on ties, as
        # argmax; argmax alone is slower on CPU than both).
        row_max, tokens = logits.max(dim=-1)
        if torch.isnan(row_max).any():
            raise EngineError("the model produced NaN logits (corrupted weights?)")
        seqs = batch.seqs
        adjusted = self._adjust_logits(logits, batch)
        if adjusted is not logits:
            tokens = adjusted.max(dim=-1).indices
        temps = [1.0 if s.spec.params.greedy else s.spec.params.temperature for s in seqs]
        # Dividing by 1.0 is exact: an all-greedy batch skips the pass and reuses the maxima.
        scaled = adjusted if all(t == 1.0 for t in temps) else adjusted / torch.tensor(temps)[:, None]
        samplable = torch.isfinite(row_max) if scaled is logits else _samplable(scaled)
        # The sampled token's logprob is its logit minus the row's logsumexp: one reduction pass.
        # The whole log-softmax row is materialised only for rows that ask for top / given ids.
        source = logits if self.return_original_logprob else scaled
        want = any(s.spec.return_logprob for s in seqs)
        report = lse = None
        if want and any(s.spec.top_logprobs_num or s.spec.token_ids_logprob for s in seqs):
            report = torch.log_softmax(source, dim=-1)
        elif want:
            lse = torch.logsumexp(source, dim=-1)
        # A request's own parameters can leave its row with nothing to sample (every op above is
        # row-wise): that sequence fails alone with a 400, the rest of the batch goes on unchanged.
        failed = set(torch.nonzero(~samplable)[:, 0].tolist())
        for r in failed:
            self._fail(seqs[r], self._distribution_error(seqs[r], logits[r], None if batch.counts is None else batch.counts[r]))
        for r, s in enumerate(seqs):
            p = s.spec.params
            if p.greedy or r in failed:
                continue
            row = scaled[r:r + 1]
            row = self._filter(row, p)
            probs = torch.softmax(row, dim=-1)[0]
            try:  # the filters keep a samplable row's top token; this only guards that promise
                tokens[r] = torch.multinomial(probs, 1, generator=s.generator)[0]
            except RuntimeError as e:
                failed.add(r)
                self._fail(s, RequestError("sampling_params", f"top_k / top_p / min_p filtering left nothing to sample ({e})"))
        token_list = tokens.tolist()
        if report is not None:
            lps = report.gather(1, tokens[:, None])[:, 0].clamp(min=FLOAT32_MIN).tolist()
        elif lse is not None:
            lps = (source.gather(1, tokens[:, None])[:, 0] - lse).clamp(min=FLOAT32_MIN).tolist()
        else:
            lps = []
        for r, s in enumerate(seqs):
            if r in failed:
                continue
            tok = token_list[r]
            s.output_ids.append(tok)
            if s.spec.return_logprob:
                s.output_logprobs.append(lps[r])
                row = report[r].clamp(min=FLOAT32_MIN) if s.spec.top_logprobs_num or s.spec.token_ids_logprob else None
                if s.spec.top_logprobs_num:
                    v, i = torch.topk(row, s.spec.top_logprobs_num)
                    s.output_top.append((v.tolist(), i.tolist()))
                if s.spec.token_ids_logprob:
                    s.output_ids_lp.append(row[s.spec.token_ids_logprob].tolist())
            if batch.counts is not None:
                batch.counts[r, tok] += 1
        generated = len(seqs) - len(failed)
        self.stats["generated_tokens"] += generated
        now = time.monotonic()
        with self._cond:
            self._steps.append((now, generated))
            self._expire_steps(now)

    @staticmethod
    def _fail(seq: Sequence, error: Exception) -> None:
        """End ``seq`` with ``error``; ``_retire`` then drops it from the batch."""
        if not seq.future.done():
            seq.future.set_exception(error)

    def _adjust_logits(self, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Penalties, logit bias and min_new_tokens, applied before temperature (as in SGLang)."""
        out = None
        for r, s in enumerate(batch.seqs):
            p = s.spec.params
            needs_stop_mask = p.min_new_tokens > len(s.output_ids) and bool(self._stop_ids(p))
            if not (p.penalised or p.logit_bias or needs_stop_mask):
                continue
            if out is None:
                out = logits.clone()
            self._adjust_row(out[r], s, None if batch.counts is None else batch.counts[r])
        return logits if out is None else out

    def _adjust_row(self, row: torch.Tensor, s: Sequence, counts: torch.Tensor | None,
                    check: Callable[[str], None] = lambda stage: None) -> None:
        """``_adjust_logits`` for one row, in place; ``check(stage)`` runs after each stage."""
        p = s.spec.params
        if p.penalised and counts is not None:
            seen = counts > 0
            row -= p.frequency_penalty * counts + p.presence_penalty * seen.float()
            if p.repetition_penalty != 1.0:
                row[:] = torch.where(seen & (row < 0), row * p.repetition_penalty, row)
                row[:] = torch.where(seen & (row >= 0), row / p.repetition_penalty, row)
            check("penalties")
        for tid, b in p.logit_bias:
            row[tid] += b
        check("logit_bias")
        if p.min_new_tokens > len(s.output_ids):
            stops = self._stop_ids(p)
            if stops:
                row[list(stops)] = float("-inf")
            check("min_new_tokens")

    def _stop_ids(self, p: SamplingConfig) -> set[int] | frozenset[int]:
        """The token ids that end a sequence with parameters ``p`` (masked before min_new_tokens)."""
        return (frozenset() if p.ignore_eos else self.eos_token_ids) | p.stop_token_ids

    def _distribution_error(self, s: Sequence, logits: torch.Tensor, counts: torch.Tensor | None) -> Exception:
        """The parameter of ``s`` that left its next-token distribution with nothing to sample:
        the first stage of the logits processing after which the row is not samplable."""
        p = s.spec.params
        row = logits.clone()
        messages = {
            "penalties": ("sampling_params", "frequency_penalty / presence_penalty / repetition_penalty leave no "
                          "token with a finite logit"),
            "logit_bias": ("sampling_params.logit_bias", "with the biases added no token has a finite logit "
                           "(a logit overflowed to inf, or every token is at -inf)"),
            "min_new_tokens": ("sampling_params.min_new_tokens", f"every token still possible is a stop token (EOS or "
                               f"stop_token_ids), so none can be sampled before min_new_tokens={p.min_new_tokens}"),
        }

        def check(stage: str) -> None:
            if not bool(_samplable(row)):
                raise _Unsamplable(stage)

        try:
            check("model")
            self._adjust_row(row, s, counts, check)
        except _Unsamplable as e:
            stage = str(e)
            if stage == "model":  # not the request's parameters: the model's fault, a 500 for this request
                return EngineError("the model's logits for this sequence are not finite")
            return RequestError(*messages[stage])
        if p.logit_bias:  # the bias made the logits huge; the temperature only tipped them over
            return RequestError("sampling_params.logit_bias", f"the biased logits divided by temperature {p.temperature} "
                                "overflow float32; no token can be sampled")
        return RequestError("sampling_params.temperature",
                            f"the logits divided by temperature {p.temperature} overflow float32; no token can be sampled")

    @staticmethod
    def _filter(row: torch.Tensor, p: SamplingConfig) -> torch.Tensor:
        if p.top_k > 0:
            row = TopKLogitsWarper(p.top_k)(None, row)
        if p.top_p < 1.0:
            row = TopPLogitsWarper(p.top_p)(None, row)
        if p.min_p > 0.0:
            row = MinPLogitsWarper(p.min_p)(None, row)
        return row

    def _retire(self, batch: _Batch) -> None:
        keep = []
        for r, s in enumerate(batch.seqs):
            if s.future.done():  # failed in this step's sampling
                continue
            reason = self._finish_reason(s)
            if reason is None:
                keep.append(r)
            else:
                self._finish(s, reason)
        if len(keep) < len(batch.seqs):
            self._select(batch, keep)

    def _finish_reason(self, s: Sequence) -> dict | None:
        """SGLang's order: the length limit first, then stop tokens, then stop strings."""
        p, tok = s.spec.params, s.output_ids[-1]
        if len(s.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids:
            return {"type": "stop", "matched": tok}
        if p.stop_strs:
            text = self.tokenizer.decode(s.output_ids, skip_special_tokens=p.skip_special_tokens)
            for stop in p.stop_strs:
                idx = text.find(stop)
                if idx >= 0:
                    s.stop_text_cut = idx
                    return {"type": "stop", "matched": stop}
        return None

    def _apply_aborts(self, batch: _Batch) -> None:
        with self._cond:
            abort_all, rids = self._abort_all, set(self._abort_rids)
            self._abort_all, self._abort_rids = False, set()
        if not abort_all and not rids:
            return
        keep = []
        for r, s in enumerate(batch.seqs):
            if abort_all or s.rid in rids:
                self._finish(s, {"type": "abort", "message": "Aborted"})
            else:
                keep.append(r)
        self._select(batch, keep)

    def _select(self, batch: _Batch, keep: list[int]) -> None:
        batch.seqs = [batch.seqs[r] for r in keep]
        with self._cond:
            self._running = [s for s in self._running if not s.future.done()]
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long)
        batch.cache.batch_select_indices(idx.to(self.device))
        batch.mask = batch.mask[idx]
        batch.next_pos = batch.next_pos[idx]
        batch.logits = batch.logits[idx]
        if batch.counts is not None:
            batch.counts = batch.counts[idx]
        # Columns that are padding for every remaining row only cost attention time: drop them.
        lead = int(batch.mask.any(dim=0).long().argmax())
        if lead > 0 and self._mergeable(batch.cache):
            for layer in batch.cache.layers:
                if layer.get_seq_length() > 0:
                    layer.keys = layer.keys[:, :, lead:]
                    layer.values = layer.values[:, :, lead:]
            batch.mask = batch.mask[:, lead:]

    def _result(self, s: Sequence) -> dict:
        """One SGLang /generate result (``text`` only when the server has a tokenizer)."""
        spec, fr = s.spec, s.finish_reason
        meta: dict[str, Any] = {
            "id": s.rid,
            "finish_reason": fr,
            "prompt_tokens": len(spec.prompt_ids),
            "completion_tokens": len(s.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": time.perf_counter() - s.created,
        }
        if spec.return_logprob:
            meta["input_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(s.input_logprobs, spec.prompt_ids[max(spec.logprob_start_len, 0):])
            ]
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(s.output_logprobs, s.output_ids)]
            if spec.top_logprobs_num:
                meta["input_top_logprobs"] = [None if t is None else [[v, i, None] for v, i in zip(*t)] for t in s.input_top]
                meta["output_top_logprobs"] = [[[v, i, None] for v, i in zip(*t)] for t in s.output_top]
            if spec.token_ids_logprob:
                ids = spec.token_ids_logprob
                meta["input_token_ids_logprobs"] = [None if t is None else [[v, i, None] for v, i in zip(t, ids)] for t in s.input_ids_lp]
                meta["output_token_ids_logprobs"] = [[[v, i, None] for v, i in zip(t, ids)] for t in s.output_ids_lp]
        out: dict[str, Any] = {}
        if self.tokenizer is not None:
            ids = s.output_ids
            if fr and fr.get("type") == "stop" and isinstance(fr.get("matched"), int) and not spec.params.no_stop_trim:
                ids = ids[:-1]  # SGLang leaves a matched stop token out of the text
            text = self.tokenizer.decode(ids, skip_special_tokens=spec.params.skip_special_tokens)
            if s.stop_text_cut is not None and not spec.params.no_stop_trim:
                text = text[: s.stop_text_cut]
            out["text"] = text
        out["output_ids"] = list(s.output_ids)
        out["meta_info"] = meta
        return out

    # ---- weights (run through call(): on the engine thread) -----------------------------

    def param_table(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor, tied aliases included (``lm_head.weight`` of a tied model), and the
        experts of MoE models one by one under their checkpoint names."""
        table = {k: v.data for k, v in self.model.state_dict(keep_vars=True).items()}
        table.update(expert_views(table))
        return table

    def load_from_disk(self, model_path: str) -> str:
        path = Path(model_path)
        if path.is_file() and path.suffix == ".safetensors":
            files = [path]
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            index = path / "model.safetensors.index.json"
            if index.exists():  # like SGLang's loader: only the shards the index names
                names = set(json.loads(index.read_text())["weight_map"].values())
                files = [f for f in files if f.name in names]
        else:
            raise ValueError(f"model_path {model_path!r} is neither a directory nor a .safetensors file")
        if not files:
            raise ValueError(f"no *.safetensors files in {model_path!r}")
        table = self.param_table()
        # Check every header before touching the model, so a bad checkpoint changes nothing.
        plan: list[tuple[Path, str]] = []
        for f in files:
            try:
                opened = safe_open(str(f), framework="pt")
            except SafetensorError as e:  # truncated or not safetensors at all
                raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
            with opened as sf:
                for name in sf.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    if name not in table:
                        raise ValueError(f"{f.name}: tensor {name!r} is not a parameter of this model")
                    shape = tuple(sf.get_slice(name).get_shape())
                    if shape != tuple(table[name].shape):
                        raise ValueError(f"{f.name}: {name} has shape {list(shape)}, the model has {list(table[name].shape)}")
                    plan.append((f, name))
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name in table:
                        table[name].copy_(sf.get_tensor(name))
        self.stats["weight_updates"] += 1
        return f"Loaded {len(plan)} tensors from {len(files)} file(s) in {model_path}."

    def receive_bucket(self, pg: Any, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
                       flattened: bool = False) -> dict[str, torch.Tensor]:
        """Receive one bucket broadcast from rank 0 into fresh host buffers; any thread may call it
        (the model is not touched, so generation goes on). ``flattened``: the bucket is one uint8
        tensor holding the tensors' bytes back to back in ``names`` order (SGLang's
        ``load_format: "flattened_bucket"``); otherwise one broadcast per tensor. Always joins the
        broadcast (even for a bad name) so the trainer's collective completes; errors after."""
        table = {k: (tuple(v.shape), v.dtype) for k, v in self.param_table().items()}
        problems = []
        for name, shape in zip(names, shapes):
            if name not in table:
                problems.append(f"{name!r} is not a parameter of this model")
            elif list(table[name][0]) != list(shape):
                problems.append(f"{name} has shape {list(shape)}, the model has {list(table[name][0])}")
        sizes = [int(torch.Size(s).numel()) * d.itemsize for d, s in zip(dtypes, shapes)]
        out: dict[str, torch.Tensor] = {}
        if flattened:
            flat = torch.empty(sum(sizes), dtype=torch.uint8)
            dist.broadcast(flat, src=0, group=pg)
            offset = 0
            for name, dtype, shape, size in zip(names, dtypes, shapes, sizes):
                part = flat[offset: offset + size]
                if offset % dtype.itemsize:  # view(dtype) needs an aligned offset
                    part = part.clone()
                out[name] = part.view(dtype).reshape(shape)
                offset += size
        else:
            works = []
            for name, dtype, shape in zip(names, dtypes, shapes):
                out[name] = self._host_buffer(shape, dtype)
                works.append(dist.broadcast(out[name], src=0, group=pg, async_op=True))
            for w in works:
                w.wait()
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def _host_buffer(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to receive a weight into: a spare one of this shape and dtype, or a new one."""
        with self._staged_lock:
            spare = self._spare.get((tuple(shape), dtype))
            if spare:
                return spare.pop()
        t = torch.empty(shape, dtype=dtype)
        with self._staged_lock:
            self._own_buffers.add(t.data_ptr())
        return t

    def _recycle(self, t: torch.Tensor) -> None:
        """Keep ``t`` for a later receive if this engine allocated it (and nothing else holds it)."""
        if t.device.type == "cpu" and t.data_ptr() in self._own_buffers:
            with self._staged_lock:
                self._spare.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def _drop_spare_buffers(self) -> None:
        with self._staged_lock:
            self._spare.clear()
            self._own_buffers.clear()

    def stage(self, group: str, tensors: dict[str, torch.Tensor]) -> int:
        """Keep a received bucket until the update commits; returns the tensors staged so far."""
        with self._staged_lock:
            self._staged.setdefault(group, {}).update(tensors)
            return sum(len(t) for t in self._staged.values())

    def discard_staged(self, group: str | None = None) -> int:
        """Drop the staged tensors of ``group`` (all groups: None); returns how many."""
        with self._staged_lock:
            dropped = [self._staged.pop(group, {})] if group is not None else list(self._staged.values())
            if group is None:
                self._staged.clear()
        for tensors in dropped:
            for t in tensors.values():
                self._recycle(t)
        return sum(len(d) for d in dropped)

    def staged_count(self) -> int:
        with self._staged_lock:
            return sum(len(t) for t in self._staged.values())

    def apply_staged(self, last: dict[str, torch.Tensor] | None = None) -> int:
        """Engine thread: write every staged tensor (of all groups) and ``last`` into the model at
        once, so generation never sees part of an update. Returns how many were written."""
        with self._staged_lock:
            pending: dict[str, torch.Tensor] = {}
            for group in self._staged.values():
                pending.update(group)
            self._staged.clear()
        pending.update(last or {})
        params = self.model.state_dict(keep_vars=True)
        views: dict[str, torch.Tensor] | None = None
        for name, t in pending.items():
            p = params.get(name)
            if p is None:  # an MoE expert: a view into transformers' fused expert tensor
                if views is None:
                    views = expert_views({k: v.data for k, v in params.items()})
                if name not in views:
                    raise KeyError(f"the model has no parameter {name!r}")
                views[name].copy_(t)
                continue
            # A received tensor with storage of its own becomes the parameter (no copy); views
            # into a flat bucket are copied (a parameter must own its storage: offload saves it).
            whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
            if (isinstance(p, torch.nn.Parameter) and whole and t.is_contiguous() and t.dtype == p.dtype
                    and t.device == p.device):
                replaced, p.data = p.data, t
                self._recycle(replaced)
            else:
                p.data.copy_(t)
                self._recycle(t)
        if pending:
            self.stats["weight_updates"] += 1
        return len(pending)

    def release_weights(self) -> str:
        if self._released:
            return "Weights already released."
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        path = self.offload_dir / f"rollout-offload-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        save_model(self.model, str(path))
        self._drop_spare_buffers()
        self._param_shapes = {}
        for name, p in self.model.named_parameters():  # unique Parameters; ties share one object
            self._param_shapes[name] = (p.shape, p.dtype)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed weights back to the colocated trainer
        self._offload_path = path
        with self._cond:
            self._released = True
        return f"Weights offloaded to {path}."

    def resume_weights(self) -> str:
        if not self._released:
            return "Weights were not released."
        params = dict(self.model.named_parameters())
        for name, (shape, dtype) in self._param_shapes.items():
            params[name].data = torch.empty(shape, dtype=dtype, device=self.device)
        assert self._offload_path is not None
        load_model(self.model, str(self._offload_path))
        self._offload_path.unlink(missing_ok=True)
        self._offload_path = None
        with self._cond:
            self._released = False
            self._cond.notify_all()
        return "Weights restored."

