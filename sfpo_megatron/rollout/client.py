"""Client for rollout servers that speak SGLang's native HTTP API (real SGLang or the CPU server).

``RolloutClient(urls).generate(prompts, sampling_params, n)`` sends every (prompt, sample) as its own
``/generate`` request with bounded concurrency, to the live server with the fewest requests in
flight (or, with ``use_router=True``, through ``sglang_router``). Failure handling:

* a connection error, a timeout or a 5xx counts as a failure of that server and the request is
  retried on the least-loaded live server after a short backoff;
* ``retries + 1`` consecutive failures take a server out of rotation with a logged error; a
  refit takes out a server that fails its weight update (``drop``). A server out of rotation
  never comes back: it would serve stale weights. ``dropped`` lists them with the reason;
* with no live server left, every pending request raises ``NoLiveServerError``; every HTTP call has
  a timeout, so nothing waits forever;
* 429 (the server's queue is full) is back-pressure, not a failure: the request is retried after
  a growing, jittered backoff (at most ``MAX_BUSY_BACKOFF_S``) on the least-loaded live server, and
  raises ``RolloutError`` only when every try for ``timeout`` seconds was answered 429;
* other 4xx answers are the request's fault: ``RolloutRequestError`` at once, without retry.

Admin wrappers cover every endpoint the trainer uses (health, model info, flush, weight updates,
pause / continue, release / resume); they go to each live server directly, router or not.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from sfpo_megatron.errors import UserError
from sfpo_megatron.records import Response
from sfpo_megatron.rollout.sglang_launcher import find_free_port, wait_for_health

logger = logging.getLogger(__name__)

MAX_BUSY_BACKOFF_S = 5.0  # longest wait between tries of a request answered 429 (queue full)


class RolloutError(UserError, RuntimeError):
    """Base class of rollout client errors."""


class NoLiveServerError(RolloutError):
    """Every rollout server is out of rotation."""


class RolloutRequestError(RolloutError, ValueError):
    """A server rejected the request itself (4xx); retrying elsewhere would not help."""


class RolloutServerError(RolloutError):
    """An admin call failed: the message names the server, the route and its answer."""


class RouterUnavailableError(RolloutError):
    """``use_router=True`` but ``sglang_router`` is not installed."""


@dataclass
class _Server:
    url: str
    alive: bool = True
    inflight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str = ""


def _normalise_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


class RolloutClient:
    def __init__(
        self,
        urls: Sequence[str],
        max_concurrency: int = 64,
        timeout: float = 600.0,
        retries: int = 2,
        api_key: str | None = None,
        backoff_s: float = 0.2,
        connect_timeout: float = 5.0,
        use_router: bool = False,
        router_url: str | None = None,
        router_policy: str = "cache_aware",
        router_log: str | None = None,
    ):
        if not urls:
            raise ValueError("RolloutClient needs at least one server url")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._workers = [_Server(_normalise_url(u)) for u in urls]
        if len({s.url for s in self._workers}) != len(self._workers):
            raise ValueError(f"duplicate server urls in {list(urls)}")
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.connect_timeout = min(connect_timeout, timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.dropped: list[tuple[str, str]] = []  # (url, why), in the order servers left rotation
        self._router_proc: subprocess.Popen | None = None
        self._dispatch = self._workers
        if use_router or router_url:
            self._dispatch = [_Server(_normalise_url(router_url) if router_url else self._start_router(router_policy, router_log))]

    # ---- plumbing -----------------------------------------------------------------------

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=max(8, self.max_concurrency))
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def live_urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self._workers if s.alive]

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {s.url: {"alive": s.alive, "inflight": s.inflight, "served": s.served, "last_error": s.last_error}
                    for s in self._dispatch + [w for w in self._workers if w not in self._dispatch]}

    def _acquire(self) -> _Server:
        with self._lock:
            live = [s for s in self._dispatch if s.alive]
            if not live:
                raise NoLiveServerError(
                    "no live rollout server left: "
                    + "; ".join(f"{s.url} ({s.last_error or 'out of rotation'})" for s in self._dispatch)
                )
            server = min(live, key=lambda s: (s.inflight, s.served))
            server.inflight += 1
            return server

    def _release(self, server: _Server, error: str | None) -> None:
        with self._lock:
            server.inflight -= 1
            if error is None:
                server.failures = 0
                server.served += 1
                return
            server.failures += 1
            server.last_error = error
            if server.alive and server.failures > self.retries:
                self._take_out(server, f"{server.failures} consecutive /generate failures: {error}")

    def _take_out(self, server: _Server, why: str) -> None:
        """Under ``_lock``: out of rotation for good, logged and recorded in ``dropped``."""
        server.alive = False
        server.last_error = why
        self.dropped.append((server.url, why))
        logger.error("taking rollout server %s out of rotation (%d left): %s", server.url,
                     sum(s.alive for s in self._workers), why)

    def drop(self, url: str, why: str) -> None:
        """Take ``url`` out of rotation for good (e.g. it failed a weight update: its weights are
        stale). A dropped server is never used again, even if it answers later."""
        url = _normalise_url(url)
        with self._lock:
            for s in self._workers + self._dispatch:
                if s.url == url and s.alive:
                    self._take_out(s, why)

    # ---- generation ---------------------------------------------------------------------

    def generate_raw(self, payload: dict) -> tuple[Any, str, int]:
        """POST one SGLang /generate payload with failover. Returns (json, server url, attempts)."""
        attempts = 0
        max_attempts = (self.retries + 1) * len(self._dispatch) + 1
        busy_since: float | None = None  # first of the consecutive 429 answers
        busy = 0
        while True:
            server = self._acquire()
            attempts += 1
            try:
                r = self._session().post(
                    server.url + "/generate", json=payload, headers=self._headers,
                    timeout=(self.connect_timeout, self.timeout),
                )
            except requests.RequestException as e:
                self._release(server, f"{type(e).__name__}: {e}")
                self._retry_or_give_up(attempts, max_attempts, server)
                continue
            if r.status_code >= 500 and r.status_code not in (501, 503):
                self._release(server, f"HTTP {r.status_code}: {r.text[:200]}")
                self._retry_or_give_up(attempts, max_attempts, server)
                continue
            if r.status_code == 429:  # queue full: the server is healthy, try again later
                with self._lock:
                    server.inflight -= 1
                attempts -= 1  # not a failure: leaves the failover budget alone
                now = time.monotonic()
                busy_since = now if busy_since is None else busy_since
                if now - busy_since > self.timeout:
                    raise RolloutError(f"{server.url}/generate answered 429 (queue full) for {now - busy_since:.0f} s: "
                                       f"{r.text[:500]}")
                busy += 1
                time.sleep(random.uniform(0.5, 1.0) * min(self.backoff_s * 2 ** min(busy, 10), MAX_BUSY_BACKOFF_S))
                continue
            busy_since, busy = None, 0
            self._release(server, None)
            if r.status_code == 503:
                raise RolloutError(f"{server.url}/generate is not serving (503): {r.text[:500]}")
            if r.status_code != 200:
                raise RolloutRequestError(f"{server.url}/generate answered {r.status_code}: {r.text[:1000]}")
            return r.json(), server.url, attempts

    def _retry_or_give_up(self, attempts: int, max_attempts: int, server: _Server) -> None:
        if attempts >= max_attempts:
            raise NoLiveServerError(f"gave up after {attempts} attempts; last failure on {server.url}: {server.last_error}")
        time.sleep(self.backoff_s * min(attempts, 5))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: dict | None = None,
        n: int = 1,
        return_logprob: bool = True,
        seed: int | None = None,
        extra: dict | None = None,
    ) -> list[list[Response]]:
        """``n`` samples for each prompt (token ids); result[i][j] is sample j of prompt i.

        Each sample is its own request, so the load spreads per sample and a failed one is retried
        alone. With ``seed``, sample j of prompt i uses ``sampling_seed = seed + i * n + j``.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        params = dict(sampling_params or {})
        if params.get("n", 1) != 1:
            raise ValueError("pass the number of samples as generate(n=...), not sampling_params['n']")
        params.pop("n", None)
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results: list[list[Response | None]] = [[None] * n for _ in prompts]
        if not jobs:
            return []

        def run(i: int, j: int) -> Response:
            sp = dict(params)
            if seed is not None:
                sp["sampling_seed"] = seed + i * n + j
            payload = {"input_ids": list(prompts[i]), "sampling_params": sp, "return_logprob": return_logprob, **(extra or {})}
            out, url, attempts = self.generate_raw(payload)
            return self._sample(out, i, j, list(prompts[i]), url, attempts)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(jobs)), thread_name_prefix="rollout")
        try:
            futures = {pool.submit(run, i, j): (i, j) for i, j in jobs}
            for fut in concurrent.futures.as_completed(futures):
                i, j = futures[fut]
                results[i][j] = fut.result()  # the first error propagates; the rest are cancelled below
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results  # type: ignore[return-value]

    def generate_one(self, input_ids: Sequence[int], sampling_params: dict,
                     return_logprob: bool = True) -> Response:
        """One request as given (``sampling_params`` complete, its seed included), with failover."""
        out, url, attempts = self.generate_raw({"input_ids": list(input_ids), "sampling_params": dict(sampling_params),
                                                "return_logprob": return_logprob})
        return self._sample(out, 0, 0, list(input_ids), url, attempts)

    @staticmethod
    def _sample(out: dict, i: int, j: int, prompt: list[int], url: str, attempts: int) -> Response:
        meta = out.get("meta_info", {})
        lps = meta.get("output_token_logprobs")
        return Response(
            prompt_index=i, sample_index=j, prompt_ids=prompt, output_ids=list(out.get("output_ids", [])),
            output_logprobs=None if lps is None else [float(x[0]) for x in lps],
            finish_reason=meta.get("finish_reason") or {}, weight_version=meta.get("weight_version"),
            text=out.get("text"), server=url, attempts=attempts, meta_info=meta,
        )

    # ---- admin --------------------------------------------------------------------------

    def call(self, url: str, path: str, payload: dict | None = None, method: str = "POST", timeout: float | None = None) -> Any:
        """One admin call. Returns the JSON answer (or {"success", "message"} for text answers).
        SGLang answers failed weight updates with 400 + {"success": false, ...}: returned, not raised."""
        # A pooled keep-alive connection the server closed while idle fails the next request
        # with "Remote end closed connection": an idempotent GET is retried once on a fresh one.
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            try:
                r = self._session().request(
                    method, _normalise_url(url) + path, json=payload, headers=self._headers,
                    timeout=(self.connect_timeout, timeout or self.timeout),
                )
                break
            except requests.ConnectionError as e:
                if attempt + 1 < attempts:
                    continue
                raise RolloutServerError(f"{url}{path}: {type(e).__name__}: {e}") from e
            except requests.RequestException as e:
                raise RolloutServerError(f"{url}{path}: {type(e).__name__}: {e}") from e
        body: Any = None
        if r.headers.get("content-type", "").startswith("application/json"):
            try:
                body = r.json()
            except ValueError:
                body = None
        if r.status_code == 200:
            return body if body is not None else {"success": True, "message": r.text}
        if r.status_code == 400 and isinstance(body, dict) and "success" in body:
            return body
        raise RolloutServerError(f"{url}{path} answered {r.status_code}: {r.text[:1000]}")

    def _broadcast(self, path: str, payload: dict | None = None, method: str = "POST", urls: Sequence[str] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        results = self.call_each(path, payload, method, urls, timeout)
        for answer in results.values():
            if isinstance(answer, RolloutServerError):
                raise answer
        return results

    def call_each(self, path: str, payload: dict | None = None, method: str = "POST",
                  urls: Sequence[str] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The same admin call on every live server (or ``urls``) in parallel: {url: answer}, where
        a server that could not be reached or failed (``call`` raised) maps to its
        ``RolloutServerError`` instead of failing the others."""
        targets = list(urls) if urls is not None else self.live_urls()
        if not targets:
            raise NoLiveServerError(f"no live rollout server for {path}")

        def one(url: str) -> Any:
            try:
                return self.call(url, path, payload, method, timeout)
            except RolloutServerError as e:
                return e

        if len(targets) == 1:
            return {targets[0]: one(targets[0])}
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
            futs = {u: pool.submit(one, u) for u in targets}
            return {u: f.result() for u, f in futs.items()}

    def health(self, timeout: float = 5.0) -> dict[str, bool]:
        """GET /health on every configured server (dead ones too); never raises."""
        out = {}
        for s in self._workers:
            try:
                out[s.url] = self._session().get(s.url + "/health", timeout=timeout).status_code == 200
            except requests.RequestException:
                out[s.url] = False
        return out

    def health_generate(self, timeout: float = 30.0) -> dict[str, bool]:
        out = {}
        for url in self.live_urls():
            try:
                out[url] = self._session().get(url + "/health_generate", timeout=timeout).status_code == 200
            except requests.RequestException:
                out[url] = False
        return out

    def get_model_info(self) -> dict[str, dict]:
        return self._broadcast("/get_model_info", method="GET")

    def get_server_info(self) -> dict[str, dict]:
        return self._broadcast("/get_server_info", method="GET")

    def get_weight_version(self, urls: Sequence[str] | None = None, timeout: float | None = None,
                           per_server: bool = False) -> dict[str, Any]:
        """{url: version}; with ``per_server`` a server that failed maps to its ``RolloutServerError``."""
        answers = self._admin("/get_weight_version", None, "GET", urls, timeout, per_server)
        return {u: r if isinstance(r, RolloutServerError) else r.get("weight_version") for u, r in answers.items()}

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> dict[str, dict]:
        return self._broadcast("/update_weight_version", {"new_version": new_version, "abort_all_requests": abort_all_requests})

    def flush_cache(self) -> dict[str, dict]:
        return self._broadcast("/flush_cache")

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> dict[str, dict]:
        return self._broadcast("/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def pause_generation(self, mode: str = "abort") -> dict[str, dict]:
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"mode must be 'abort', 'retract' or 'in_place', got {mode!r}")
        return self._broadcast("/pause_generation", {"mode": mode})

    def continue_generation(self) -> dict[str, dict]:
        return self._broadcast("/continue_generation", {})

    def release_memory_occupation(self, tags: list[str] | None = None) -> dict[str, dict]:
        return self._broadcast("/release_memory_occupation", {} if tags is None else {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> dict[str, dict]:
        return self._broadcast("/resume_memory_occupation", {} if tags is None else {"tags": tags})

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, abort_all_requests: bool = False,
                                 flush_cache: bool = True, load_format: str | None = None,
                                 urls: Sequence[str] | None = None, timeout: float | None = None,
                                 per_server: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {"model_path": model_path, "abort_all_requests": abort_all_requests, "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:
            payload["load_format"] = load_format
        return self._admin("/update_weights_from_disk", payload, "POST", urls, timeout, per_server)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "gloo", *, url: str,
                                  timeout: float | None = None) -> dict:
        """One server joins the group as rank ``rank_offset`` (blocks until the whole group has joined)."""
        return self.call(url, "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        }, timeout=timeout)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", weight_version: str | None = None,
                                        flush_cache: bool = True, abort_all_requests: bool = False,
                                        load_format: str | None = None,
                                        url: str | None = None, timeout: float | None = None) -> Any:
        """Announce one bucket; the server then receives each tensor from the group's rank 0.
        With ``url``: that server's answer; else {url: answer} over all live servers."""
        payload: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                   "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:  # "flattened_bucket": one uint8 tensor for the whole bucket
            payload["load_format"] = load_format
        if url is not None:
            return self.call(url, "/update_weights_from_distributed", payload, timeout=timeout)
        return self._broadcast("/update_weights_from_distributed", payload, timeout=timeout)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group",
                                     urls: Sequence[str] | None = None, timeout: float | None = None,
                                     per_server: bool = False) -> dict[str, Any]:
        return self._admin("/destroy_weights_update_group", {"group_name": group_name}, "POST", urls, timeout,
                           per_server)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], weight_version: str | None = None,
                                   flush_cache: bool = True, load_format: str | None = None,
                                   urls: Sequence[str] | None = None, timeout: float | None = None,
                                   per_server: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors, "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        if load_format is not None:
            payload["load_format"] = load_format
        return self._admin("/update_weights_from_tensor", payload, "POST", urls, timeout, per_server)

    def _admin(self, path: str, payload: dict | None, method: str, urls: Sequence[str] | None,
               timeout: float | None, per_server: bool) -> dict[str, Any]:
        if per_server:
            return self.call_each(path, payload, method, urls, timeout)
        return self._broadcast(path, payload, method, urls, timeout)

    # ---- sglang_router (GPU / cluster path) ---------------------------------------------

    def _start_router(self, policy: str, log_path: str | None) -> str:
        """Start ``python -m sglang_router.launch_router`` over our workers and return its url."""
        if importlib.util.find_spec("sglang_router") is None:
            raise RouterUnavailableError(
                "use_router=True needs the sglang_router package (pip install sglang-router==0.3.2, the 'gpu' extra); "
                "it is not importable here. Drop use_router to use the client's own least-loaded dispatch."
            )

        port = find_free_port()
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
               "--policy", policy, "--worker-urls", *[w.url for w in self._workers]]
        log = open(log_path or Path.cwd() / f"sglang_router_{port}.log", "ab")
        self._router_proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, timeout_s=120, proc=self._router_proc, what="sglang_router")
        logger.info("sglang_router on %s over %d workers (policy %s)", url, len(self._workers), policy)
        return url

    def close(self) -> None:
        if self._router_proc is not None and self._router_proc.poll() is None:
            self._router_proc.terminate()
            try:
                self._router_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._router_proc.kill()
        self._router_proc = None

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
