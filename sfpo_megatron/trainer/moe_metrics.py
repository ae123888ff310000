"""Router metrics of mixture-of-experts policies, per update step.

* ``moe/tokens_per_expert_max_over_mean``: how unevenly the routers spread the tokens of the
  step's training forwards over the experts: per MoE layer, the busiest expert's token count over
  the mean count (1 = perfect balance, ``top_k / num_experts`` ... up to ``num_experts / top_k``
  when every token goes to the same experts), the worst layer reported; also the mean over layers.
* ``moe/aux_loss``: megatron's load-balancing loss (without its coefficient) as megatron's router
  logs it, averaged over the MoE layers and the router calls; absent when the coefficient is 0.

Counts come from forward hooks on megatron's ``TopKRouter`` (its routing map) in training mode
only, summed over every rank (a token is routed on exactly one rank, or on every TP rank of its
group without sequence parallelism).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

from sfpo_megatron.distributed.platform import current_platform

AUX_LOSS = "load_balancing_loss"  # megatron's tracker name for the "aux_loss" balancing type


class RouterStats:
    """Hooks the routers of ``model_chunks``; ``collect()`` returns the metrics since the last
    call (collective: every rank calls it)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], config) -> None:
        self.config = config
        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts
        self.routers = [m for c in model_chunks for m in c.modules() if isinstance(m, TopKRouter)]
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64)
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, router: TopKRouter, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = output
        layer = router.layer_number - 1
        self.counts[layer] += routing_map.detach().sum(dim=0).double().cpu()
        self.calls[layer] += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def collect(self) -> dict[str, float]:
        tracker = get_moe_layer_wise_logging_tracker()
        aux = tracker.get(AUX_LOSS, {}).get("values")
        aux_values = torch.zeros(self.num_layers, dtype=torch.float64) if aux is None \
            else aux.detach().double().cpu()
        packed = torch.cat([self.counts.flatten(), self.calls, aux_values])
        if dist.is_initialized():
            # the dense and expert groups both cover every rank: sum over the world
            packed = packed.to(current_platform().device())
            dist.all_reduce(packed)
            packed = packed.cpu()
            if not self.config.sequence_parallel:  # TP ranks route the same tokens
                packed /= ps.get_tensor_model_parallel_world_size()
        n = self.num_layers * self.num_experts
        counts = packed[:n].view(self.num_layers, self.num_experts)
        calls, aux_sum = packed[n:n + self.num_layers], packed[n + self.num_layers:]
        used = counts.sum(dim=1) > 0
        self.counts.zero_()
        self.calls.zero_()
        clear_aux_losses_tracker()
        if not used.any():
            return {}
        ratios = counts[used].max(dim=1).values / counts[used].mean(dim=1)
        out = {"moe/tokens_per_expert_max_over_mean": float(ratios.max()),
               "moe/tokens_per_expert_max_over_mean_layer_avg": float(ratios.mean())}
        if aux is not None and self.config.moe_aux_loss_coeff > 0:
            out["moe/aux_loss"] = float((aux_sum[used] / calls[used]).mean())
        return out

