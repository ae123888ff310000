"""The CPU rollout server's request parsing: SGLang ``/generate`` JSON → validated specs.

Every error is a :class:`RequestError` naming the field and the bad value (the HTTP layer answers
400 with it). Semantics of the fields: see :mod:`sfpo_megatron.cpu_server.server`.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("sfpo_megatron.cpu_server.server")

FLOAT32_MIN = float(torch.finfo(torch.float32).min)  # SGLang clamps -inf logprobs to this
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # logits are float32: larger biases become inf
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
        items: dict[int, float] = {}
        for k, v in bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise RequestError(f"{name}.logit_bias", f"key {k!r} is not a token id") from None
            if not 0 <= tid < vocab_size:
                raise RequestError(f"{name}.logit_bias", f"token id {tid} is outside [0, {vocab_size - 1}]")
            if tid in items:  # "5" and "05": two biases on one token could add up to inf
                raise RequestError(f"{name}.logit_bias", f"token id {tid} appears twice")
            b = _float(v, f"{name}.logit_bias[{k}]")
            if abs(b) > FLOAT32_MAX:
                raise RequestError(f"{name}.logit_bias[{k}]",
                                   f"must be a finite float32 value (at most {FLOAT32_MAX:.4g} in magnitude), got {b!r}")
            items[tid] = b
        kw["logit_bias"] = tuple(items.items())
    if kw.get("min_new_tokens", 0) > 0 and len(kw.get("stop_token_ids", ())) == vocab_size:
        raise RequestError(f"{name}.min_new_tokens", "every token is in stop_token_ids, so none can be sampled "
                           f"before min_new_tokens={kw['min_new_tokens']}")
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
    body: Any, vocab_size: int, context_length: int, tokenizer: Any | None, max_sequences: int | None = None
) -> GenerateRequest:
    """``max_sequences``: refuse requests for more sequences (prompts x n) than this."""
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
    if max_sequences is not None and batch * n > max_sequences:
        raise RequestError(
            "sampling_params.n" if n > 1 else field_name,
            f"the request asks for {batch * n} sequences ({batch} prompts x n={n}), over this server's "
            f"--max-sequences-per-request limit of {max_sequences}",
        )

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

