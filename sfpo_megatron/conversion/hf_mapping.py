"""The one HF ↔ megatron-core GPTModel weight mapping, shared by the converters and the refit.

Table-driven: every megatron parameter is a ``Rule`` (megatron name, HF names, layout ``kind``).
The supported families (Llama, Qwen2, Qwen3; see ``models/hf_config.FAMILIES``) share HF's tensor
names and differ only in which rules apply (QKV bias, q/k norms, untied output layer). Layouts:

=========== ======================================= ===========================================
kind        megatron tensor                          TP split (this rank's shard)
=========== ======================================= ===========================================
replicated  same as HF                               none (norms)
vocab       HF rows + zero rows up to padded vocab   rows (embedding, output layer)
row         same as HF                               input columns (linear_proj, linear_fc2)
qkv         per KV group: its q heads, k, v          whole KV groups
gate_up     [gate; up]                               per rank [gate_r; up_r]
=========== ======================================= ===========================================

Mixture-of-experts layers (Qwen3-MoE) map the router (HF ``mlp.gate`` ↔ ``mlp.router``) and each
expert: HF ``mlp.experts.{x}.{gate,up,down}_proj`` ↔ megatron
``mlp.experts.local_experts.{e}.linear_fc1/fc2`` (``SequentialMLP``), where expert ``x`` lives on
expert-parallel rank ``x // local`` as local expert ``e = x % local``. Experts are split over the
expert-tensor-parallel group (not the TP group) in the same ``gate_up`` / ``row`` layouts.

Two directions:

* ``load_hf_weights(model_chunks, hf_config, source)``: HF tensors → this rank's shards, reading
  only the slices this rank needs (``SafetensorsSource`` streams from the shards).
* ``iter_hf_weights(model_chunks, hf_config)``: a collective generator every trainer rank runs;
  TP shards are all-gathered, experts brought to the first rank of the expert-parallel group
  (``expert_to_hf``), PP stages sent to the first stage, and global rank 0 yields
  ``(hf_name, full tensor)`` one tensor at a time in HF order (other ranks yield nothing).
* ``iter_unit_hf_weights(model_chunks, hf_config)``: the refit's; each pushing unit (a pipeline
  stage, and in an MoE stage each expert-parallel rank's experts, ``push_unit``) gathers its own
  tensors over its TP (expert-TP) group and its leader yields them; nothing crosses stages or
  expert-parallel ranks, so the units push at the same time.

Padded vocab rows are zero: their logits are 0, so drop ``logits[..., vocab_size:]`` before any
softmax over the vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from sfpo_megatron.errors import UserError
from sfpo_megatron.models.hf_config import HFArch, check_parallel_layout, load_hf_config


class MappingError(UserError):
    """An HF checkpoint or megatron model that does not match the mapping / config."""


class MissingTensorError(MappingError):
    pass


class ExtraTensorError(MappingError):
    pass


class ShapeMismatchError(MappingError):
    pass


class ArchitectureMismatchError(MappingError):
    pass


class HFFileError(MappingError):
    """A missing, truncated or unreadable file of an HF checkpoint directory."""


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    mcore: str  # parameter name in GPTModel (layer rules: relative to a TransformerLayer)
    hf: tuple[str, ...]  # HF tensor name(s); "{i}" is the global layer index
    kind: str  # one of KINDS
    when: Callable[[HFArch], bool] = lambda arch: True
    export: bool = True  # False: a copy that HF does not store (tied output layer on last stage)
    moe: bool | None = None  # layer rules: None every layer, True MoE layers, False dense ones
    expert: bool = False  # one per expert: "{x}" global expert (HF), "{e}" local expert (mcore)


_L = "model.layers.{i}."
LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", (_L + "input_layernorm.weight",), "replicated"),
    Rule("self_attention.linear_qkv.weight",
         tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule("self_attention.linear_qkv.bias",
         tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", lambda a: a.qkv_bias),
    Rule("self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), "replicated",
         lambda a: a.qk_norm),
    Rule("self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), "replicated",
         lambda a: a.qk_norm),
    Rule("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "row"),
    Rule("pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), "replicated"),
    Rule("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         "gate_up", moe=False),
    Rule("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "row", moe=False),
    Rule("mlp.router.weight", (_L + "mlp.gate.weight",), "replicated", moe=True),
    Rule("mlp.experts.local_experts.{e}.linear_fc1.weight",
         (_L + "mlp.experts.{x}.gate_proj.weight", _L + "mlp.experts.{x}.up_proj.weight"),
         "gate_up", moe=True, expert=True),
    Rule("mlp.experts.local_experts.{e}.linear_fc2.weight",
         (_L + "mlp.experts.{x}.down_proj.weight",), "row", moe=True, expert=True),
)
EMBEDDING_RULE = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_RULES: tuple[Rule, ...] = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", lambda a: not a.tie_word_embeddings),
    # Tied embeddings with PP > 1: the last stage holds its own copy of the embedding.
    Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab",
         lambda a: a.tie_word_embeddings, export=False),
)
# The TE spec fuses the pre-attention / pre-MLP norms into the next linear layer.
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# Files of an HF model directory besides the weights (copied next to converted checkpoints so
# export and refit know the architecture and tokenizer).
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)

# Present in some published checkpoints but not part of the model.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def is_moe_layer(a: HFArch, i: int) -> bool:
    return a.is_moe and a.moe_layers[i]


def layer_rules(a: HFArch, i: int) -> Iterator[tuple[Rule, int | None]]:
    """Layer ``i``'s rules in HF order, each with its global expert index (None: not an expert
    rule); expert rules repeat for every expert, expert-major."""
    moe = is_moe_layer(a, i)
    rules = [r for r in LAYER_RULES if r.when(a) and r.moe in (None, moe)]
    for rule in rules:
        if not rule.expert:
            yield rule, None
        elif rule is next(r for r in rules if r.expert):
            for x in range(a.num_experts):
                for expert_rule in (r for r in rules if r.expert):
                    yield expert_rule, x


def _hf_names(rule: Rule, i: int, x: int | None) -> tuple[str, ...]:
    return tuple(n.format(i=i, x=x) for n in rule.hf)


def hf_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model with its shape, in the order ``iter_hf_weights`` yields them."""
    a = load_hf_config(hf_config)
    q, kv, h, f = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.hidden_size, \
        a.intermediate_size
    fm = a.moe_intermediate_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (a.head_dim,), "self_attn.k_norm.weight": (a.head_dim,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "mlp.gate.weight": (a.num_experts, h),
        "mlp.experts.{x}.gate_proj.weight": (fm, h), "mlp.experts.{x}.up_proj.weight": (fm, h),
        "mlp.experts.{x}.down_proj.weight": (h, fm),
    }
    shapes = {"model.embed_tokens.weight": (a.vocab_size, h)}
    for i in range(a.num_layers):
        for rule, x in layer_rules(a, i):
            for name in rule.hf:
                shapes[name.format(i=i, x=x)] = per_layer[name[len(_L):]]
    shapes["model.norm.weight"] = (h,)
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, h)
    return shapes


# ----------------------------------------------------------------------------------------------
# Layout kinds: HF tensors → this rank's megatron shard, and gathered shards → HF tensors
# ----------------------------------------------------------------------------------------------

ALL = slice(None)


def _span(n: int, rank: int, size: int) -> slice:
    per = n // size
    return slice(rank * per, (rank + 1) * per)


def _qkv_dims(a: HFArch) -> tuple[int, int]:
    return a.num_heads // a.num_kv_heads * a.head_dim, a.head_dim  # rows of q / of k per group


def _load(kind: str, read: "TensorSource", names: Sequence[str], a: HFArch, rank: int,
          size: int) -> torch.Tensor:
    """This rank's megatron shard from HF tensors, reading only the needed slices (the "vocab"
    kind is copied in blocks by ``_load_vocab_rows``)."""
    if kind == "replicated":
        return read(names[0], (ALL,))
    if kind == "row":
        return read(names[0], (ALL, _span(read.shape(names[0])[1], rank, size)))
    if kind == "gate_up":
        rows = _span(read.shape(names[0])[0], rank, size)
        return torch.cat([read(names[0], (rows,)), read(names[1], (rows,))])
    if kind == "qkv":
        groups = a.num_kv_heads // size
        qg, kg = _qkv_dims(a)
        first = rank * groups
        q = read(names[0], (slice(first * qg, (first + groups) * qg),))
        k = read(names[1], (slice(first * kg, (first + groups) * kg),))
        v = read(names[2], (slice(first * kg, (first + groups) * kg),))
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, qg, *rest), k.reshape(groups, kg, *rest),
                           v.reshape(groups, kg, *rest)], dim=1)
        return fused.reshape(groups * (qg + 2 * kg), *rest)
    raise MappingError(f"unknown layout kind {kind!r}")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses tensors sharing memory)."""
    return t.contiguous() if not t.is_contiguous() else t.clone()


def _export(kind: str, shards: list[torch.Tensor], a: HFArch) -> list[torch.Tensor]:
    if kind == "replicated":
        return [shards[0]]
    if kind == "row":
        return [shards[0] if len(shards) == 1 else torch.cat(shards, dim=1)]
    if kind == "vocab":
        full = shards[0] if len(shards) == 1 else torch.cat(shards)
        return [full[: a.vocab_size]]
    if kind == "gate_up":
        gates, ups = zip(*(s.chunk(2) for s in shards))
        if len(shards) == 1:
            return [_own(gates[0]), _own(ups[0])]
        return [torch.cat(gates), torch.cat(ups)]
    if kind == "qkv":
        full = shards[0] if len(shards) == 1 else torch.cat(shards)
        qg, kg = _qkv_dims(a)
        rest = full.shape[1:]
        grouped = full.reshape(a.num_kv_heads, qg + 2 * kg, *rest)
        q, k, v = grouped.split([qg, kg, kg], dim=1)
        return [_own(t).reshape(-1, *rest) for t in (q, k, v)]
    raise MappingError(f"unknown layout kind {kind!r}")


_TP_DIM = {"replicated": None, "row": 1, "vocab": 0, "gate_up": 0, "qkv": 0}


# ----------------------------------------------------------------------------------------------
# HF tensor sources
# ----------------------------------------------------------------------------------------------


class TensorSource(Protocol):
    def keys(self) -> Iterable[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def __call__(self, name: str, index: tuple) -> torch.Tensor: ...


class StateDictSource:
    """HF tensors already in memory (e.g. ``AutoModelForCausalLM(...).state_dict()``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def keys(self) -> Iterable[str]:
        return self.state_dict.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    def __call__(self, name: str, index: tuple) -> torch.Tensor:
        return self.state_dict[name][index]


class SafetensorsSource:
    """Streams tensors (only the requested slices) from an HF directory's safetensors shards.

    Each read opens its shard afresh so the memory map is released right after: reading a whole
    checkpoint then costs about one tensor of memory, not the checkpoint's size.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._open = safe_open
        if not os.path.isdir(directory):
            raise HFFileError(f"HF checkpoint directory {directory} does not exist")
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFFileError(f"HF checkpoint {directory}: cannot read "
                                  f"model.safetensors.index.json: {type(e).__name__}: {e}") from None
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise HFFileError(f"HF checkpoint {directory} has no *.safetensors files")
        missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise HFFileError(f"HF checkpoint {directory}: shard {missing[0]}{more} listed in "
                              "model.safetensors.index.json is missing")
        self.file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = os.path.join(directory, name)
            try:
                # safe_open checks that the header's tensors cover the file exactly, so a shard
                # cut short (an interrupted download or copy) fails here, before any tensor read.
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = path
                        self._shapes[key] = tuple(f.get_slice(key).get_shape())
            except (SafetensorError, OSError) as e:
                raise HFFileError(f"HF checkpoint {directory}: cannot read shard {name} "
                                  f"({os.path.getsize(path)} bytes; truncated or not a "
                                  f"safetensors file): {e}") from None

    def keys(self) -> Iterable[str]:
        return self.file_of.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __call__(self, name: str, index: tuple) -> torch.Tensor:
        with self._open(self.file_of[name], framework="pt") as f:
            return f.get_slice(name)[index]


def copy_hf_side_files(src: str, dst: str) -> list[str]:
    """Copy ``HF_SIDE_FILES`` present in ``src`` to ``dst``; returns their names."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in HF_SIDE_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def check_hf_checkpoint(source: TensorSource, hf_config: Any,
                        checkpoint_config: Any | None = None) -> None:
    """Refuse a checkpoint made for another architecture, or with a missing, extra or
    wrongly shaped tensor (the error names it)."""
    arch = load_hf_config(hf_config)
    if checkpoint_config is not None:
        check_same_architecture(arch, checkpoint_config, "the HF checkpoint's config.json")
    expected = hf_shapes(arch)
    present = set(source.keys())
    found = len(present & set(expected))
    if found < len(expected) / 2:  # a truncated checkpoint still has most names; another model not
        first_missing = next(n for n in expected if n not in present)
        sample = ", ".join(sorted(present - set(expected))[:3])
        raise ArchitectureMismatchError(
            f"checkpoint was made for another architecture: only {found} of the {len(expected)} "
            f"{arch.architecture} tensors are present (not {first_missing}); "
            f"it holds {sample}, ...")
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensorError(f"checkpoint is missing tensor {missing[0]}{more}")
    ignored = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    extra = sorted(n for n in present - set(expected) - ignored
                   if not n.endswith(IGNORED_HF_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ExtraTensorError(f"checkpoint has unexpected tensor {extra[0]}{more} for "
                               f"{arch.architecture} with this config")
    for name, shape in expected.items():
        if tuple(source.shape(name)) != shape:
            raise ShapeMismatchError(
                f"tensor {name} has shape {list(source.shape(name))} but the config implies "
                f"{list(shape)}")


def check_same_architecture(arch: HFArch, other: Any, what: str) -> None:
    """Raise ``ArchitectureMismatchError`` when ``other`` (an HF config) describes a different
    tensor layout than ``arch``; ``what`` names ``other`` in the message."""
    try:
        other_arch = load_hf_config(other)
    except ValueError as e:
        raise ArchitectureMismatchError(
            f"checkpoint was made for another architecture: {what} is not loadable ({e})"
        ) from None
    mine, theirs = arch.layout(), other_arch.layout()
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        detail = ", ".join(f"{k}={theirs[k]!r} (expected {mine[k]!r})" for k in diff)
        raise ArchitectureMismatchError(
            f"checkpoint was made for another architecture: {what} has {detail}")


# ----------------------------------------------------------------------------------------------
# Binding rules to a model's parameters
# ----------------------------------------------------------------------------------------------


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _get(module: torch.nn.Module, dotted: str) -> torch.Tensor | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class Binding:
    rule: Rule
    hf: tuple[str, ...]  # HF names with the global layer index filled in
    param: torch.nn.Parameter
    mcore: str  # full megatron parameter name
    layer: int | None = None  # global layer index (layer rules)
    expert: int | None = None  # global expert index (expert rules)


def bind(model_chunks: Sequence[torch.nn.Module], hf_config: Any) -> list[Binding]:
    """Every parameter of this rank's model chunks with its rule; errors on an unmapped one."""
    arch = load_hf_config(hf_config)
    ep_rank, ep_size, _ = _ep()
    local_experts = arch.num_experts // ep_size
    out: list[Binding] = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        found: list[Binding] = []

        def add(rule: Rule, prefix: str, module: torch.nn.Module, i: int | None = None,
                x: int | None = None) -> None:
            if not rule.when(arch):
                return
            name = rule.mcore
            if x is not None:
                name = name.format(e=x - ep_rank * local_experts)
            param = _get(module, name)
            if param is None and name in TE_ALIASES:
                name = TE_ALIASES[name]
                param = _get(module, name)
            if param is not None:
                found.append(Binding(rule, _hf_names(rule, i, x), param, prefix + name, i, x))

        add(EMBEDDING_RULE, "", model)
        for j, layer in enumerate(model.decoder.layers):
            i = layer.layer_number - 1
            mine = range(ep_rank * local_experts, (ep_rank + 1) * local_experts)
            for rule, x in layer_rules(arch, i):
                if x is None or x in mine:
                    add(rule, f"decoder.layers.{j}.", layer, i, x)
        for rule in FINAL_RULES:
            add(rule, "", model)
        bound = {id(b.param) for b in found}
        for name, param in model.named_parameters():
            if id(param) not in bound:
                raise MappingError(f"megatron parameter {name} has no HF mapping for "
                                   f"{arch.architecture}")
        out.extend(found)
    return out


def _tp() -> tuple[int, int, Any]:
    if not dist.is_initialized():
        return 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def _ep() -> tuple[int, int, Any]:
    if not dist.is_initialized():
        return 0, 1, None
    return (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size(),
            ps.get_expert_model_parallel_group())


def _etp() -> tuple[int, int, Any]:
    if not dist.is_initialized():
        return 0, 1, None
    return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group())


def _padded_vocab(model_chunks: Sequence[torch.nn.Module]) -> int:
    return unwrap(model_chunks[0]).vocab_size if model_chunks else 0


# ----------------------------------------------------------------------------------------------
# (a) HF → this rank's megatron shards
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def load_hf_weights(model_chunks: Sequence[torch.nn.Module], hf_config: Any,
                    source: TensorSource | dict[str, torch.Tensor] | str | os.PathLike, *,
                    progress: bool = False) -> None:
    """Fill this rank's model chunks from HF tensors (a directory of safetensors, a state dict
    or a ``TensorSource``), reading only this rank's slices."""
    arch = load_hf_config(hf_config)
    checkpoint_config = None
    if isinstance(source, (str, os.PathLike)):
        cfg_path = os.path.join(source, "config.json")
        checkpoint_config = cfg_path if os.path.exists(cfg_path) else None
        source = SafetensorsSource(os.fspath(source))
    elif isinstance(source, dict):
        source = StateDictSource(source)
    rank, size, _ = _tp()
    etp_rank, etp_size, _ = _etp()
    check_parallel_layout(arch, tp=size, ep=_ep()[1], etp=etp_size)
    check_hf_checkpoint(source, arch, checkpoint_config)
    bindings = bind(model_chunks, arch)
    padded = _padded_vocab(model_chunks)
    items: Iterable[Binding] = bindings
    if progress:
        items = tqdm(bindings, desc="load HF weights", unit="tensor")
    for b in items:
        if b.rule.kind == "vocab":
            _load_vocab_rows(b, source, arch, padded, rank, size)
            continue
        if b.expert is not None:  # experts are split over the expert-tensor-parallel group
            shard = _load(b.rule.kind, source, b.hf, arch, etp_rank, etp_size)
        else:
            shard = _load(b.rule.kind, source, b.hf, arch, rank, size)
        if tuple(shard.shape) != tuple(b.param.shape):
            raise ShapeMismatchError(
                f"{', '.join(b.hf)} give a shard of shape {list(shard.shape)} for megatron "
                f"{b.mcore} of shape {list(b.param.shape)}")
        b.param.data.copy_(shard)


_BLOCK_BYTES = 64 << 20


def _load_vocab_rows(b: Binding, read: TensorSource, a: HFArch, padded_vocab: int, rank: int,
                     size: int) -> None:
    """Embedding / output layer rows, copied in blocks straight into the parameter: the largest
    tensors of a model never exist twice in memory."""
    rows = _span(padded_vocab, rank, size)
    target = b.param.data
    if tuple(target.shape) != (rows.stop - rows.start, a.hidden_size):
        raise ShapeMismatchError(
            f"{b.hf[0]} gives a shard of shape {[rows.stop - rows.start, a.hidden_size]} for "
            f"megatron {b.mcore} of shape {list(target.shape)}")
    step = max(1, _BLOCK_BYTES // (a.hidden_size * target.element_size()))
    end = min(rows.stop, a.vocab_size)
    for first in range(rows.start, end, step):
        last = min(first + step, end)
        target[first - rows.start: last - rows.start].copy_(read(b.hf[0], (slice(first, last),)))
    target[max(end - rows.start, 0):].zero_()  # padding rows


# ----------------------------------------------------------------------------------------------
# (b) megatron shards on all ranks → (HF name, full tensor) on global rank 0
# ----------------------------------------------------------------------------------------------


def iter_hf_weights(model_chunks: Sequence[torch.nn.Module], hf_config: Any, *,
                    release: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective generator: every trainer rank must exhaust it.

    Global rank 0 yields every HF tensor (full, unpadded, in ``hf_shapes`` order) one at a time;
    the other ranks yield nothing. Only one full tensor exists at a time (plus what the consumer
    keeps). Yielded tensors may alias model parameters: copy them if kept past the next update.
    Data-parallel replicas other than the first return at once (they hold the same weights),
    except that MoE experts come from every rank of the first expert-data-parallel replica.
    With megatron DDP's ``overlap_param_gather`` the updated parameters arrive during the next
    forward: call ``chunk.start_param_sync(force_sync=True)`` on each chunk first. ``release=True`` frees each parameter once exported (converters only: the model is unusable
    afterwards), which keeps an export's peak memory near one model.
    """
    arch = load_hf_config(hf_config)
    dist_on = dist.is_initialized()
    dense_on = not dist_on or ps.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_on = arch.is_moe and (not dist_on or ps.get_expert_data_parallel_rank() == 0)
    if not dense_on and not expert_on:
        return
    tp_rank, tp_size, tp_group = _tp()
    pp_rank = ps.get_pipeline_model_parallel_rank() if dist_on else 0
    pp_size = ps.get_pipeline_model_parallel_world_size() if dist_on else 1
    bindings = bind(model_chunks, arch)
    local = {b.hf[0]: b for b in bindings if b.rule.export}
    device = bindings[0].param.device if bindings else torch.device("cpu")
    shapes = hf_shapes(arch)
    # every expert of this stage's MoE layers, held somewhere in its expert-parallel group
    stage_experts = {}
    for b in bindings:
        if b.expert is not None:
            for x in range(arch.num_experts):
                stage_experts[b.rule.hf[0].format(i=b.layer, x=x)] = str(b.param.dtype)
    if not dense_on:  # only hands its experts to its expert-parallel group's first rank
        for head in (n for n in shapes if n in stage_experts):
            expert_to_hf(local.get(head), _names_of(head, arch), arch, device,
                         getattr(torch, stage_experts[head].split(".")[-1]), release)
        return
    mine = {name: (pp_rank, str(b.param.dtype)) for name, b in local.items()}
    mine.update({name: (pp_rank, dtype) for name, dtype in stage_experts.items()})
    owner: dict[str, tuple[int, str]] = mine
    if pp_size > 1:
        pp_group = ps.get_pipeline_model_parallel_group()
        first = dist.get_global_rank(pp_group, 0)
        everyone: list[dict] = [None] * pp_size  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine, group=pp_group)
        owner = {k: v for d in everyone for k, v in d.items()}
    heads = [n for n in shapes if n in owner]  # first HF name of each exported rule, HF order
    covered = {n for head in heads for n in _names_of(head, arch)}
    if covered != set(shapes):
        lost = sorted(set(shapes) - covered)
        raise MappingError(f"no pipeline stage holds the parameter for {lost[0]}")
    yield_here = not dist_on or dist.get_rank() == 0
    for head in heads:
        stage, dtype_name = owner[head]
        dtype = getattr(torch, dtype_name.split(".")[-1])
        names = _names_of(head, arch)
        b = local.get(head)
        tensors: list[torch.Tensor] = []
        if head in stage_experts:
            if expert_on:
                tensors = expert_to_hf(b, names, arch, device, dtype, release)
        elif b is not None:  # this stage owns it: gather TP shards, convert to HF layout
            tensors = _gather_export(b, arch, tp_size, tp_group, release)
        if pp_size > 1 and tp_rank == 0 and stage != 0:  # bring it to the first stage
            if pp_rank == stage:
                for t in tensors:
                    dist.send(t.contiguous(), dst=first, group=pp_group)
            elif pp_rank == 0:
                src = dist.get_global_rank(pp_group, stage)
                tensors = [torch.empty(shapes[n], dtype=dtype, device=device) for n in names]
                for t in tensors:
                    dist.recv(t, src=src, group=pp_group)
        if yield_here:
            for name, t in zip(names, tensors):
                yield name, t
        del tensors


def expert_to_hf(b: Binding | None, names: tuple[str, ...], arch: HFArch, device: torch.device,
                 dtype: torch.dtype, release: bool = False) -> list[torch.Tensor]:
    """One expert rule's HF tensors (``names``), gathered over the expert-parallel group.

    Collective over this stage's expert-tensor-parallel and expert-parallel groups: every rank of
    the stage's first expert-data-parallel replica calls it for every expert rule in HF order.
    The expert's owner (expert-parallel rank ``x // local``; ``b`` is its binding, None
    elsewhere) all-gathers its expert-TP shards and, from expert-TP rank 0, sends the HF tensors
    to expert-parallel rank 0, which returns them: every expert reaches that rank exactly once.
    Other ranks return [].
    """
    ep_rank, ep_size, ep_group = _ep()
    etp_rank, etp_size, etp_group = _etp()
    x = int(names[0].split(".")[5])
    holder = x // (arch.num_experts // ep_size)
    tensors: list[torch.Tensor] = []
    if ep_rank == holder:
        if b is None:
            raise MappingError(f"expert-parallel rank {ep_rank} does not hold {names[0]}")
        tensors = _gather_export(b, arch, etp_size, etp_group, release)  # over expert-TP
    if holder != 0 and etp_rank == 0:
        if ep_rank == holder:
            for t in tensors:
                dist.send(t.contiguous(), dst=dist.get_global_rank(ep_group, 0), group=ep_group)
        elif ep_rank == 0:
            h, f = arch.hidden_size, arch.moe_intermediate_size
            tensors = [torch.empty((h, f) if n.endswith("down_proj.weight") else (f, h),
                                   dtype=dtype, device=device) for n in names]
            for t in tensors:
                dist.recv(t, src=dist.get_global_rank(ep_group, holder), group=ep_group)
    return tensors if ep_rank == 0 and etp_rank == 0 else []


def _gather_export(b: Binding, arch: HFArch, tp_size: int, tp_group: Any, release: bool = False) -> list[torch.Tensor]:
    """The HF tensors of one binding: TP shards all-gathered (collective over the TP group),
    converted to HF layout."""
    data = b.param.data
    if tp_size > 1 and _TP_DIM[b.rule.kind] is not None:
        shards = [torch.empty_like(data) for _ in range(tp_size)]
        dist.all_gather(shards, data.contiguous(), group=tp_group)
    else:
        shards = [data]
    tensors = _export(b.rule.kind, shards, arch)
    if release:
        b.param.data = torch.empty(0, dtype=data.dtype, device=data.device)
    return tensors


# ----------------------------------------------------------------------------------------------
# (c) megatron shards → (HF name, full tensor) on each pushing unit's leader, nothing across PP
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushUnit:
    """The part of the policy one trainer process pushes on its own at refit.

    A pipeline stage's dense tensors: its TP ranks (of data-parallel replica 0, ``member``) gather
    each one and its TP rank 0 (the ``leader``, ``ep`` 0) pushes it, with the experts of
    expert-parallel rank 0 when the stage is MoE. Each other expert-parallel rank ``ep`` of the
    stage's first expert-data-parallel replica is a unit of its own: its expert-TP rank 0 (also
    ``leader``) pushes the experts that rank holds. Megatron orders ranks TP-first inside a stage,
    so the stage's first rank is both TP rank 0 and expert-parallel rank 0. Ownership and
    gathering live in ``iter_unit_hf_weights``; which parameters map to which HF tensors stays
    with the rule table.
    """

    index: int
    count: int
    leader: bool
    member: bool
    ep: int = 0

    @property
    def name(self) -> str:
        return f"stage{self.index}" + (f"_ep{self.ep}" if self.ep else "")


def push_unit() -> PushUnit:
    """This process's unit (one unit, led by this process, outside torch.distributed)."""
    if not dist.is_initialized():
        return PushUnit(0, 1, True, True)
    member = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    leader = member and ps.get_tensor_model_parallel_rank() == 0
    ep_rank, ep_size, _ = _ep()
    if (not leader and ep_size > 1 and ep_rank > 0 and ps.get_expert_data_parallel_rank() == 0
            and ps.get_expert_tensor_parallel_rank() == 0):
        return PushUnit(pp_rank, pp_size, True, member, ep_rank)
    return PushUnit(pp_rank, pp_size, leader, member)


def _unit_heads(model_chunks: Sequence[torch.nn.Module], arch: HFArch
                ) -> tuple[list[str], dict[str, Binding], dict[str, str]]:
    """This stage's exported rules in HF order, as (first HF names, this rank's bindings by
    first name, every expert rule of the stage → its dtype). An MoE layer's experts count for the
    whole stage: each is held by one rank of its expert-parallel group."""
    bindings = [b for b in bind(model_chunks, arch) if b.rule.export]
    local = {b.hf[0]: b for b in bindings}
    experts: dict[str, str] = {}
    for b in bindings:
        if b.expert is not None:
            for x in range(arch.num_experts):
                experts[b.rule.hf[0].format(i=b.layer, x=x)] = str(b.param.dtype)
    wanted = set(experts) | {h for h, b in local.items() if b.expert is None}
    return [n for n in hf_shapes(arch) if n in wanted], local, experts


def iter_unit_hf_weights(model_chunks: Sequence[torch.nn.Module], hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective generator over this stage's TP group (and, for MoE experts, each expert's
    expert-TP group): every process must exhaust it. A unit's leader (``push_unit``) yields each
    HF tensor its unit owns (full, unpadded, HF order), one at a time: the stage leader the dense
    tensors and expert-parallel rank 0's experts, each other expert-parallel rank's leader that
    rank's experts; other processes yield nothing. Nothing crosses pipeline stages or
    expert-parallel ranks, so all units run at the same time. Yielded tensors may alias
    parameters (copy to keep them)."""
    unit = push_unit()
    arch = load_hf_config(hf_config)
    expert_on = arch.is_moe and (not dist.is_initialized() or ps.get_expert_data_parallel_rank() == 0)
    if not unit.member and not expert_on:
        return
    _, tp_size, tp_group = _tp()
    heads, local, experts = _unit_heads(model_chunks, arch)
    ep_rank, ep_size, _ = _ep()
    etp_rank, etp_size, etp_group = _etp()
    for head in heads:
        names = _names_of(head, arch)
        if head in experts:
            if not expert_on or int(names[0].split(".")[5]) // (arch.num_experts // ep_size) != ep_rank:
                continue  # another expert-parallel rank's expert: that rank's unit pushes it
            if head not in local:
                raise MappingError(f"expert-parallel rank {ep_rank} does not hold {names[0]}")
            tensors = _gather_export(local[head], arch, etp_size, etp_group)  # over expert-TP
            mine = unit.leader and etp_rank == 0
        elif unit.member:
            tensors = _gather_export(local[head], arch, tp_size, tp_group)
            mine = unit.leader and unit.ep == 0
        else:
            continue
        if mine:
            yield from zip(names, tensors)
        del tensors


def _names_of(head: str, arch: HFArch) -> tuple[str, ...]:
    """All HF names of the rule whose first name is ``head``."""
    for rule in (EMBEDDING_RULE, *FINAL_RULES):
        if rule.export and rule.when(arch) and rule.hf[0] == head:
            return rule.hf
    parts = head.split(".")
    i = int(parts[2])
    x = int(parts[5]) if parts[3:5] == ["mlp", "experts"] else None
    for rule, rx in layer_rules(arch, i):
        if rx == x and rule.hf[0].format(i=i, x=x) == head:
            return _hf_names(rule, i, x)
    raise MappingError(f"internal: no rule exports {head}")
