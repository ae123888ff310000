"""The megatron policy's forward for parity tests, inside a torchrun worker: full (padded) vocab
logits on the last pipeline stage, TP shards gathered."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full (padded) vocab logits on the last pipeline stage (TP shards gathered), on the CPU;
    None on the other stages."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), \
        ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp_size > 1 and pp_rank > 0:
            hidden = torch.empty(s, b, model.config.hidden_size, device=device)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, pos, None)
        if pp_size > 1 and pp_rank < pp_size - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out.float().cpu()
