"""Per-rank GPU memory of an SFPO / GRPO training job, from the model's shape and the layout.

Pure arithmetic (no torch, no megatron): ``sfpo-megatron plan`` (cli.py) feeds it the HF config
and the ``rl`` flags after the trainer's own layout checks. The model (docs/memory.md):

* **weights**: the parameters this rank holds (its TP shard of its PP stage's layers; the
  embedding on the first stage, final norm + output layer on the last, a second copy of a tied
  embedding on the last stage when PP > 1), 2 bytes each with ``--bf16``, else 4. With the
  distributed optimizer megatron's DDP keeps them in one padded buffer (each parameter starts at a
  multiple of 64 elements, each bucket ends at a multiple of lcm(DP, 128)); the padding is counted.
* **gradient buffers**: DDP's main-grad buffer, fp32 (``grad_reduce_in_fp32``), same padding.
* **fp32 main params**: with ``--bf16`` an fp32 copy (this DP rank's shard with the distributed
  optimizer); without it the optimizer updates the model params themselves (0 extra).
* **Adam moments**: exp_avg + exp_avg_sq, fp32, over the same elements as the main params.
* **SFPO θ0 snapshot**: one fp32 copy of the main params (``--algorithm sfpo``); in host memory
  with ``--sfpo-snapshot-offload`` (reported as host bytes, 0 on the GPU).
* **activations** of one micro-batch of T tokens (``--max-tokens-per-gpu``, or micro-batch size x
  sequence length), per layer (Korthikanti et al. 2022, adapted: GQA, SwiGLU, RMSNorm, no dropout,
  fused/flash attention that stores no s x s scores), times the micro-batches a 1F1B pipeline
  stage keeps in flight; the last stage adds the fp32 vocab-parallel log-prob/entropy path.
  With ``--recompute-activations`` a layer keeps only its input, plus one recomputed layer or the
  head, whichever is larger.
* **refit buffers**: ``--update-weight-buffer-size`` on global rank 0 (it pushes the buckets),
  plus the largest full HF tensor gathered from the TP/PP shards (the embedding) on every rank.

Ignored: the CUDA context and kernels' workspaces, allocator fragmentation, NCCL buffers, the
rollout engine (colocated or not), the frozen reference model of ``--kl-coef``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class ModelShape:
    """The dense decoder's dimensions (from an HF config)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # the real vocabulary (log-probs drop the padded columns)
    padded_vocab: int  # megatron's embedding rows
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    # Mixture of experts (0 experts: dense): per layer whether its MLP is the sparse block
    experts: int = 0
    moe_ffn: int = 0
    top_k: int = 0
    moe_layers: tuple[bool, ...] = ()

    @classmethod
    def from_arch(cls, arch, padded_vocab: int) -> ModelShape:
        """From :class:`sfpo_megatron.models.hf_config.HFArch` (duck-typed: no import here)."""
        return cls(hidden=arch.hidden_size, ffn=arch.intermediate_size, layers=arch.num_layers,
                   heads=arch.num_heads, kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                   vocab=arch.vocab_size, padded_vocab=padded_vocab,
                   tied=arch.tie_word_embeddings, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm,
                   experts=getattr(arch, "num_experts", 0),
                   moe_ffn=getattr(arch, "moe_intermediate_size", 0),
                   top_k=getattr(arch, "moe_top_k", 0),
                   moe_layers=tuple(getattr(arch, "moe_layers", ())))

    def is_moe_layer(self, i: int) -> bool:
        return self.experts > 0 and bool(self.moe_layers[i])


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    ep: int = 1  # expert-model-parallel size
    etp: int | None = None  # expert-tensor-parallel size (None: TP)
    distributed_optimizer: bool = False
    bf16: bool = False
    recompute: bool = False
    tokens: int = 4096  # tokens of one micro-batch
    sfpo: bool = True  # the θ0 snapshot exists (SFPO with α > 0 and K > 0)
    snapshot_offload: bool = False
    optimizer_offload: bool = False  # --optimizer-cpu-offload
    refit_buffer: int = 512 * 2**20


@dataclass
class RankPlan:
    """Bytes one rank type holds (the worst DP rank of its stage)."""

    stage: str  # "first" / "middle" / "last" / "only"
    pp_rank: int
    params: int  # parameter count on this rank
    bytes: dict[str, int] = field(default_factory=dict)
    snapshot_host_bytes: int = 0
    optimizer_host_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def expert_tp(lay: Layout) -> int:
    return lay.tp if lay.etp is None else lay.etp


def expert_dp(lay: Layout) -> int:
    """The expert-data-parallel size: the ranks of a stage (TP x DP) over ETP x EP."""
    return lay.tp * lay.dp // (expert_tp(lay) * lay.ep)


ROWS = ("weights", "grad_buffers", "main_params", "adam_moments", "sfpo_snapshot",
        "activations", "refit_buffers")


# ---- parameters -------------------------------------------------------------------------------


def layer_param_numels(s: ModelShape, tp: int, layer: int = 0, ep: int = 1,
                       etp: int | None = None) -> tuple[list[int], list[int]]:
    """One decoder layer's parameters on a TP rank, in megatron's order (local / TE spec):
    (dense parameters, expert parameters). A sparse layer's MLP is the router ([experts, h],
    replicated, a dense parameter) and this EP rank's experts, each a SwiGLU MLP of
    ``moe_ffn / ETP`` (megatron's SequentialMLP: fc1, fc2 per local expert)."""
    qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim // tp
    numels = [s.hidden, qkv_out * s.hidden]  # input norm, linear_qkv
    if s.qkv_bias:
        numels.append(qkv_out)
    if s.qk_norm:
        numels += [s.head_dim, s.head_dim]
    numels += [s.heads * s.head_dim // tp * s.hidden,  # linear_proj
               s.hidden]  # pre-MLP norm
    if s.is_moe_layer(layer):
        f = s.moe_ffn // (tp if etp is None else etp)
        numels.append(s.experts * s.hidden)  # router
        return numels, [n for _ in range(s.experts // ep) for n in (2 * f * s.hidden, f * s.hidden)]
    numels += [2 * s.ffn // tp * s.hidden,  # linear_fc1 (gate and up)
               s.ffn // tp * s.hidden]  # linear_fc2
    return numels, []


def chunk_layers(s: ModelShape, lay: Layout, pp_rank: int, vp: int) -> range:
    """The global indices of one model chunk's layers (megatron's layer offset)."""
    per_chunk = s.layers // (lay.pp * (lay.vpp or 1))
    start = (vp * lay.pp + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def chunk_params(s: ModelShape, lay: Layout, pp_rank: int, vp: int) -> list[tuple[int, bool]]:
    """(numel, shared_embedding) of each dense parameter of one model chunk, in megatron's
    order."""
    chunks = lay.vpp or 1
    first = pp_rank == 0 and vp == 0
    last = pp_rank == lay.pp - 1 and vp == chunks - 1
    emb = s.padded_vocab // lay.tp * s.hidden
    shared = s.tied and lay.pp > 1  # megatron gives the tied copies their own bucket
    out: list[tuple[int, bool]] = []
    if first:
        out.append((emb, shared))
    for i in chunk_layers(s, lay, pp_rank, vp):
        dense, _ = layer_param_numels(s, lay.tp, i, lay.ep, lay.etp)
        out += [(n, False) for n in dense]
    if last:
        out.append((s.hidden, False))  # final norm
        if not s.tied or not first:
            out.append((emb, shared))  # output layer (the tied copy on the last stage)
    return out


def chunk_expert_params(s: ModelShape, lay: Layout, pp_rank: int, vp: int) -> list[tuple[int, bool]]:
    """This EP rank's expert parameters of one model chunk: DDP puts them in buffers of their
    own, sharded over the expert-data-parallel group."""
    return [(n, False) for i in chunk_layers(s, lay, pp_rank, vp)
            for n in layer_param_numels(s, lay.tp, i, lay.ep, lay.etp)[1]]


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def buffer_layout(params: list[tuple[int, bool]], dp: int, distributed_optimizer: bool
                  ) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    """megatron's ``_ParamAndGradBuffer`` with one bucket (``bucket_size=None``): parameters in
    reverse order, starts padded to 64 elements and bucket ends to lcm(DP, 128) with the
    distributed optimizer, the tied embedding in a bucket of its own. Returns (buffer numel,
    [(start, end)] of the parameters, [(start, end)] of the buckets)."""
    def pad_start(i: int) -> int:
        return _ceil(i, 64) if distributed_optimizer else i

    def pad_end(i: int) -> int:
        return _ceil(i, math.lcm(dp, 128)) if distributed_optimizer else i

    ranges, buckets = [], []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for numel, shared in reversed(params):
        start = pad_start(start)
        own = shared and distributed_optimizer
        if own and in_bucket:
            start = pad_end(start)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        end = start + numel
        ranges.append((start, end))
        in_bucket += 1
        if own:
            start = pad_end(end)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        else:
            start = end
    if in_bucket:
        buckets.append((bucket_start, pad_end(end)))
    total = buckets[-1][1] if buckets else 0
    return total, ranges, buckets


def shard_numel(ranges: list[tuple[int, int]], buckets: list[tuple[int, int]], dp: int,
                dp_rank: int) -> int:
    """Parameter elements (no padding) in DP rank ``dp_rank``'s slice of every bucket: what the
    distributed optimizer gives that rank's main params and Adam state."""
    total = 0
    for b0, b1 in buckets:
        size = (b1 - b0) // dp
        lo, hi = b0 + dp_rank * size, b0 + (dp_rank + 1) * size
        total += sum(max(0, min(hi, e) - max(lo, s)) for s, e in ranges if b0 <= s < b1)
    return total


# ---- activations ------------------------------------------------------------------------------


def layer_activation_bytes(s: ModelShape, tp: int, tokens: int, elem: int, moe: bool = False,
                           etp: int | None = None) -> int:
    """Bytes one layer keeps for its backward, per micro-batch of ``tokens`` tokens on a TP rank
    (no sequence parallelism): Korthikanti et al.'s per-layer count re-derived for this layer
    (a query heads, g KV heads of size d, hidden h, FFN f, all per TP rank where sharded), as
    megatron's local layer spec saves it (counted with saved-tensor hooks):

    at ``elem`` bytes (the model's dtype) per token --
      6h        each RMSNorm's input, normalised input and output (the output is the next
                linear's input), two norms;
      (a+2g)d   the fused QKV output, kept whole because v is a view of it;
      (a+g)d    q and k after RoPE;
      ad        the attention output (linear_proj's input); flash / fused attention stores no
                s x s scores;
      5f        SwiGLU: FC1's output (2f), silu(gate), its product with up (FC2's input) and
                one more f-sized intermediate;
      2(a+g)d   with QK-norm: q and k before and after their norm;
    in fp32 per token -- the attention's log-sum-exp (a), the norms' 1/rms (2), RoPE's cos and
    sin for q and k (4d). No dropout masks (dropout is 0 in these models).

    A sparse (MoE) layer's MLP instead keeps, per token, its k routed copies: the dispatched
    input and the expert output (2h each) and each expert's SwiGLU (5 f_moe / ETP), plus the
    router's fp32 logits, probabilities and routing map (3 x experts). With balanced routing an
    EP rank receives k copies per token of its micro-batch on average; an imbalanced router
    sends it more. This MoE term is an estimate, not yet checked against a profiler.
    """
    a, g, d = s.heads // tp, s.kv_heads // tp, s.head_dim
    per_token = 6 * s.hidden + (a + 2 * g) * d + (a + g) * d + a * d
    fp32 = a + 2 + 4 * d
    if moe:
        per_token += s.top_k * (2 * s.hidden + 5 * s.moe_ffn // (tp if etp is None else etp))
        fp32 += 3 * s.experts
    else:
        per_token += 5 * s.ffn // tp
    if s.qk_norm:
        per_token += 2 * (a + g) * d
    return tokens * (per_token * elem + FP32 * fp32)


def logits_bytes(s: ModelShape, tp: int, tokens: int, elem: int) -> int:
    """The last stage's log-prob / entropy path (trainer/vocab_parallel.py) at its peak: the
    output layer's logits (``elem`` bytes) and three fp32 [tokens, V/tp] tensors alive together
    (the shifted logits kept for backward, and in backward the probabilities and the gradient)."""
    return tokens * (s.padded_vocab // tp) * (elem + 3 * FP32)


def activation_bytes(s: ModelShape, lay: Layout, pp_rank: int) -> int:
    elem = 2 if lay.bf16 else 4
    t = lay.tokens
    # This stage's layers, over all its virtual chunks.
    layers = [i for vp in range(lay.vpp or 1) for i in chunk_layers(s, lay, pp_rank, vp)]
    per_layer = [layer_activation_bytes(s, lay.tp, t, elem, s.is_moe_layer(i), lay.etp)
                 for i in layers]
    one_layer = max(per_layer)
    # 1F1B: stage i holds up to pp - i micro-batches between their forward and backward;
    # interleaving adds (pp - 1) / (pp * vpp) of a stage's share (Korthikanti et al. 2022, 4.2.3).
    in_flight = lay.pp - pp_rank
    if lay.vpp:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    last = pp_rank == lay.pp - 1
    # Final norm (input, normalised, output), then the vocabulary: live while the logits are.
    head = 3 * t * s.hidden * elem + logits_bytes(s, lay.tp, t, elem) if last else 0
    if lay.recompute:
        # Each layer keeps only its input; in backward one layer is recomputed at a time, after
        # the head's tensors are freed: the peak is the larger of the two.
        stored = len(layers) * t * s.hidden * elem
        total = in_flight * stored + max(one_layer, head)
    else:
        total = in_flight * sum(per_layer) + head
    return int(total)


# ---- the plan ---------------------------------------------------------------------------------


def stage_name(pp_rank: int, pp: int) -> str:
    if pp == 1:
        return "only"
    return "first" if pp_rank == 0 else "last" if pp_rank == pp - 1 else "middle"


def rank_plan(s: ModelShape, lay: Layout, pp_rank: int) -> RankPlan:
    weight_elem = 2 if lay.bf16 else 4
    weights = grads = main_elems = 0
    params = 0
    for vp in range(lay.vpp or 1):
        # Dense parameters over the DP group; experts in their own buffers over the
        # expert-data-parallel group.
        for chunk, dp in ((chunk_params(s, lay, pp_rank, vp), lay.dp),
                          (chunk_expert_params(s, lay, pp_rank, vp), expert_dp(lay))):
            if not chunk:
                continue
            params += sum(n for n, _ in chunk)
            numel, ranges, buckets = buffer_layout(chunk, dp, lay.distributed_optimizer)
            grads += numel * FP32
            weights += (numel if lay.distributed_optimizer else sum(n for n, _ in chunk)) * weight_elem
            if lay.distributed_optimizer:
                main_elems += max(shard_numel(ranges, buckets, dp, r) for r in range(dp))
            else:
                main_elems += sum(n for n, _ in chunk)
    snapshot = main_elems * FP32 if lay.sfpo else 0
    # Main params are separate fp32 tensors only with bf16 model params.
    main = main_elems * FP32 if lay.bf16 else 0
    refit = s.padded_vocab * s.hidden * weight_elem + (lay.refit_buffer if pp_rank == 0 else 0)
    plan = RankPlan(stage=stage_name(pp_rank, lay.pp), pp_rank=pp_rank, params=params)
    plan.bytes = {
        "weights": weights,
        "grad_buffers": grads,
        "main_params": main,
        "adam_moments": 0 if lay.optimizer_offload else 2 * main_elems * FP32,
        "sfpo_snapshot": 0 if lay.snapshot_offload else snapshot,
        "activations": activation_bytes(s, lay, pp_rank),
        "refit_buffers": refit,
    }
    plan.snapshot_host_bytes = snapshot if lay.snapshot_offload else 0
    # HybridDeviceOptimizer on the host: a copy of the main-param shard, its gradient and the two
    # moments; the distributed optimizer's main-param shard stays on the GPU.
    plan.optimizer_host_bytes = 4 * main_elems * FP32 if lay.optimizer_offload else 0
    return plan


def plan(s: ModelShape, lay: Layout) -> list[RankPlan]:
    """One :class:`RankPlan` per rank type: the first, one middle (the most loaded: the one after
    the first) and the last pipeline stage; one ``only`` stage without PP."""
    ranks = [0] if lay.pp == 1 else [0, 1, lay.pp - 1] if lay.pp > 2 else [0, 1]
    return [rank_plan(s, lay, r) for r in ranks]


@dataclass
class Verdict:
    fits: bool
    worst_stage: str
    worst_total: int
    gpu_memory: int

    @property
    def margin(self) -> int:
        """Bytes left (> 0) or missing (< 0) on the most loaded rank."""
        return self.gpu_memory - self.worst_total


def verdict(plans: list[RankPlan], gpu_memory: int) -> Verdict:
    worst = max(plans, key=lambda p: p.total)
    return Verdict(worst.total <= gpu_memory, worst.stage, worst.total, gpu_memory)


def parse_bytes(text: str) -> int:
    """``80GB`` / ``80GiB`` / ``141G`` / ``81920MB`` / a number of bytes; GB means GiB (what
    ``nvidia-smi`` and torch report as a GPU's memory)."""
    units = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
             "MIB": 2**20, "G": GIB, "GB": GIB, "GIB": GIB, "T": 2**40, "TB": 2**40, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GB, 141GiB, 81920MB)")
    return int(value * units[unit])


def to_json(s: ModelShape, lay: Layout, plans: list[RankPlan], v: Verdict) -> dict:
    return {
        "model": asdict(s),
        "layout": asdict(lay),
        "ranks": [{"stage": p.stage, "pp_rank": p.pp_rank, "params": p.params, **p.bytes,
                   "total": p.total, "sfpo_snapshot_host": p.snapshot_host_bytes,
                   "optimizer_host": p.optimizer_host_bytes} for p in plans],
        "gpu_memory": v.gpu_memory,
        "fits": v.fits,
        "worst_stage": v.worst_stage,
        "margin": v.margin,
    }


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_table(lay: Layout, plans: list[RankPlan], v: Verdict) -> str:
    cols = [p.stage for p in plans]
    width = max(10, *(len(c) for c in cols), *(len(f"{p.params:,}") for p in plans))
    head = f"{'GiB per rank':<16}" + "".join(f"{c:>{width + 2}}" for c in cols)
    lines = [f"layout: TP={lay.tp} PP={lay.pp}" + (f" VPP={lay.vpp}" if lay.vpp else "")
             + f" DP={lay.dp}"
             + (f" EP={lay.ep} ETP={expert_tp(lay)} EDP={expert_dp(lay)}" if lay.ep > 1 or lay.etp
                else "")
             + f", {lay.tokens} tokens per micro-batch"
             + (", distributed optimizer" if lay.distributed_optimizer else "")
             + (", bf16" if lay.bf16 else ", fp32")
             + (", recompute" if lay.recompute else "")
             + (", optimizer on the host" if lay.optimizer_offload else ""), head, "-" * len(head)]
    for row in ROWS:
        lines.append(f"{row:<16}" + "".join(f"{gib(p.bytes[row]):>{width + 2}}" for p in plans))
    lines.append("-" * len(head))
    lines.append(f"{'total':<16}" + "".join(f"{gib(p.total):>{width + 2}}" for p in plans))
    if any(p.snapshot_host_bytes for p in plans):
        lines.append(f"{'snapshot (host)':<16}"
                     + "".join(f"{gib(p.snapshot_host_bytes):>{width + 2}}" for p in plans))
    if any(p.optimizer_host_bytes for p in plans):
        lines.append(f"{'optimizer (host)':<16}"
                     + "".join(f"{gib(p.optimizer_host_bytes):>{width + 2}}" for p in plans))
    lines.append(f"{'params':<16}" + "".join(f"{p.params:>{width + 2},}" for p in plans))
    if v.fits:
        lines.append(f"verdict: fits in {gib(v.gpu_memory)} GiB ({gib(v.margin)} GiB left on the "
                     f"{v.worst_stage} stage)")
    else:
        lines.append(f"verdict: does NOT fit in {gib(v.gpu_memory)} GiB (the {v.worst_stage} stage "
                     f"needs {gib(-v.margin)} GiB more)")
    return "\n".join(lines)
