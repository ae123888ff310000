"""megatron-core torch_dist checkpoint → HF directory loadable by ``AutoModelForCausalLM``.

    python tools/convert_mcore_to_hf.py --load OUT --hf-config DIR --save HF_OUT

``--load`` is a checkpoint root (its ``latest_checkpointed_iteration.txt`` is followed) or an
``iter_XXXXXXX`` directory, from the converter or the trainer, at any TP/PP. ``--hf-config``
defaults to ``OUT/hf`` (written by convert_hf_to_mcore.py); when both exist they must describe the
same architecture. Writes sharded safetensors + ``model.safetensors.index.json``, ``config.json``,
``generation_config.json`` and the tokenizer files. Runs as one process by default; large models
can be exported under torchrun with ``--tensor-model-parallel-size`` / ``--pipeline-...``.
Parameters are freed as they are written, so peak memory stays near one model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

PROG = "convert_mcore_to_hf.py"

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy HF-style sharding in tensor order (a tensor above the limit gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root or iter_XXXXXXX directory")
    p.add_argument("--hf-config", default=None,
                   help="HF directory with config.json (+ tokenizer); default: LOAD/hf")
    p.add_argument("--save", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype of the written weights; auto = the HF config's dtype (else fp32)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE models: split the experts over N ranks")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="MoE models: tensor-parallel size of each expert (default: TP)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return p.parse_args(argv)


def _checkpoint_root(load: str) -> str:
    base = os.path.basename(os.path.normpath(load))
    return os.path.dirname(os.path.normpath(load)) if base.startswith("iter_") else load


def resolve_hf_config(load: str, hf_config: str | None) -> tuple[str, "HFArch"]:  # noqa: F821
    """The HF directory describing the checkpoint; refuses one made for another architecture."""
    from sfpo_megatron.conversion.hf_mapping import check_same_architecture
    from sfpo_megatron.models.hf_config import load_hf_config

    saved = os.path.join(_checkpoint_root(load), "hf")
    has_saved = os.path.exists(os.path.join(saved, "config.json"))
    if hf_config is None:
        if not has_saved:
            raise FileNotFoundError(f"{saved}/config.json not found; pass --hf-config DIR (the HF "
                                    "directory the checkpoint was converted from)")
        hf_config = saved
    arch = load_hf_config(hf_config)
    if has_saved and os.path.abspath(saved) != os.path.abspath(hf_config):
        check_same_architecture(arch, saved, f"checkpoint {load} (its hf/config.json)")
    return hf_config, arch


def write_side_files(hf_dir: str, save: str, arch, dtype) -> None:
    """config.json (dtype updated), generation_config.json and the tokenizer files."""
    import shutil

    from transformers import AutoConfig, GenerationConfig

    from sfpo_megatron.conversion.hf_mapping import HF_SIDE_FILES

    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    dtype_name = str(dtype).split(".")[-1]
    config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = \
        dtype_name
    config.setdefault("architectures", [arch.architecture])
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name in HF_SIDE_FILES:
        src = os.path.join(hf_dir, name)
        if name != "config.json" and os.path.exists(src):
            shutil.copyfile(src, os.path.join(save, name))
    if not os.path.exists(os.path.join(save, "generation_config.json")):
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(save)).save_pretrained(save)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from tqdm import tqdm

    from sfpo_megatron.conversion.hf_mapping import hf_shapes, iter_hf_weights
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform
    from sfpo_megatron.errors import UserError
    from sfpo_megatron.models.builder import model_provider
    from sfpo_megatron.models.hf_config import check_parallel_layout, parse_dtype, resolve_dtype

    hf_dir, arch = resolve_hf_config(args.load, args.hf_config)
    try:
        max_bytes = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size: {e}") from None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    check_parallel_layout(arch, tp, pp, ep=ep, etp=etp)  # before any process group exists
    setup_platform()
    env = parallel.initialize(tp=tp, pp=pp, seed=0, ep=ep, etp=etp)
    rank0 = env.rank == 0
    dtype = parse_dtype(resolve_dtype(args.dtype, arch))
    t0 = time.perf_counter()
    model = model_provider(arch, tp=tp, pp=pp, params_dtype=dtype, perform_initialization=False,
                           ep=ep, etp=etp,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    path, iteration = load_model(args.load, [model])
    if rank0:
        print(f"loaded {path} (iteration {iteration}) in {time.perf_counter() - t0:.1f}s",
              flush=True)

    shapes = hf_shapes(arch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {n: itemsize * int(torch.Size(s).numel()) for n, s in shapes.items()}
    shards = plan_shards(sizes, max_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {n: files[i] for i, names in enumerate(shards) for n in names}
    if rank0:
        os.makedirs(args.save, exist_ok=True)
    pending: dict[str, torch.Tensor] = {}
    shard_index = 0
    progress = tqdm(total=len(shapes), desc="export HF weights", unit="tensor", disable=not rank0)
    for name, tensor in iter_hf_weights([model], arch, release=True):
        pending[name] = tensor.to(dtype)
        progress.update()
        if len(pending) == len(shards[shard_index]):
            save_file(pending, os.path.join(args.save, files[shard_index]),
                      metadata={"format": "pt"})
            pending.clear()
            shard_index += 1
    progress.close()
    if rank0:
        if shard_index != len(shards):
            raise RuntimeError(f"export wrote {shard_index} of {len(shards)} planned shards")
        with open(os.path.join(args.save, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": file_of},
                      f, indent=2)
        write_side_files(hf_dir, args.save, arch, dtype)
        print(f"wrote {args.save} ({len(files)} shard(s), {sum(sizes.values()) / 1e6:.1f} MB) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    dist.barrier()
    parallel.destroy()


def load_model(load: str, model_chunks: list) -> tuple[str, int]:
    """Load only the model weights of a torch_dist checkpoint (optimizer state, if any, is
    skipped); a weight the checkpoint lacks or a shape it disagrees on is an error.

    Loads in place: megatron's default path reads each SwiGLU ``linear_fc1`` as two halves,
    concatenates them into a new tensor and copies that into the parameter, i.e. it holds a second
    copy of every fc1 (40% of a Qwen2 model) at its peak. Applying the sharded-tensor factories
    up front makes the halves views of the parameter, so the checkpoint is read straight into it.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from sfpo_megatron.components.checkpoint import CheckpointError, load_sharded, resolve_load_dir
    from sfpo_megatron.conversion.hf_mapping import unwrap

    found = resolve_load_dir(load)
    if found is None:
        raise CheckpointError(f"no checkpoint in {load}")
    path, iteration = found
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    state = {k: unwrap(c).sharded_state_dict() for k, c in zip(keys, model_chunks)}
    apply_factories(state)
    loaded = load_sharded(path, state, StrictHandling.RAISE_UNEXPECTED)

    def settle(requested, got) -> None:  # copy whatever was not read in place
        if isinstance(requested, dict):
            for k in requested:
                settle(requested[k], got[k])
        elif isinstance(requested, list):
            for r, g in zip(requested, got):
                settle(r, g)
        elif isinstance(requested, ShardedTensor) and got.data_ptr() != requested.data.data_ptr():
            requested.data.copy_(got)

    settle(state, loaded)
    return path, iteration


def cli(argv: list[str] | None = None) -> int:
    """``main`` as a command: bad input is one line ``PROG: error: ...``, exit code 2."""
    from sfpo_megatron.cli import run_tool

    return run_tool(PROG, main, argv)


if __name__ == "__main__":  # dist_checkpointing spawns processes: keep the guard
    sys.exit(cli())
