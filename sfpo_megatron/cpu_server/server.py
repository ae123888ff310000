"""CPU rollout server speaking SGLang's native HTTP API, with HF transformers doing the generation.

    python -m sfpo_megatron.cpu_server.server --model-path HF_DIR [--host 127.0.0.1] [--port 30000]
        [--api-key K] [--max-batch-size 64] [--max-request-bytes 16777216]
        [--max-sequences-per-request 1024] [--max-queued-sequences 8192] [--dtype float32]
        [--device cpu|cuda]

Same routes and JSON shapes as SGLang, so the trainer's client (and SGLang's own clients and router)
work against either. Semantics that differ from a GPU SGLang server, all deliberate:

* Generation: one engine thread owns the model and runs continuous batches of up to
  ``--max-batch-size`` sequences (all prompts x ``n`` samples) and, with ``--max-total-tokens``, a
  budget of reserved tokens (prompt + ``max_new_tokens`` per sequence). Rows are left-padded, position
  ids come from the attention mask, decoding uses HF's KV cache; a finished row leaves the batch at
  once (its cache rows dropped, and the columns that are padding for every remaining row trimmed),
  and waiting requests are prefilled together in one forward and merged into the batch after every
  decode step. ``/get_server_info``'s ``internal_states`` report the running and waiting sequences
  and ``last_gen_throughput`` (tokens/s over the last 10 s), like SGLang's.
* ``--device cuda`` puts the model and its KV cache on the current GPU (token ids, logits and
  sampling stay on the host); weight-update groups are gloo either way.
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
* ``/update_weights_from_distributed`` receives off the engine thread (generation goes on) and
  writes nothing into the model until the update ends: a bucket with ``flush_cache: true`` (SGLang's
  default) or a ``weight_version`` applies every staged tensor with its own and flips the version;
  buckets with ``flush_cache: false`` are staged (per group, so several trainer stages can push at
  once through their own groups) until that bucket or ``/update_weight_version``, which applies the
  staged tensors before it sets the version. A refused or broken bucket voids the whole update
  (every staged tensor dropped); destroying a group drops its staged tensors. SGLang writes each
  bucket into the live model as it lands. ``load_format: "flattened_bucket"`` (SGLang's name):
  the bucket is one uint8 tensor, the tensors' bytes back to back in ``names`` order.
* ``/update_weights_from_tensor`` needs CUDA IPC between colocated GPU processes: 501 here. Its
  payload is pickled handles, which this server never unpickles.
* ``/flush_cache`` succeeds and does nothing: there is no prefix cache between batches.
* Streaming (``stream: true``) sends each sequence's whole result as one server-sent event.
* Fields of SGLang's ``GenerateReqInput`` that this server does not implement are accepted and logged
  once each; sampling params that would change the output in ways it cannot honour (grammars,
  ``stop_regex``) get a 400.
* Limits (SGLang has none of the last two): ``--max-request-bytes`` and JSON nested at most 32
  levels (else 400); ``--max-sequences-per-request`` caps prompts x ``n`` (400);
  ``--max-queued-sequences`` caps the queued + running sequences: a request that would pass it gets
  429 with ``Retry-After: 1``, which the trainer's client retries with backoff.
* Faults stay with the request that caused them: sampling params are range-checked up front (400
  naming the parameter; ``logit_bias`` values must be finite in float32), and a sequence whose
  params leave nothing to sample at sampling time (every token masked by ``min_new_tokens``, biased
  logits overflowing after ``temperature``) fails its own request with a 400 naming the parameter
  while the rest of the batch decodes as if it had never been there. Any other exception answers a
  JSON error (500) naming it; only NaN logits from the model (or an engine bug) fail the whole batch.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import Request  # module level: FastAPI resolves the string annotations against globals
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sfpo_megatron.cpu_server.engine import EngineError, GenerationEngine, QueueFullError
from sfpo_megatron.cpu_server.requests import (
    RequestError,
    SamplingConfig,
    SeqSpec,
    _bool,
    _int,
    _is_int,
    _str,
    log_once,
    parse_generate_request,
)
from sfpo_megatron.distributed.platform import gpu_available
from sfpo_megatron.distributed.weight_update_group import (
    DEFAULT_GROUP_NAME,
    destroy_weight_update_group,
    init_weight_update_group,
    parse_dtype,
)

logger = logging.getLogger("sfpo_megatron.cpu_server.server")

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
    max_total_tokens: int | None = None
    max_request_bytes: int = 16 * 1024**2
    max_sequences_per_request: int = 1024
    max_queued_sequences: int = 8192
    dtype: str = "float32"
    weight_version: str = "default"
    context_length: int | None = None
    skip_tokenizer_init: bool = False
    return_original_logprob: bool = False
    offload_dir: str | None = None
    random_seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"
    health_generate_timeout: float = 20.0
    weight_update_timeout: float = 600.0
    log_level: str = "info"


class _WeightGroups:
    """Weight-update process groups by name (created off the engine thread: rendezvous blocks)."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.lock = threading.Lock()


# SGLang's request bodies nest a few levels (lists of token-id lists, logit_bias objects); deeper
# ones are refused before any code walks them recursively (repr, validation).
MAX_JSON_DEPTH = 32


def _json_depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists / objects more than ``limit`` levels deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v
        for c in children:
            if isinstance(c, (list, dict)):
                if depth + 1 > limit:
                    return True
                stack.append((c, depth + 1))
    return False


async def read_json(request: Any, max_bytes: int, allow_empty: bool = False) -> Any:
    """Read and parse a JSON body within ``max_bytes`` and ``MAX_JSON_DEPTH``; plain json only, never pickle."""
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

    too_deep = RequestError("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("body", f"malformed JSON: {e}") from None
    except RecursionError:  # the parser's own limit (about 1000 levels)
        raise too_deep from None
    if isinstance(body, (list, dict)) and _json_depth_over(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_model(cfg: ServerConfig) -> tuple[torch.nn.Module, Any | None, set[int]]:
    dtypes = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
              "float16": torch.float16, "half": torch.float16, "auto": "auto"}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {cfg.dtype!r}")
    hf_config = AutoConfig.from_pretrained(cfg.model_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtypes[cfg.dtype])
    model.to(cfg.device).eval().requires_grad_(False)
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


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> Any:
    names = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 429: "TooManyRequests", 500: "InternalServerError",
             501: "NotImplemented", 503: "ServiceUnavailable"}
    return JSONResponse(
        {"object": "error", "message": message, "type": names.get(status, "Error"), "param": param, "code": status},
        status_code=status, headers=headers,
    )


def build_app(cfg: ServerConfig, engine: GenerationEngine, context_length: int) -> Any:
    app = FastAPI(title="sfpo-megatron CPU rollout server")
    groups = _WeightGroups()
    started = time.time()

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, exc: RequestError) -> Any:
        return _error(400, str(exc), exc.field)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError) -> Any:
        return _error(429, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Any:
        # Anything else is a server bug or an environment failure: still a JSON answer naming it
        # (Starlette re-raises it after this answer, so the log keeps the traceback).
        return _error(500, f"{request.url.path} failed: {type(exc).__name__}: {exc}")

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
        (seq,) = engine.submit([spec], limited=False)  # a probe, not load: it must not be refused
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
            "internal_states": [{**engine.stats, **engine.metrics(), "paused": engine.paused,
                                 "pause_mode": engine.pause_mode, "released": engine.released,
                                 "staged_tensors": engine.staged_count()}],
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

        def apply() -> int:
            applied = engine.apply_staged()  # the staged tensors of a multi-group update land with it
            engine.weight_version = version
            return applied

        applied = await on_engine(apply)
        staged = f"; applied {applied} staged tensors" if applied else ""
        return {"success": True, "message": f"Weight version updated to {version}{staged}", "new_version": version}

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
        req = parse_generate_request(body, engine.vocab_size, context_length, engine.tokenizer,
                                     max_sequences=cfg.max_sequences_per_request)
        if engine.released:
            return _error(503, "the weights are released (/release_memory_occupation); call /resume_memory_occupation first")
        seqs = engine.submit(req.seqs)
        rids = {s.rid for s in seqs}
        if req.stream:
            log_once("stream", "stream=true: each sequence's whole result is sent as one server-sent event")

            async def events() -> Any:
                for k, s in enumerate(seqs):
                    try:
                        result = await asyncio.wrap_future(s.future)
                    except (RequestError, EngineError) as e:  # the status is sent already: an error event
                        engine.abort(rids, message="another sequence of this request failed")
                        code = 400 if isinstance(e, RequestError) else 500
                        yield b"data: " + json.dumps({"error": {"message": str(e), "code": code}}).encode() + b"\n\n"
                        break
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
        except (RequestError, EngineError) as e:  # one sequence failed: stop its siblings
            engine.abort(rids, message="another sequence of this request failed")
            if isinstance(e, RequestError):
                raise
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
        name = opt(body, "group_name", _str, DEFAULT_GROUP_NAME)
        backend = opt(body, "backend", _str, "nccl")
        if backend != "gloo":
            raise RequestError("backend", f"the CPU rollout server joins weight-update groups with 'gloo' only, got {backend!r}")
        with groups.lock:
            if name in groups.groups:
                return JSONResponse({"success": False, "message": f"Process group with name {name} already exists."}, status_code=400)
            groups.groups[name] = None  # reserve the name while the rendezvous blocks
        try:
            pg = await asyncio.to_thread(init_weight_update_group, addr, port, offset, world, name, backend,
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
        name = opt(body, "group_name", _str, DEFAULT_GROUP_NAME)
        with groups.lock:
            pg = groups.groups.pop(name, None)
        if pg is None:
            return JSONResponse({"success": False, "message": "The group to be destroyed does not exist."}, status_code=400)
        engine.discard_staged(name)  # an update whose group goes away never commits
        await on_engine(lambda: destroy_weight_update_group(pg))
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
                parsed_dtypes.append(parse_dtype(d))
            except ValueError as e:
                raise RequestError(f"dtypes[{i}]", str(e)) from None
        for i, s in enumerate(shapes):
            if not isinstance(s, list) or not all(_is_int(x) and x >= 0 for x in s):
                raise RequestError(f"shapes[{i}]", f"expected a list of non-negative integers, got {s!r}")
        name = opt(body, "group_name", _str, DEFAULT_GROUP_NAME)
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise RequestError("load_format", "the CPU rollout server receives plain tensors or one "
                                              f"'flattened_bucket', got {load_format!r}")
        with groups.lock:
            pg = groups.groups.get(name)
        if pg is None:
            raise RequestError("group_name", f"no weight-update group named {name!r}; call /init_weights_update_group first")
        version = update_prelude(body)
        # SGLang's default flush_cache is true: such a bucket (or one carrying a weight_version)
        # ends the update. Buckets sent with flush_cache false are staged until then.
        final = version is not None or opt(body, "flush_cache", _bool, True)
        try:
            received = await asyncio.to_thread(engine.receive_bucket, pg, names, parsed_dtypes, shapes,
                                               load_format == "flattened_bucket")
        except ValueError as e:  # names or shapes: the broadcast itself completed, the group is fine
            dropped = engine.discard_staged()
            return JSONResponse({"success": False, "message": f"Failed to update parameter online: {e} "
                                 f"(the update is void: {dropped} staged tensors dropped)"}, status_code=400)
        except RuntimeError as e:
            # The collective broke (a peer died, or --weight-update-timeout passed): leave the
            # group, so the trainer can form a new one with this server at once, and void the
            # update, so nothing of it is ever applied.
            with groups.lock:
                if groups.groups.get(name) is pg:
                    del groups.groups[name]
            dropped = engine.discard_staged()
            await asyncio.to_thread(destroy_weight_update_group, pg)
            logger.warning("left weight-update group %r after a failed broadcast (%d staged tensors dropped): %s",
                           name, dropped, e)
            return JSONResponse({"success": False, "message": f"Failed to update parameter online: {e}"}, status_code=400)
        if not final:
            staged = engine.stage(name, received)
            return {"success": True, "message": f"Staged {len(received)} tensors ({staged} in all); they are "
                                                "applied by the update's final bucket or /update_weight_version."}

        def update() -> str:
            return f"Received {len(received)} tensors; applied {engine.apply_staged(received)}." + set_version(version)

        return {"success": True, "message": await on_engine(update)}

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
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer, eos = _load_model(cfg)
    context_length = cfg.context_length or int(getattr(model.config, "max_position_embeddings", 4096))
    engine = GenerationEngine(
        model, eos_token_ids=eos, max_batch_size=cfg.max_batch_size, max_total_tokens=cfg.max_total_tokens,
        max_queued_sequences=cfg.max_queued_sequences,
        weight_version=cfg.weight_version,
        return_original_logprob=cfg.return_original_logprob, tokenizer=tokenizer,
        offload_dir=cfg.offload_dir, seed=cfg.random_seed,
    )
    engine.start()
    app = build_app(cfg, engine, context_length)
    logger.info("CPU rollout server: %s on http://%s:%d (device %s, eos %s, context %d)", cfg.model_path, cfg.host,
                cfg.port, cfg.device, sorted(eos), context_length)
    try:
        # Keep idle connections longer than a trainer step (uvicorn's default is 5 s): the
        # trainer's pooled admin connection is then rarely closed under it.
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                    timeout_keep_alive=120)
    finally:
        engine.shutdown()


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (health probes exempt)")
    p.add_argument("--max-batch-size", "--max-running-requests", dest="max_batch_size", type=int, default=64,
                   help="sequences decoded together (SGLang's --max-running-requests)")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="token budget of the running batch: a waiting sequence joins only while the running "
                        "sequences' prompt + max_new_tokens, its own included, stay within it (one over the budget "
                        "on its own still runs alone). Default: no budget, only --max-batch-size")
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024**2, help="larger request bodies get 400")
    p.add_argument("--max-sequences-per-request", type=int, default=1024,
                   help="a /generate asking for more sequences (prompts x n) gets 400. Default 1024: the largest "
                        "n this server accepts, or a GRPO step of 64 prompts x 16 samples in one request (the "
                        "trainer's client sends one sequence per request); without a cap a few hundred bytes can "
                        "queue 100k sequences")
    p.add_argument("--max-queued-sequences", type=int, default=8192,
                   help="a /generate that would take the queued + running sequences over this gets 429 with "
                        "Retry-After (the trainer's client backs off and retries). Default 8192: 8 of the largest "
                        "requests, 128 full default batches, far above the trainer's 64 requests in flight "
                        "(--rollout-max-concurrency); it bounds the memory and the backlog a flood can build")
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model and its KV cache live (cuda: the current GPU); sampling stays on the host")
    p.add_argument("--weight-update-timeout", type=float, default=600.0,
                   help="seconds a weight-update group waits for its peers (rendezvous and each broadcast); "
                        "after a broken broadcast the server leaves the group (the trainer's launcher "
                        "sets it to --refit-timeout)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    for name, lo in (("port", 1), ("max_batch_size", 1), ("max_request_bytes", 1), ("max_sequences_per_request", 1),
                     ("max_total_tokens", 1)):
        if getattr(a, name) is not None and getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    if a.max_queued_sequences < a.max_sequences_per_request:
        p.error(f"--max-queued-sequences ({a.max_queued_sequences}) must be at least --max-sequences-per-request "
                f"({a.max_sequences_per_request}), or the largest allowed request could never be queued")
    if a.device == "cuda" and not gpu_available():
        p.error("--device cuda: torch.cuda.is_available() is False here (no GPU, or a CPU-only torch); use --device cpu")
    return ServerConfig(**vars(a))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(cfg)


if __name__ == "__main__":
    main()
