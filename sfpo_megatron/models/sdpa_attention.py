"""Core attention for megatron's local layer spec on torch ``scaled_dot_product_attention``.

A drop-in for megatron's ``DotProductAttention`` (same constructor and forward signature, same
mask convention: ``attention_mask`` True = masked out) that lets torch pick its fused kernel
(flash / memory-efficient on GPU, fused math on CPU) instead of materialising the scores through
megatron's global memory buffer. It also accepts packed sequences (``qkv_format='thd'``), which
the stock module refuses: attention then stays inside each packed sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from sfpo_megatron.distributed.context_parallel import gather_packed, shard_positions

# Megatron's attention_mask_func fills masked scores with -10000; an additive mask of the same
# value keeps fully masked (padding) rows finite instead of NaN.
_MASKED = -10000.0


class SDPAttention(MegatronModule):
    """Megatron core attention on torch SDPA: in ``[s, b, heads, dim]``, out ``[s, b, hp]``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "softmax_type": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"SDPAttention does not support {', '.join(bad)}; use the TE spec")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """q/k/v: [b, heads, s, d]; mask: additive or None."""
        p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=p, is_causal=causal and mask is None,
                      scale=self.softmax_scale, enable_gqa=self.heads != self.groups)
        if p > 0.0 and not self.config.sequence_parallel:
            # Same RNG discipline as megatron's DotProductAttention: dropout differs per TP rank.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, causal)
        if packed_seq_params is not None:
            raise ValueError(f"unsupported packed qkv_format {packed_seq_params.qkv_format!r}")
        if self.cp_group is not None:
            raise ValueError("context parallelism needs packed sequences (qkv_format='thd')")
        sq, b = query.shape[:2]
        mask = None
        if attention_mask is not None:
            # megatron convention: True = do not attend; SDPA adds a float mask to the scores.
            mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            mask.masked_fill_(attention_mask.bool(), _MASKED)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = self._attend(q, k, v, mask, causal)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [s, b, h*d]

    def _forward_packed(
        self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams, causal: bool
    ) -> Tensor:
        """THD: query [t, heads, d]; attention is block-diagonal over ``cu_seqlens``."""
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
            else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None \
            else params.cu_seqlens_kv
        if self.cp_group is not None:
            return self._forward_cp(query, key, value, cu_q, cu_kv, causal)
        tq, tk = query.shape[0], key.shape[0]
        if causal and tq == tk and torch.equal(cu_q.cpu(), cu_kv.cpu()):
            # One causal SDPA per sequence: the cost of the real tokens (sum of L_i^2), not of a
            # T x T block-diagonal mask over the whole pack.
            bounds = cu_q.tolist()
            outs = []
            for a, b in zip(bounds, bounds[1:]):
                q, k, v = (t[a:b].permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
                outs.append(self._attend(q, k, v, None, causal=True).squeeze(0).permute(1, 0, 2))
            return torch.cat(outs).reshape(tq, -1)  # [t, h*d]
        seq_q = torch.bucketize(torch.arange(tq, device=query.device), cu_q[1:].to(query.device),
                                right=True)
        seq_k = torch.bucketize(torch.arange(tk, device=key.device), cu_kv[1:].to(key.device),
                                right=True)
        allowed = seq_q[:, None] == seq_k[None, :]
        if causal:
            pos_q = torch.arange(tq, device=query.device) - cu_q.to(query.device)[seq_q]
            pos_k = torch.arange(tk, device=key.device) - cu_kv.to(key.device)[seq_k]
            allowed &= pos_q[:, None] >= pos_k[None, :]
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed, _MASKED)
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))  # [1, h, t, d]
        out = self._attend(q, k, v, mask, causal=False)
        return out.squeeze(0).permute(1, 0, 2).reshape(tq, -1)  # [t, h*d]

    def _forward_cp(self, query: Tensor, key: Tensor, value: Tensor, cu_q: Tensor, cu_kv: Tensor,
                    causal: bool) -> Tensor:
        """Context parallel: this rank's query tokens (megatron's load-balanced chunks of every
        sequence) attend to the whole sequence's keys and values, all-gathered over the CP group
        (the gradient of each rank's keys / values is summed over the ranks whose queries used
        them). Memory: the full K and V of the micro-batch on every rank, the price of the
        simplest exact scheme; TE's ring attention on GPUs passes them around instead."""
        if not causal or not torch.equal(cu_q.cpu(), cu_kv.cpu()):
            raise ValueError("SDPAttention's context parallelism supports causal self-attention")
        bounds = [int(x) for x in cu_q.tolist()]
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        k_all = gather_packed(key, bounds, self.cp_group, reduce_grad=True)
        v_all = gather_packed(value, bounds, self.cp_group, reduce_grad=True)
        local_pos = shard_positions(bounds, cp, rank).to(query.device)
        outs, start = [], 0
        for a, b in zip(bounds, bounds[1:]):
            n = (b - a) // cp  # this rank's tokens of the sequence
            q = query[start:start + n]
            pos_q = local_pos[start:start + n] - a
            pos_k = torch.arange(b - a, device=query.device)
            mask = torch.zeros((n, b - a), dtype=query.dtype, device=query.device)
            mask.masked_fill_(pos_q[:, None] < pos_k[None, :], _MASKED)
            q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k_all[a:b], v_all[a:b]))
            outs.append(self._attend(q, k, v, mask, causal=False).squeeze(0).permute(1, 0, 2))
            start += n
        return torch.cat(outs).reshape(query.shape[0], -1)  # [t, h*d]
