"""Single-process worker for tests/test_flag_cases_pretrain.py: many `sfpo-megatron pretrain`
runs in one process (one import of torch / megatron instead of one per run).

Each run is ``build_pretrain_parser().parse_args(argv)`` → ``pretrain(args)`` (what cli.py does),
watched from outside the trainer code: a global module forward hook (torch's
``register_module_forward_hook``) records what the running model is (DDP config, layer count,
embedding rows, parameter dtypes), how many transformer-layer forwards ran and how many child
processes (data-loader workers) were alive; after the run, before the process group is torn down,
the default process group's timeout and the process's RNG states. ``<out>/<name>.pt`` holds them
with the run's metrics.jsonl lines.

    python pretrain_flags_worker.py --runs runs.json --out DIR

runs.json: ``[["name", [argv...]], ...]``; a run named ``convert`` is instead
``tools/convert_hf_to_mcore.py`` with that argv (the runs' starting checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


class Watch:
    """What a run's model did, seen through torch's global forward hook."""

    def __init__(self) -> None:
        self.layer_forwards = 0
        self.max_children = 0  # child processes started during the run, alive at a forward
        self.before = {p.pid for p in multiprocessing.active_children()}
        self.model: dict = {}

    def __call__(self, module, inputs, output) -> None:
        name = type(module).__name__
        if name == "TransformerLayer":
            self.layer_forwards += 1
            new = [p for p in multiprocessing.active_children() if p.pid not in self.before]
            self.max_children = max(self.max_children, len(new))
        elif name == "DistributedDataParallel" and not self.model:
            gpt = module
            while hasattr(gpt, "module"):
                gpt = gpt.module
            cfg = module.ddp_config
            self.model = {
                "overlap_grad_reduce": cfg.overlap_grad_reduce,
                "overlap_param_gather": cfg.overlap_param_gather,
                "use_distributed_optimizer": cfg.use_distributed_optimizer,
                "num_layers": len(gpt.decoder.layers),
                "embedding_rows": gpt.embedding.word_embeddings.weight.shape[0],
                "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            }


def rng_states() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(),
            "random": random.getstate()[1],
            "tracker": {k: v.clone() for k, v in
                        tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def run_pretrain(argv: list[str]) -> dict:
    import torch.distributed as dist

    from sfpo_megatron.arguments import build_pretrain_parser
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.trainer.pretrain import pretrain

    args = build_pretrain_parser().parse_args(argv)
    watch = Watch()
    handle = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        last = pretrain(args)
        pg = dist.distributed_c10d._get_default_group()
        timeout = pg._get_backend(torch.device("cpu")).options._timeout
        rng = rng_states()
    finally:
        handle.remove()
        parallel.destroy()
    metrics = Path(args.log_dir) / "metrics.jsonl" if args.log_dir else None
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics else []
    return {"last": last, "lines": lines, "timeout_s": timeout.total_seconds(), "rng": rng,
            "layer_forwards": watch.layer_forwards, "max_children": watch.max_children,
            "model": watch.model}


def convert(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("convert_hf_to_mcore", TOOLS / "convert_hf_to_mcore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    for name, argv in json.loads(a.runs.read_text()):
        t0 = time.perf_counter()
        if name == "convert":
            convert(argv)
        else:
            torch.save(run_pretrain(argv), a.out / f"{name}.pt")
        print(f"run {name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
