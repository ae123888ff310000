"""HuggingFace checkpoint → megatron-core torch_dist checkpoint that the trainer's --load reads.

    torchrun --nproc_per_node N tools/convert_hf_to_mcore.py --hf-dir DIR --save OUT \\
        --tensor-model-parallel-size T --pipeline-model-parallel-size P \
        [--expert-model-parallel-size E]

(also under ``srun``, or plain ``python`` for N=1). Each rank builds its TP/PP shard of the model
and reads only its slices of the safetensors shards (``SafetensorsSource``), so no process holds
the whole HF model. Output: ``OUT/iter_0000000/`` (dist_checkpointing, written by
``components.checkpoint.save_checkpoint``) + ``OUT/latest_checkpointed_iteration.txt`` + the HF
config / generation config / tokenizer files in ``OUT/hf/``. The trainer can load the result at
any TP/PP (megatron reshards; padded vocab rows are re-padded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROG = "convert_hf_to_mcore.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint root")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE models: split the experts over N ranks")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="MoE models: tensor-parallel size of each expert (default: TP)")
    p.add_argument("--params-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype of the saved weights; auto = the HF config's dtype (else fp32)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return p.parse_args(argv)


class SplitStateForSave:
    """Stands in for a model chunk in ``save_checkpoint`` (which only asks for
    ``sharded_state_dict()``): the same state, with each SwiGLU ``linear_fc1`` already split into
    gate / up tensors of their own and the fused parameter freed.

    megatron's saver splits fc1 into two views and clones every view before writing, which holds
    a second copy of all fc1 weights (40% of a Qwen2 model) at the save's peak. Splitting one
    parameter at a time and freeing it keeps the peak at one model. The model is unusable after.
    """

    def __init__(self, model) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        self.state = model.sharded_state_dict()
        apply_factories(self.state)  # the fc1 factories become ShardedTensors viewing halves
        owner = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
        views: dict[int, list] = {}
        for sh in nested_values(self.state):
            if isinstance(sh, ShardedTensor) and sh.data is not None and \
                    sh.data.untyped_storage().nbytes() != sh.data.numel() * sh.data.element_size():
                views.setdefault(sh.data.untyped_storage().data_ptr(), []).append(sh)
        for ptr, shards in views.items():
            for sh in shards:
                sh.data = sh.data.clone()
            if ptr in owner:
                owner[ptr].data = owner[ptr].data.new_empty(0)

    def sharded_state_dict(self, *args, **kwargs) -> dict:
        return self.state


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch.distributed as dist

    from sfpo_megatron.components.checkpoint import save_checkpoint
    from sfpo_megatron.conversion.hf_mapping import copy_hf_side_files, load_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.models.builder import model_provider
    from sfpo_megatron.models.hf_config import (
        check_parallel_layout,
        load_hf_config,
        resolve_dtype,
    )

    tp, pp, vpp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                   args.virtual_pipeline_model_parallel_size)
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    arch = load_hf_config(args.hf_dir)
    check_parallel_layout(arch, tp, pp, vpp, ep, etp)  # before any process group exists
    setup_platform()
    env = parallel.initialize(tp=tp, pp=pp, vpp=vpp, seed=0, ep=ep, etp=etp)
    rank0 = env.rank == 0
    dtype = resolve_dtype(args.params_dtype, arch)
    t0 = time.perf_counter()
    chunks = [
        model_provider(arch, tp=tp, pp=pp, vpp=vpp, params_dtype=dtype,
                       vp_stage=i if vpp else None, perform_initialization=False, ep=ep, etp=etp,
                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        for i in range(vpp or 1)
    ]
    load_hf_weights(chunks, arch, args.hf_dir, progress=rank0)
    if rank0:
        print(f"loaded {args.hf_dir} into megatron (tp={tp} pp={pp} ep={ep}, {dtype}) in "
              f"{time.perf_counter() - t0:.1f}s; saving torch_dist checkpoint...", flush=True)
    t1 = time.perf_counter()
    path = save_checkpoint(args.save, 0, [SplitStateForSave(c) for c in chunks],
                           extra_state={"converted_from_hf": True})
    if rank0:
        copied = copy_hf_side_files(args.hf_dir, os.path.join(args.save, "hf"))
        print(f"saved {path} in {time.perf_counter() - t1:.1f}s; copied {', '.join(copied)} "
              f"to {os.path.join(args.save, 'hf')}", flush=True)
    dist.barrier()
    parallel.destroy()


def cli(argv: list[str] | None = None) -> int:
    """``main`` as a command: bad input is one line ``PROG: error: ...``, exit code 2."""
    from sfpo_megatron.cli import run_tool

    return run_tool(PROG, main, argv)


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep the guard
    sys.exit(cli())
