"""CPU rollout server speaking SGLang's native HTTP API, with HF transformers doing the generation.

    python -m sfpo_megatron.rollout.server --model-path HF_DIR [--host 127.0.0.1] [--port 30000]
        [--api-key K] [--max-batch-size 64] [--max-request-bytes 16777216] [--dtype float32]

Same routes and JSON shapes as SGLang, so the trainer's client (and SGLang's own clients and router)
work against either. Semantics that differ from a GPU SGLang server, all deliberate:

* Generation: one engine thread owns the model and runs continuous batches of up to
  ``--max-batch-size`` sequences (all prompts x ``n`` samples). Rows are left-padded, position ids
  come from the attention mask, decoding uses HF's KV cache; finished rows leave the batch and
  waiting requests are prefilled and merged into it between decode steps.
* Logprobs (``return_logprob``): ``meta_info.output_token_logprobs`` is ``[(logprob, token_id, None),
  ...]`` for the sampled tokens. Like SGLang's default, the logprob is taken from
  ``log_softmax(penalised_logits / temperature)`` *before* top-k/top-p/min-p filtering; greedy
  (temperature 0) uses temperature 1, i.e. the raw model distribution. ``--return-original-logprob``
  (or env ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, as in SGLang) reports ``log_softmax(logits)`` instead.
  Prompt logprobs (``logprob_start_len >= 0``) always use the raw distribution.
* Seeds: ``sampling_params.sampling_seed`` (SGLang's name) or ``seed``: sample k of a request with
  seed s draws from its own generator seeded with ``s + k``, so results do not depend on which other
  requests share the batch (up to float rounding of batched matmuls).
* ``weight_version`` is in every response's meta_info: the version of the weights when the sequence
  finished. A weight update stops new admissions and waits for the running batch to drain, so a
  sequence sees one version, unless the server was paused with mode ``in_place``/``retract`` (then
  updates land between decode steps, as in SGLang).
* ``/pause_generation``: mode ``abort`` (SGLang's default) finishes waiting and running requests
  with ``finish_reason {"type": "abort"}`` and pauses; ``in_place`` and ``retract`` freeze the running
  batch (its KV cache kept) until ``/continue_generation``.
* ``/release_memory_occupation``: tag ``weights`` writes the weights to a safetensors file under
  ``--offload-dir`` and frees them; ``/resume_memory_occupation`` reads them back (content kept, unlike
  SGLang without a CPU backup). ``kv_cache`` (and ``cuda_graph``) are no-ops: the KV cache lives only
  inside a batch. ``/generate`` answers 503 while the weights are released.
* ``/update_weights_from_tensor`` needs CUDA IPC between colocated GPU processes: 501 here. Its
  payload is pickled handles, which this server never unpickles.
* ``/flush_cache`` succeeds and does nothing: there is no prefix cache between batches.
* Streaming (``stream: true``) sends each sequence's whole result as one server-sent event.
* Fields of SGLang's ``GenerateReqInput`` that this server does not implement are accepted and logged
  once each; sampling params that would change the output in ways it cannot honour (grammars,
  ``stop_regex``) get a 400.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hmac
import json
import logging
import math
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
from fastapi import Request  # module level: FastAPI resolves the string annotations against globals

logger = logging.getLogger("sfpo_megatron.rollout.server")

FLOAT32_MIN = float(torch.finfo(torch.float32).min)  # SGLang clamps -inf logprobs to this
GREEDY_EPS = 1e-6  # SGLang: temperature below this means greedy

# ============================================================================================
# Request parsing: JSON -> validated specs. Every error names the field and the bad value.
# ============================================================================================


class RequestError(ValueError):
    """A malformed request; answered with 400 and this message."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# SGLang's GenerateReqInput fields (union over recent releases) and their defaults. Anything set to
# a non-default value that this server does not implement is logged once and otherwise ignored.
SGLANG_GENERATE_FIELDS: dict[str, Any] = {
    "rid": None, "session_id": None, "text": None, "input_ids": None, "input_embeds": None,
    "image_data": None, "video_data": None, "audio_data": None, "mm_hashes": None,
    "mm_content_hashes": None, "use_audio_in_video": False, "video_config": None,
    "sampling_params": None, "return_logprob": None, "logprob_start_len": None,
    "top_logprobs_num": None, "token_ids_logprob": None, "return_sampling_mask": None,
    "return_text_in_logprobs": False, "return_flat_raw_top_logprobs": False,
    "return_flat_raw_top_logprobs_b64": False, "stream": False, "log_metrics": True,
    "return_hidden_states": False, "return_routed_experts": False, "routed_experts_start_len": 0,
    "return_indexer_topk": False, "modalities": None, "session_params": None, "lora_path": None,
    "lora_id": None, "custom_logit_processor": None, "positional_embed_overrides": None,
    "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None,
    "bootstrap_pair_key": None, "decode_tp_size": None, "routed_dp_rank": None,
    "data_parallel_rank": None, "disagg_prefill_dp_rank": None, "kv_router_hint": None,
    "routing_key": None, "conversation_id": None, "http_worker_ipc": None, "background": False,
    "require_reasoning": False, "max_thinking_tokens": None, "priority": None, "extra_key": None,
    "no_logs": False, "custom_labels": None, "return_bytes": False, "return_entropy": False,
    "return_prompt_token_ids": False, "external_trace_header": None, "received_time": None,
    "need_wait_for_mm_inputs": None, "num_items_assigned": None, "encoder_urls": None,
    "max_dynamic_patch": None, "min_dynamic_patch": None, "image_max_dynamic_patch": None,
    "video_max_dynamic_patch": None, "images_config": None, "multi_item_delimiter_indices": None,
    "cache_salt": None,
}
IMPLEMENTED_FIELDS = {
    "rid", "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "stream", "log_metrics",
}

# SGLang's SamplingParams keys. "seed" is this server's alias of "sampling_seed".
SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
    "logit_bias", "sampling_seed", "seed", "dtype",
}
REJECTED_SAMPLING_KEYS = {"json_schema", "regex", "ebnf", "structural_tag", "stop_regex"}
IGNORED_SAMPLING_KEYS = {"spaces_between_special_tokens", "custom_params", "stream_interval", "dtype"}

_logged_once: set[str] = set()
_logged_lock = threading.Lock()


def log_once(key: str, message: str) -> None:
    with _logged_lock:
        if key in _logged_once:
            return
        _logged_once.add(key)
    logger.warning(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(v: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v):
        raise RequestError(name, f"expected an integer, got {v!r}")
    if lo is not None and v < lo:
        raise RequestError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise RequestError(name, f"must be <= {hi}, got {v}")
    return v


def _float(v: Any, name: str) -> float:
    if not _is_number(v):
        raise RequestError(name, f"expected a finite number, got {v!r}")
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise RequestError(name, f"expected true or false, got {v!r}")
    return v


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise RequestError(name, f"expected a string, got {v!r}")
    return v


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()
    stop_strs: tuple[str, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


def parse_sampling_params(d: Any, name: str, vocab_size: int) -> SamplingConfig:
    """SGLang's SamplingParams.verify() ranges; None means "default", as in SGLang."""
    if d is None:
        return SamplingConfig()
    if not isinstance(d, dict):
        raise RequestError(name, f"expected an object, got {d!r}")
    unknown = sorted(set(d) - SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"{name}.{unknown[0]}", f"unknown sampling parameter (known: {sorted(SAMPLING_KEYS)})")
    for key in REJECTED_SAMPLING_KEYS:
        if d.get(key) not in (None, [], ""):
            raise RequestError(f"{name}.{key}", "constrained decoding is not supported by the CPU rollout server")
    for key in IGNORED_SAMPLING_KEYS:
        if d.get(key) is not None:
            log_once(f"sampling.{key}", f"sampling_params.{key} is accepted but has no effect on the CPU rollout server")
    kw: dict[str, Any] = {}

    def get(key: str) -> Any:
        return d.get(key)

    if get("max_new_tokens") is not None:
        kw["max_new_tokens"] = _int(get("max_new_tokens"), f"{name}.max_new_tokens", lo=0)
    if get("temperature") is not None:
        t = _float(get("temperature"), f"{name}.temperature")
        if t < 0:
            raise RequestError(f"{name}.temperature", f"must be a non-negative finite number, got {t}")
        kw["temperature"] = t
    if get("top_p") is not None:
        p = _float(get("top_p"), f"{name}.top_p")
        if not 0.0 < p <= 1.0:
            raise RequestError(f"{name}.top_p", f"must be in (0, 1], got {p}")
        kw["top_p"] = p
    if get("top_k") is not None:
        k = _int(get("top_k"), f"{name}.top_k")
        if k != -1 and k < 1:
            raise RequestError(f"{name}.top_k", f"must be -1 (disable) or at least 1, got {k}")
        kw["top_k"] = -1 if k >= vocab_size else k
    if get("min_p") is not None:
        mp = _float(get("min_p"), f"{name}.min_p")
        if not 0.0 <= mp <= 1.0:
            raise RequestError(f"{name}.min_p", f"must be in [0, 1], got {mp}")
        kw["min_p"] = mp
    for key in ("frequency_penalty", "presence_penalty"):
        if get(key) is not None:
            v = _float(get(key), f"{name}.{key}")
            if not -2.0 <= v <= 2.0:
                raise RequestError(f"{name}.{key}", f"must be in [-2, 2], got {v}")
            kw[key] = v
    if get("repetition_penalty") is not None:
        v = _float(get("repetition_penalty"), f"{name}.repetition_penalty")
        if not 0.0 < v <= 2.0:
            raise RequestError(f"{name}.repetition_penalty", f"must be in (0, 2], got {v}")
        kw["repetition_penalty"] = v
    if get("min_new_tokens") is not None:
        kw["min_new_tokens"] = _int(get("min_new_tokens"), f"{name}.min_new_tokens", lo=0)
        if kw["min_new_tokens"] > kw.get("max_new_tokens", SamplingConfig.max_new_tokens):
            raise RequestError(f"{name}.min_new_tokens", f"must be <= max_new_tokens, got {kw['min_new_tokens']}")
    if get("n") is not None:
        kw["n"] = _int(get("n"), f"{name}.n", lo=1, hi=1024)
    for key in ("ignore_eos", "no_stop_trim", "skip_special_tokens"):
        if get(key) is not None:
            kw[key] = _bool(get(key), f"{name}.{key}")
    stop_ids = get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise RequestError(f"{name}.stop_token_ids", f"expected a list of token ids, got {stop_ids!r}")
        kw["stop_token_ids"] = frozenset(
            _int(t, f"{name}.stop_token_ids[{i}]", lo=0, hi=vocab_size - 1) for i, t in enumerate(stop_ids)
        )
    stop = get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list):
            raise RequestError(f"{name}.stop", f"expected a string or a list of strings, got {stop!r}")
        kw["stop_strs"] = tuple(_str(s, f"{name}.stop[{i}]") for i, s in enumerate(stops) if s != "")
    bias = get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError(f"{name}.logit_bias", f"expected an object of token id -> bias, got {bias!r}")
        items = []
        for k, v in bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise RequestError(f"{name}.logit_bias", f"key {k!r} is not a token id") from None
            if not 0 <= tid < vocab_size:
                raise RequestError(f"{name}.logit_bias", f"token id {tid} is outside [0, {vocab_size - 1}]")
            items.append((tid, _float(v, f"{name}.logit_bias[{k}]")))
        kw["logit_bias"] = tuple(items)
    seed = get("sampling_seed") if get("sampling_seed") is not None else get("seed")
    if seed is not None:
        kw["seed"] = _int(seed, f"{name}.sampling_seed", lo=0, hi=2**62)
    return SamplingConfig(**kw)


@dataclass
class SeqSpec:
    """One sequence to generate (a prompt x one of its n samples)."""

    rid: str
    prompt_ids: list[int]
    params: SamplingConfig
    sample_index: int
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    token_ids_logprob: list[int] | None


@dataclass
class GenerateRequest:
    seqs: list[SeqSpec]
    is_single: bool
    stream: bool
    return_text_in_logprobs: bool


def _per_item(value: Any, name: str, batch: int, n: int, check: Callable[[Any, str], Any], default: Any) -> list[Any]:
    """SGLang's normalisation: a scalar applies to every prompt; a list gives one value per prompt."""
    if value is None:
        return [default] * batch
    if isinstance(value, list):
        if n > 1:
            raise RequestError(name, f"a per-prompt list cannot be combined with n={n} > 1 (SGLang forbids it too)")
        if len(value) != batch:
            raise RequestError(name, f"has {len(value)} entries for {batch} prompts")
        return [default if v is None else check(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [check(value, name)] * batch


def parse_generate_request(
    body: Any, vocab_size: int, context_length: int, tokenizer: Any | None
) -> GenerateRequest:
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in IMPLEMENTED_FIELDS:
            continue
        if key not in SGLANG_GENERATE_FIELDS:
            log_once(f"field.{key}", f"/generate field {key!r} is not part of SGLang's GenerateReqInput; ignored")
        elif value is not None and value != SGLANG_GENERATE_FIELDS[key] and key != "input_embeds":
            log_once(f"field.{key}", f"/generate field {key!r} is not implemented by the CPU rollout server; ignored")
    if body.get("input_embeds") is not None and body.get("input_ids") is None and body.get("text") is None:
        raise RequestError("input_embeds", "not supported by the CPU rollout server; send input_ids or text")

    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise RequestError("input_ids", "give exactly one of text or input_ids")
    if text is not None:
        if tokenizer is None:
            raise RequestError("text", "this server has no tokenizer (none in --model-path, or --skip-tokenizer-init); send input_ids")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts:
            raise RequestError("text", f"expected a string or a non-empty list of strings, got {text!r}")
        prompts = [tokenizer.encode(_str(t, f"text[{i}]")) for i, t in enumerate(texts)]
        is_single = isinstance(text, str)
        field_name = "text"
    else:
        if not isinstance(input_ids, list) or not input_ids:
            raise RequestError("input_ids", f"expected a non-empty list of token ids or of lists, got {input_ids!r}")
        is_single = not isinstance(input_ids[0], list)
        rows = [input_ids] if is_single else input_ids
        prompts = []
        for i, row in enumerate(rows):
            where = "input_ids" if is_single else f"input_ids[{i}]"
            if not isinstance(row, list) or not row:
                raise RequestError(where, f"expected a non-empty list of token ids, got {row!r}")
            for j, tok in enumerate(row):
                if not _is_int(tok) or not 0 <= tok < vocab_size:
                    raise RequestError(f"{where}[{j}]", f"token id must be an integer in [0, {vocab_size - 1}], got {tok!r}")
            prompts.append(row)
        field_name = "input_ids"
    batch = len(prompts)

    sp = body.get("sampling_params")
    if isinstance(sp, list):
        if len(sp) != batch:
            raise RequestError("sampling_params", f"has {len(sp)} entries for {batch} prompts")
        params = [parse_sampling_params(p, f"sampling_params[{i}]", vocab_size) for i, p in enumerate(sp)]
        if len({p.n for p in params}) > 1:
            raise RequestError("sampling_params", "n must be the same for every prompt of a request")
    else:
        params = [parse_sampling_params(sp, "sampling_params", vocab_size)] * batch
    n = params[0].n
    if n > 1:
        is_single = False  # SGLang answers a list when n > 1

    return_logprob = _per_item(body.get("return_logprob"), "return_logprob", batch, n, _bool, False)
    start_lens = _per_item(body.get("logprob_start_len"), "logprob_start_len", batch, n, lambda v, f: _int(v, f, lo=-1), -1)
    top_nums = _per_item(body.get("top_logprobs_num"), "top_logprobs_num", batch, n, lambda v, f: _int(v, f, lo=0, hi=vocab_size), 0)
    tid = body.get("token_ids_logprob")
    if tid is None or tid == []:
        token_ids = [None] * batch
    elif isinstance(tid, list) and all(_is_int(t) for t in tid):
        token_ids = [[_int(t, f"token_ids_logprob[{j}]", lo=0, hi=vocab_size - 1) for j, t in enumerate(tid)]] * batch
    elif isinstance(tid, list) and len(tid) == batch and all(isinstance(r, list) for r in tid):
        token_ids = [[_int(t, f"token_ids_logprob[{i}][{j}]", lo=0, hi=vocab_size - 1) for j, t in enumerate(r)] for i, r in enumerate(tid)]
    else:
        raise RequestError("token_ids_logprob", f"expected a list of token ids or one list per prompt, got {tid!r}")

    rid = body.get("rid")
    if rid is None:
        base = uuid.uuid4().hex
        rids = [base] if is_single else [f"{base}_{k}" for k in range(batch * n)]
    elif isinstance(rid, str):
        rids = [rid] if is_single else [f"{rid}_{k}" for k in range(batch * n)]
    elif isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid):
        if len(set(rid)) != len(rid):
            raise RequestError("rid", f"duplicate request ids {rid}")
        rids = [r if n == 1 else f"{r}_{j}" for r in rid for j in range(n)]
    else:
        raise RequestError("rid", f"expected a string or one string per prompt, got {rid!r}")

    stream = _bool(body.get("stream", False), "stream")
    text_in_lp = _bool(body.get("return_text_in_logprobs", False), "return_text_in_logprobs")
    seqs: list[SeqSpec] = []
    for i, prompt in enumerate(prompts):
        p = params[i]
        where = field_name if is_single or batch == 1 else f"{field_name}[{i}]"
        if len(prompt) >= context_length:
            raise RequestError(where, f"prompt has {len(prompt)} tokens; the model's context length is {context_length}")
        if len(prompt) + p.max_new_tokens > context_length:
            raise RequestError(
                "sampling_params.max_new_tokens",
                f"{len(prompt)} prompt tokens + max_new_tokens {p.max_new_tokens} exceed the context length {context_length}",
            )
        if p.stop_strs and tokenizer is None:
            raise RequestError("sampling_params.stop", "stop strings need a tokenizer; this server has none, use stop_token_ids")
        if start_lens[i] >= len(prompt):
            raise RequestError("logprob_start_len", f"{start_lens[i]} is not below the prompt length {len(prompt)}")
        for j in range(n):
            seqs.append(
                SeqSpec(
                    rid=rids[i * n + j], prompt_ids=list(prompt), params=p, sample_index=j,
                    return_logprob=return_logprob[i], logprob_start_len=start_lens[i],
                    top_logprobs_num=top_nums[i], token_ids_logprob=token_ids[i],
                )
            )
    return GenerateRequest(seqs, is_single, stream, text_in_lp)


# ============================================================================================
# Generation engine: one thread owns the model; batches, sampling, weight updates.
# ============================================================================================


class EngineError(RuntimeError):
    pass


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
        weight_version: str = "default",
        return_original_logprob: bool = False,
        tokenizer: Any | None = None,
        offload_dir: str | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch_size = max_batch_size
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
        self.stats = {"requests": 0, "sequences": 0, "generated_tokens": 0, "batches": 0, "weight_updates": 0}
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

    def submit(self, specs: list[SeqSpec]) -> list[Sequence]:
        seqs = []
        for spec in specs:
            g = torch.Generator()
            base = spec.params.seed if spec.params.seed is not None else self._seed_rng.getrandbits(62)
            g.manual_seed(base + spec.sample_index)
            seqs.append(Sequence(spec, g))
        with self._cond:
            if self._stop:
                raise EngineError("the engine is shutting down")
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
                commands = list(self._commands)
                self._commands.clear()
                batch: list[Sequence] = []
                if not commands:
                    while self._waiting and len(batch) < self.max_batch_size:
                        batch.append(self._waiting.popleft())
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
            new = []
            while self._waiting and len(batch.seqs) + len(new) < self.max_batch_size:
                new.append(self._waiting.popleft())
            if not new:
                return
            self._running = self._running + new
        fresh = self._prefill(new)
        if fresh.seqs:
            self._merge(batch, fresh)

    @staticmethod
    def _mergeable(cache: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

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
        from transformers import DynamicCache

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
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
            use_cache=True, logits_to_keep=0 if full else 1,
        )
        logits = out.logits.float()
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
        out = self.model(
            input_ids=last[:, None], attention_mask=batch.mask, position_ids=batch.next_pos[:, None],
            past_key_values=batch.cache, use_cache=True,
        )
        batch.logits = out.logits[:, -1].float()
        batch.next_pos = batch.next_pos + 1

    def _sample_step(self, batch: _Batch) -> None:
        logits = batch.logits
        if torch.isnan(logits).any():
            raise EngineError("the model produced NaN logits (corrupted weights?)")
        seqs = batch.seqs
        adjusted = self._adjust_logits(logits, batch)
        temps = torch.tensor([1.0 if s.spec.params.greedy else s.spec.params.temperature for s in seqs])
        scaled = adjusted / temps[:, None]
        logp = torch.log_softmax(scaled, dim=-1)
        report = torch.log_softmax(logits, dim=-1) if self.return_original_logprob else logp
        report = report.clamp(min=FLOAT32_MIN)
        tokens = adjusted.argmax(dim=-1)
        for r, s in enumerate(seqs):
            p = s.spec.params
            if p.greedy:
                continue
            row = scaled[r:r + 1]
            row = self._filter(row, p)
            probs = torch.softmax(row, dim=-1)[0]
            tokens[r] = torch.multinomial(probs, 1, generator=s.generator)[0]
        token_list = tokens.tolist()
        lps = report.gather(1, tokens[:, None])[:, 0].tolist()
        for r, s in enumerate(seqs):
            tok = token_list[r]
            s.output_ids.append(tok)
            if s.spec.return_logprob:
                s.output_logprobs.append(lps[r])
                if s.spec.top_logprobs_num:
                    v, i = torch.topk(report[r], s.spec.top_logprobs_num)
                    s.output_top.append((v.tolist(), i.tolist()))
                if s.spec.token_ids_logprob:
                    s.output_ids_lp.append(report[r, s.spec.token_ids_logprob].tolist())
            if batch.counts is not None:
                batch.counts[r, tok] += 1
        self.stats["generated_tokens"] += len(seqs)

    def _adjust_logits(self, logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Penalties, logit bias and min_new_tokens, applied before temperature (as in SGLang)."""
        out = None
        for r, s in enumerate(batch.seqs):
            p = s.spec.params
            needs_stop_mask = p.min_new_tokens > len(s.output_ids)
            if not (p.penalised or p.logit_bias or needs_stop_mask):
                continue
            if out is None:
                out = logits.clone()
            row = out[r]
            if p.penalised and batch.counts is not None:
                c = batch.counts[r]
                seen = c > 0
                row -= p.frequency_penalty * c + p.presence_penalty * seen.float()
                if p.repetition_penalty != 1.0:
                    row[:] = torch.where(seen & (row < 0), row * p.repetition_penalty, row)
                    row[:] = torch.where(seen & (row >= 0), row / p.repetition_penalty, row)
            for tid, b in p.logit_bias:
                row[tid] += b
            if needs_stop_mask:
                stops = (set() if p.ignore_eos else self.eos_token_ids) | p.stop_token_ids
                if stops:
                    row[list(stops)] = float("-inf")
        return logits if out is None else out

    @staticmethod
    def _filter(row: torch.Tensor, p: SamplingConfig) -> torch.Tensor:
        from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

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
        batch.cache.batch_select_indices(idx)
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
        """HF name -> tensor, tied aliases included (``lm_head.weight`` of a tied model)."""
        return {k: v.data for k, v in self.model.state_dict(keep_vars=True).items()}

    def load_from_disk(self, model_path: str) -> str:
        from safetensors import safe_open

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
            with safe_open(str(f), framework="pt") as sf:
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

    def receive_from_group(self, pg: Any, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]]) -> str:
        """Receive one bucket broadcast from rank 0, in order. Always joins every broadcast (even for a
        bad name) so the trainer's collective completes; errors are reported after."""
        import torch.distributed as dist

        table = self.param_table()
        problems = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            target = table.get(name)
            if target is None:
                problems.append(f"{name!r} is not a parameter of this model")
            elif list(target.shape) != list(shape):
                problems.append(f"{name} has shape {list(shape)}, the model has {list(target.shape)}")
        works, staged = [], []
        for name, dtype, shape in zip(names, dtypes, shapes):
            target = table.get(name)
            direct = not problems and target is not None and target.dtype == dtype and target.is_contiguous()
            # Same dtype: receive straight into the parameter (no extra copy).
            buf = target if direct else torch.empty(shape, dtype=dtype)
            works.append(dist.broadcast(buf, src=0, group=pg, async_op=True))
            staged.append((name, buf, direct))
        for w in works:
            w.wait()
        if problems:
            raise ValueError("; ".join(problems))
        for name, buf, direct in staged:
            if not direct:
                table[name].copy_(buf)
        self.stats["weight_updates"] += 1
        return f"Received {len(names)} tensors."

    def release_weights(self) -> str:
        from safetensors.torch import save_model

        if self._released:
            return "Weights already released."
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        path = self.offload_dir / f"rollout-offload-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        save_model(self.model, str(path))
        self._param_shapes = {}
        for name, p in self.model.named_parameters():  # unique Parameters; ties share one object
            self._param_shapes[name] = (p.shape, p.dtype)
            p.data = torch.empty(0, dtype=p.dtype)
        self._offload_path = path
        with self._cond:
            self._released = True
        return f"Weights offloaded to {path}."

    def resume_weights(self) -> str:
        from safetensors.torch import load_model

        if not self._released:
            return "Weights were not released."
        params = dict(self.model.named_parameters())
        for name, (shape, dtype) in self._param_shapes.items():
            params[name].data = torch.empty(shape, dtype=dtype)
        assert self._offload_path is not None
        load_model(self.model, str(self._offload_path))
        self._offload_path.unlink(missing_ok=True)
        self._offload_path = None
        with self._cond:
            self._released = False
            self._cond.notify_all()
        return "Weights restored."


# ============================================================================================
# HTTP layer
# ============================================================================================


@dataclass
class ServerConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_batch_size: int = 64
    max_request_bytes: int = 16 * 1024**2
    dtype: str = "float32"
    weight_version: str = "default"
    context_length: int | None = None
    skip_tokenizer_init: bool = False
    return_original_logprob: bool = False
    offload_dir: str | None = None
    random_seed: int = 0
    num_threads: int | None = None
    health_generate_timeout: float = 20.0
    weight_update_timeout: float = 600.0
    log_level: str = "info"


class _WeightGroups:
    """Weight-update process groups by name (created off the engine thread: rendezvous blocks)."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.lock = threading.Lock()


async def read_json(request: Any, max_bytes: int, allow_empty: bool = False) -> Any:
    """Read and parse a JSON body within ``max_bytes``; plain json only, never pickle."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise RequestError("Content-Length", f"not an integer: {length!r}") from None
        if declared > max_bytes:
            raise RequestError("body", f"request body is {declared} bytes, over this server's --max-request-bytes limit of {max_bytes}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise RequestError("body", f"request body exceeds this server's --max-request-bytes limit of {max_bytes}")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestError("body", "empty; expected a JSON object")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("body", f"malformed JSON: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_model(cfg: ServerConfig) -> tuple[torch.nn.Module, Any | None, set[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtypes = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16, "half": torch.float16, "auto": "auto"}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {cfg.dtype!r}")
    hf_config = AutoConfig.from_pretrained(cfg.model_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtypes[cfg.dtype])
    model.eval().requires_grad_(False)
    tokenizer = None
    # transformers 5 builds an empty tokenizer for a directory without tokenizer files; only load real ones.
    has_tokenizer = any((Path(cfg.model_path) / f).exists() for f in TOKENIZER_FILES)
    if not cfg.skip_tokenizer_init and has_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        except (OSError, ValueError, TypeError) as e:
            logger.info("no tokenizer in %s (%s): input_ids only, responses carry output_ids only", cfg.model_path, type(e).__name__)
    eos: set[int] = set()
    sources: list[Any] = [hf_config.eos_token_id]
    try:
        sources.append(GenerationConfig.from_pretrained(cfg.model_path).eos_token_id)
    except OSError:
        pass
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, (list, tuple)):
            eos.update(int(x) for x in src)
    return model, tokenizer, eos


def _error(status: int, message: str, param: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    names = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 501: "NotImplemented", 503: "ServiceUnavailable"}
    return JSONResponse(
        {"object": "error", "message": message, "type": names.get(status, "Error"), "param": param, "code": status},
        status_code=status,
    )


def build_app(cfg: ServerConfig, engine: GenerationEngine, context_length: int) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    from sfpo_megatron.rollout import transport

    app = FastAPI(title="sfpo-megatron CPU rollout server")
    groups = _WeightGroups()
    started = time.time()

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> Any:
        return _error(400, str(exc), exc.field)

    if cfg.api_key:
        expected = f"Bearer {cfg.api_key}"

        @app.middleware("http")
        async def _auth(request: Request, call_next: Callable) -> Any:
            # Like SGLang: health probes stay open; everything else needs the bearer token.
            if request.method == "OPTIONS" or request.url.path.startswith("/health"):
                return await call_next(request)
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), expected.encode()):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    async def body_of(request: Request, allow_empty: bool = True) -> Any:
        body = await read_json(request, cfg.max_request_bytes, allow_empty=allow_empty)
        if not isinstance(body, dict):
            raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
        return body

    async def on_engine(fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(engine.call(fn))

    def opt(body: dict, key: str, check: Callable[[Any, str], Any], default: Any) -> Any:
        v = body.get(key)
        return default if v is None else check(v, key)

    # ---- health and info ------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Any:
        return Response(status_code=200 if engine.alive else 503)

    @app.get("/health_generate")
    async def health_generate() -> Any:
        if not engine.alive:
            return Response(status_code=503)
        if engine.paused or engine.released:
            return Response(status_code=200)  # alive, deliberately idle
        spec = SeqSpec("HEALTH_CHECK_" + uuid.uuid4().hex, [0], SamplingConfig(max_new_tokens=1, temperature=0.0),
                       0, False, -1, 0, None)
        (seq,) = engine.submit([spec])
        try:
            await asyncio.wait_for(asyncio.wrap_future(seq.future), cfg.health_generate_timeout)
        except (asyncio.TimeoutError, EngineError):
            engine.abort({spec.rid})
            return Response(status_code=503)
        return Response(status_code=200)

    def model_info() -> Any:
        hf = engine.model.config
        return {
            "model_path": cfg.model_path,
            "tokenizer_path": None if engine.tokenizer is None else cfg.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "model_type": getattr(hf, "model_type", None),
            "architectures": getattr(hf, "architectures", None),
        }

    app.get("/get_model_info")(model_info)
    app.get("/model_info")(model_info)

    def server_info() -> Any:
        info = {k: v for k, v in vars(cfg).items() if k != "api_key"}
        info.update({
            "backend": "sfpo-megatron-cpu", "version": "sfpo-megatron-cpu-0.1", "context_length": context_length,
            "weight_version": engine.weight_version, "uptime_s": time.time() - started,
            "internal_states": [{**engine.stats, **engine.load(), "paused": engine.paused,
                                 "pause_mode": engine.pause_mode, "released": engine.released}],
        })
        return info

    app.get("/get_server_info")(server_info)
    app.get("/server_info")(server_info)

    @app.get("/get_load")
    async def get_load() -> Any:
        return [{"dp_rank": 0, **engine.load()}]

    @app.get("/get_weight_version")
    async def get_weight_version() -> Any:
        return {"weight_version": engine.weight_version}

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        version = _str(body.get("new_version"), "new_version")
        if opt(body, "abort_all_requests", _bool, True):
            engine.abort(message="Aborted by /update_weight_version")

        def apply() -> None:
            engine.weight_version = version

        await on_engine(apply)
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        name = _str(body.get("name"), "name")
        truncate = opt(body, "truncate_size", lambda v, f: _int(v, f, lo=1), 100)

        def read() -> Any:
            table = engine.param_table()
            if name not in table:
                raise RequestError("name", f"{name!r} is not a parameter of this model")
            return table[name].flatten()[:truncate].float().tolist()

        return await on_engine(read)

    # ---- generation -----------------------------------------------------------------------

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Any:
        body = await read_json(request, cfg.max_request_bytes)
        req = parse_generate_request(body, engine.vocab_size, context_length, engine.tokenizer)
        if engine.released:
            return _error(503, "the weights are released (/release_memory_occupation); call /resume_memory_occupation first")
        seqs = engine.submit(req.seqs)
        if req.stream:
            log_once("stream", "stream=true: each sequence's whole result is sent as one server-sent event")

            async def events() -> Any:
                for k, s in enumerate(seqs):
                    result = await asyncio.wrap_future(s.future)
                    yield b"data: " + json.dumps({**result, "index": k}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        gathered = asyncio.gather(*(asyncio.wrap_future(s.future) for s in seqs))
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():  # client gave up: stop wasting compute on it
                engine.abort({s.rid for s in seqs}, message="client disconnected")
                return Response(status_code=499)
        try:
            results = gathered.result()
        except EngineError as e:
            return _error(500, str(e))
        return results[0] if req.is_single else results

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Any:
        body = await body_of(request)
        if opt(body, "abort_all", _bool, False):
            engine.abort()
        elif body.get("rid"):
            engine.abort(prefix=_str(body["rid"], "rid"))
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Any:
        return PlainTextResponse("Cache flushed.\nThe CPU rollout server keeps no prefix cache between batches.\n")

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> Any:
        body = await body_of(request)
        mode = opt(body, "mode", _str, "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError("mode", f"must be 'abort', 'retract' or 'in_place', got {mode!r}")
        n = engine.pause(mode)
        return {"message": f"Generation paused successfully (mode {mode}, {n} aborted).", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> Any:
        await body_of(request)
        engine.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    # ---- weight updates ---------------------------------------------------------------------

    def update_prelude(body: dict) -> str | None:
        version = opt(body, "weight_version", _str, None)
        if opt(body, "abort_all_requests", _bool, False):
            engine.abort(message="Aborted for a weight update")
        return version

    def set_version(version: str | None) -> str:
        if version is None:
            return ""
        engine.weight_version = version
        return f" Weight version updated to {version}."

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        model_path = _str(body.get("model_path"), "model_path")
        load_format = body.get("load_format")
        if load_format not in (None, "auto", "safetensors"):
            raise RequestError("load_format", f"the CPU rollout server loads safetensors only, got {load_format!r}")
        version = update_prelude(body)

        def update() -> str:
            msg = engine.load_from_disk(model_path)
            return msg + set_version(version)

        try:
            message = await on_engine(update)
        except (ValueError, OSError) as e:
            return JSONResponse({"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}, status_code=400)
        return {"success": True, "message": message, "num_paused_requests": 0}

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        addr = _str(body.get("master_address"), "master_address")
        port = _int(body.get("master_port"), "master_port", lo=1, hi=65535)
        world = _int(body.get("world_size"), "world_size", lo=2)
        offset = _int(body.get("rank_offset"), "rank_offset", lo=1, hi=world - 1)
        name = opt(body, "group_name", _str, transport.DEFAULT_GROUP_NAME)
        backend = opt(body, "backend", _str, "nccl")
        if backend != "gloo":
            raise RequestError("backend", f"the CPU rollout server joins weight-update groups with 'gloo' only, got {backend!r}")
        with groups.lock:
            if name in groups.groups:
                return JSONResponse({"success": False, "message": f"Process group with name {name} already exists."}, status_code=400)
            groups.groups[name] = None  # reserve the name while the rendezvous blocks
        try:
            pg = await asyncio.to_thread(transport.init_weight_update_group, addr, port, offset, world, name, backend,
                                         cfg.weight_update_timeout)
        except Exception as e:
            with groups.lock:
                groups.groups.pop(name, None)
            return JSONResponse({"success": False, "message": f"Failed to initialize custom process group: {e}."}, status_code=400)
        with groups.lock:
            groups.groups[name] = pg
        logger.info("joined weight-update group %r as rank %d of %d via %s:%d", name, offset, world, addr, port)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request) -> Any:
        body = await body_of(request)
        name = opt(body, "group_name", _str, transport.DEFAULT_GROUP_NAME)
        with groups.lock:
            pg = groups.groups.pop(name, None)
        if pg is None:
            return JSONResponse({"success": False, "message": "The group to be destroyed does not exist."}, status_code=400)
        await on_engine(lambda: transport.destroy_weight_update_group(pg))
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError("names", f"expected a list of strings, got {names!r}")
        if not isinstance(dtypes, list) or len(dtypes) != len(names):
            raise RequestError("dtypes", f"expected {len(names)} dtype strings, got {dtypes!r}")
        if not isinstance(shapes, list) or len(shapes) != len(names):
            raise RequestError("shapes", f"expected {len(names)} shapes, got {shapes!r}")
        parsed_dtypes = []
        for i, d in enumerate(dtypes):
            try:
                parsed_dtypes.append(transport.parse_dtype(d))
            except ValueError as e:
                raise RequestError(f"dtypes[{i}]", str(e)) from None
        for i, s in enumerate(shapes):
            if not isinstance(s, list) or not all(_is_int(x) and x >= 0 for x in s):
                raise RequestError(f"shapes[{i}]", f"expected a list of non-negative integers, got {s!r}")
        name = opt(body, "group_name", _str, transport.DEFAULT_GROUP_NAME)
        load_format = body.get("load_format")
        if load_format is not None:
            raise RequestError("load_format", f"the CPU rollout server receives plain tensors only, got {load_format!r}")
        with groups.lock:
            pg = groups.groups.get(name)
        if pg is None:
            raise RequestError("group_name", f"no weight-update group named {name!r}; call /init_weights_update_group first")
        version = update_prelude(body)

        def update() -> str:
            msg = engine.receive_from_group(pg, names, parsed_dtypes, shapes)
            return msg + set_version(version)

        try:
            message = await on_engine(update)
        except (ValueError, RuntimeError) as e:
            return JSONResponse({"success": False, "message": f"Failed to update parameter online: {e}"}, status_code=400)
        return {"success": True, "message": message}

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> Any:
        body = await body_of(request, allow_empty=False)
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not all(isinstance(b, str) for b in blobs):
            raise RequestError("serialized_named_tensors", f"expected a list of base64 strings, got {type(blobs).__name__}")
        # Never decoded: SGLang's payload is pickled CUDA IPC handles.
        return _error(
            501,
            "update_weights_from_tensor passes CUDA IPC handles between colocated GPU processes; the CPU rollout "
            "server cannot open them (and never unpickles request data). Use /update_weights_from_disk or "
            "/init_weights_update_group + /update_weights_from_distributed.",
        )

    # ---- memory ---------------------------------------------------------------------------

    def tags_of(body: dict) -> set[str]:
        tags = body.get("tags")
        if tags is None:
            return {"weights", "kv_cache"}
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RequestError("tags", f"expected a list of strings, got {tags!r}")
        unknown = set(tags) - {"weights", "kv_cache", "cuda_graph"}
        if unknown:
            raise RequestError("tags", f"unknown tags {sorted(unknown)}; known: weights, kv_cache, cuda_graph")
        return set(tags)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request) -> Any:
        tags = tags_of(await body_of(request))
        msg = await on_engine(engine.release_weights) if "weights" in tags else "Nothing to release."
        return {"success": True, "message": msg + " kv_cache: no persistent cache on the CPU server."}

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request) -> Any:
        tags = tags_of(await body_of(request))
        msg = await on_engine(engine.resume_weights) if "weights" in tags else "Nothing to resume."
        return {"success": True, "message": msg}

    return app


def serve(cfg: ServerConfig) -> None:
    import uvicorn

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer, eos = _load_model(cfg)
    context_length = cfg.context_length or int(getattr(model.config, "max_position_embeddings", 4096))
    engine = GenerationEngine(
        model, eos_token_ids=eos, max_batch_size=cfg.max_batch_size, weight_version=cfg.weight_version,
        return_original_logprob=cfg.return_original_logprob, tokenizer=tokenizer,
        offload_dir=cfg.offload_dir, seed=cfg.random_seed,
    )
    engine.start()
    app = build_app(cfg, engine, context_length)
    logger.info("CPU rollout server: %s on http://%s:%d (eos %s, context %d)", cfg.model_path, cfg.host, cfg.port, sorted(eos), context_length)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False)
    finally:
        engine.shutdown()


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (health probes exempt)")
    p.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024**2, help="larger request bodies get 400")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (the config's dtype)")
    p.add_argument("--weight-version", default="default", help="initial weight_version reported in responses")
    p.add_argument("--context-length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="input_ids only, no text in responses")
    p.add_argument("--return-original-logprob", action="store_true",
                   default=os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"),
                   help="report log_softmax(logits) instead of the temperature-scaled distribution")
    p.add_argument("--offload-dir", default=None, help="where /release_memory_occupation parks the weights")
    p.add_argument("--random-seed", type=int, default=0, help="seeds requests that bring no sampling_seed")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--weight-update-timeout", type=float, default=600.0,
                   help="seconds a weight-update group waits for its peers (rendezvous and each broadcast)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    for name, lo in (("port", 1), ("max_batch_size", 1), ("max_request_bytes", 1)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    return ServerConfig(**vars(a))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(cfg)


if __name__ == "__main__":
    main()
