"""Load a torch_dist checkpoint's model into one TP=1/PP=1 process and save its parameters
(a local test artifact) so runs at different layouts can be compared tensor by tensor."""

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", required=True)
    p.add_argument("--load", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from sfpo_megatron.arguments import build_pretrain_parser
    from sfpo_megatron.components.checkpoint import load_checkpoint
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.train.model_setup import build_model_chunks, unwrap

    args = build_pretrain_parser().parse_args(["--model-config", a.model_config])
    parallel.initialize(tp=1, pp=1, seed=1)
    chunks = build_model_chunks(args, load_hf_config(a.model_config))
    load_checkpoint(a.load, chunks, load_optim=False, load_rng=False)
    params = {n: t.detach().clone() for n, t in unwrap(chunks[0]).state_dict().items()
              if isinstance(t, torch.Tensor) and "_extra_state" not in n}
    torch.save(params, a.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
