"""Multi-turn tool-use rollouts (``--rollout-mode multi-turn``).

One trajectory, for a prompt: the server generates until the end marker of a tool call (its
token id when the marker is one token, else a stop string) or EOS; the call is parsed from the
decoded turn, the tool runs, its output, in the response template, is tokenized and appended,
and the server continues from the whole context — up to ``max_turns`` generation turns and
``max_total_len`` response tokens::

    prompt | turn 1 (generated) | tool output 1 | turn 2 (generated) | tool output 2 | turn 3 ...
    mask      1 1 1 ... 1          0 0 ... 0         1 1 ... 1           0 0 ... 0

The response is the server's own token ids (generated text is never re-tokenized; only the tool
output and its wrapper are); generated tokens keep the server's logprobs, tool tokens have loss
mask 0 and no logprob (0.0 in the logprob list, off the mask). The trajectory's weight version is
its oldest turn's. Finish reasons: ``stop`` (EOS or a turn without a tool call), ``length`` (the
``max_total_len`` budget ran out, in a turn or in a tool output) and ``max_turns`` (the last
allowed turn asked for a tool: the call is not run).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sfpo_megatron.errors import UserError
from sfpo_megatron.records import Response
from sfpo_megatron.rollout.tools.base import Tool, ToolResult

DEFAULT_RESPONSE_TEMPLATE = "\n<tool_response>\n{output}\n</tool_response>\n"
# --tool-call-format: the markers of a call, and whether its body is JSON.
CALL_FORMATS = {"json": ("<tool_call>", "</tool_call>", True), "code": ("<code>", "</code>", False)}


@dataclass(frozen=True)
class ToolCallFormat:
    """``start`` body ``end``: a JSON body ``{"name": ..., "arguments": {...}}`` (Qwen's
    ``<tool_call>``), or (``json=False``) raw text given to the tool as its one argument."""

    start: str = "<tool_call>"
    end: str = "</tool_call>"
    json: bool = True
    response_template: str = DEFAULT_RESPONSE_TEMPLATE

    def __post_init__(self) -> None:
        if not self.start or not self.end:
            raise UserError("--tool-call-start and --tool-call-end must not be empty")
        if "{output}" not in self.response_template:
            raise UserError(f"--tool-response-template {self.response_template!r} has no {{output}} field")

    def parse(self, text: str, tool: Tool) -> tuple[dict[str, Any] | None, str | None]:
        """The arguments of the last call in ``text`` (which ends with it), or an error for the model."""
        end = text.rfind(self.end)
        start = text.rfind(self.start, 0, max(end, 0))
        if end < 0 or start < 0:
            return None, f"error: a tool call is {self.start}...{self.end}"
        body = text[start + len(self.start):end].strip()
        if not self.json:
            return {tool.argument: body}, None
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return None, f"error: the tool call is not valid JSON ({e.msg})"
        if not isinstance(call, dict):
            return None, 'error: a tool call is {"name": ..., "arguments": {...}}'
        if call.get("name", tool.name) != tool.name:
            return None, f"error: unknown tool {call.get('name')!r}; the tool is {tool.name!r}"
        args = call.get("arguments", {})
        if isinstance(args, str):
            args = {tool.argument: args}
        if not isinstance(args, dict):
            return None, "error: the tool call's arguments must be an object"
        return args, None


@dataclass
class Trajectory:
    """One multi-turn response: token ids, per-token loss mask and logprobs, and its tool use."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    weight_versions: list[str | None] = field(default_factory=list)  # one per turn
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    responses: list[Response] = field(default_factory=list, repr=False)  # the server's, one per turn

    @property
    def tool_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)

    @property
    def weight_version(self) -> str | None:
        """The oldest turn's version (numeric versions compare as numbers)."""
        versions = [v for v in self.weight_versions if v is not None]
        if not versions:
            return None
        return min(versions, key=lambda v: (0, int(v), v) if str(v).lstrip("-").isdigit() else (1, 0, v))

    def stats(self) -> dict[str, float]:
        return {"turns": float(self.turns), "tool_calls": float(self.tool_calls),
                "tool_errors": float(self.tool_errors), "tool_timeouts": float(self.tool_timeouts),
                "tool_tokens": float(self.tool_tokens), "response_tokens": float(len(self.output_ids))}

    def _extend(self, ids: Sequence[int], logprobs: Sequence[float] | None, mask: int) -> None:
        self.output_ids += list(ids)
        self.loss_mask += [mask] * len(ids)
        self.output_logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


def turn_seed(seed: int, turn: int) -> int:
    """Sampling seed of ``turn`` of the trajectory whose first turn uses ``seed`` (below 2**60)."""
    if turn == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{turn}".encode()).digest()[:7], "little") >> 1


class MultiTurnRollout:
    """Runs trajectories against a ``RolloutClient`` with one tool (rank 0 only)."""

    def __init__(self, client, tokenizer, tool: Tool, fmt: ToolCallFormat, *, max_turns: int,
                 max_total_len: int, max_workers: int = 64) -> None:
        if max_turns < 1:
            raise UserError(f"--max-turns must be >= 1, got {max_turns}")
        if max_total_len < 1:
            raise UserError(f"--max-total-response-len must be >= 1, got {max_total_len}")
        self.client, self.tokenizer, self.tool, self.fmt = client, tokenizer, tool, fmt
        self.max_turns, self.max_total_len = max_turns, max_total_len
        self.max_workers = max_workers
        end_ids = tokenizer.encode(fmt.end)
        # A marker that is one token stops on its id (exact, and servers without a tokenizer,
        # e.g. for a SentencePiece model, can do it); a longer one on the stop string.
        self.stop_token_ids = end_ids if len(end_ids) == 1 else []

    def generate(self, prompts: Sequence[Sequence[int]], params: dict, *, n: int,
                 seed: int | None) -> list[list[Trajectory]]:
        """``n`` trajectories per prompt; sample j of prompt i starts from seed ``seed + i * n + j``."""
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        out: list[list[Trajectory | None]] = [[None] * n for _ in prompts]
        if not jobs:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(jobs)),
                                                   thread_name_prefix="multi-turn") as pool:
            futures = {pool.submit(self.trajectory, list(prompts[i]), params,
                                   None if seed is None else seed + i * n + j): (i, j)
                       for i, j in jobs}
            for fut in concurrent.futures.as_completed(futures):
                i, j = futures[fut]
                out[i][j] = fut.result()
        return out  # type: ignore[return-value]

    def trajectory(self, prompt_ids: list[int], params: dict, seed: int | None) -> Trajectory:
        traj = Trajectory(prompt_ids=list(prompt_ids))
        per_turn_cap = int(params.get("max_new_tokens", self.max_total_len))
        for turn in range(self.max_turns):
            budget = self.max_total_len - len(traj.output_ids)
            if budget <= 0:
                traj.finish_reason = "length"
                return traj
            sp = dict(params, max_new_tokens=min(per_turn_cap, budget),
                      stop_token_ids=list(params.get("stop_token_ids", [])) + self.stop_token_ids)
            if not self.stop_token_ids:  # a stop string needs the server's tokenizer: only when must
                sp["stop"] = [self.fmt.end]
            if seed is not None:
                sp["sampling_seed"] = turn_seed(seed, turn)
            r = self.client.generate_one(prompt_ids + traj.output_ids, sp)
            traj.responses.append(r)
            if r.aborted or r.output_logprobs is None:  # the caller's checks name the failure
                return traj
            traj._extend(r.output_ids, r.output_logprobs, 1)
            traj.weight_versions.append(r.weight_version)
            traj.turns += 1
            reason = (r.finish_reason or {}).get("type")
            if reason == "length":
                traj.finish_reason = "length"
                return traj
            matched = (r.finish_reason or {}).get("matched")
            called = matched == self.fmt.end or (matched in self.stop_token_ids and matched is not None)
            if not called:
                traj.finish_reason = "stop"
                return traj
            if turn + 1 == self.max_turns:
                traj.finish_reason = "max_turns"
                return traj
            result = self._run_tool(self.tokenizer.decode(r.output_ids, skip_special_tokens=False))
            traj.tool_calls += 1
            traj.tool_errors += int(result.error)
            traj.tool_timeouts += int(result.timed_out)
            obs = self.tokenizer.encode(self.fmt.response_template.format(output=result.output))
            room = self.max_total_len - len(traj.output_ids)
            traj._extend(obs[:room], None, 0)
            if len(obs) >= room:
                traj.finish_reason = "length"
                return traj
        traj.finish_reason = "max_turns"
        return traj

    def _run_tool(self, turn_text: str) -> ToolResult:
        args, error = self.fmt.parse(turn_text, self.tool)
        if error is not None:
            return ToolResult(error, error=True)
        try:
            return self.tool.call(args)
        except Exception as e:  # a tool's bug is the model's observation, not the run's end
            return ToolResult(f"error: {type(e).__name__}: {e}", error=True)
