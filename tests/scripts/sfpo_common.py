"""Shared by the SFPO tests, their torchrun workers and the benchmark: the tiny model, the
deterministic rollout batches and the settings both the megatron run and the plain-PyTorch
reference use.

The model is a bias-free tiny Llama with tied embeddings (hidden 64, 2 layers, vocab 256): no
qkv bias means no exactly-zero-gradient parameters, whose Adam updates amplify rounding noise.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 256
HF_MODEL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=0, eos_token_id=1, tie_word_embeddings=True, rms_norm_eps=1e-6)

# One set of RL settings for the equivalence runs (flag → value).
BATCH = 8  # samples per rollout batch: 2 prompts x 4 responses
SETTINGS = {
    "--lr": "1e-3", "--min-lr": "0", "--lr-decay-style": "linear", "--weight-decay": "0.01",
    "--clip-grad": "1.0", "--num-rollouts": "4", "--num-steps-per-rollout": "2",
    "--micro-batch-size": "1", "--sfpo-inner-steps": "2", "--sfpo-alpha": "0.8",
    "--eps-clip": "0.2", "--entropy-coef": "0.01", "--rollout-temperature": "0.8",
    "--rollout-max-response-len": "10", "--seed": "3",
}


def save_hf_model(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random HF Llama (perturbed so norms are not all ones), saved as safetensors."""
    import transformers

    cfg = transformers.LlamaConfig(**{**HF_MODEL, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


def make_samples(step: int, n_prompts: int = 2, n: int = 4, seed: int = 0,
                 max_prompt: int = 6, max_response: int = 10, vocab: int = VOCAB) -> list:
    """A deterministic rollout batch: varied prompt/response lengths, rewards with one
    all-equal group (zero advantages) and one mixed group."""
    from sfpo_megatron.algorithms.advantages import group_normalized_advantages
    from sfpo_megatron.records import Sample

    rng = random.Random(1000 * seed + step)
    samples = []
    for g in range(n_prompts):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(2, max_prompt))]
        for _ in range(n):
            r = rng.randint(1, max_response)
            samples.append(Sample(
                prompt_index=g, group_id=100 * step + g, prompt_ids=list(prompt),
                response_ids=[rng.randrange(2, vocab) for _ in range(r)],
                rollout_logprobs=[-rng.uniform(0.5, 6.0) for _ in range(r)],
                weight_version=step - 1, reward=float(rng.random() < 0.5)))
    if n_prompts > 1:  # the last group: all rewards equal
        for s in samples[-n:]:
            s.reward = 1.0
    samples[0].reward, samples[1].reward = 1.0, 0.0  # the first group is mixed
    adv = group_normalized_advantages([s.reward for s in samples], [s.group_id for s in samples])
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return samples


def rl_args(model_dir: Path, overrides: dict | None = None, flags: tuple = ()):
    from sfpo_megatron.arguments import build_rl_parser

    settings = {**SETTINGS, **(overrides or {})}
    argv = ["--model-config", str(model_dir)]
    for k, v in settings.items():
        argv.append(f"{k}={v}")
    return build_rl_parser().parse_args(argv + list(flags))


def build_setup(args, model_dir: Path):
    """megatron training setup with the HF weights loaded (and copied into the main params)."""
    from sfpo_megatron.conversion.hf_mapping import load_hf_weights
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.trainer.model_setup import build_training_setup

    arch = load_hf_config(str(model_dir))
    setup = build_training_setup(args, arch, total_scheduler_steps=args.num_rollouts)
    load_hf_weights(setup.model, str(model_dir), str(model_dir))
    setup.optimizer.reload_model_params()
    return setup, arch


def run_worker(scenario) -> None:
    """The workers' command line: ``--hf DIR --out DIR --scenarios a,b,...``; runs
    ``scenario(name, hf, out)`` for each name in this process group and saves its result from
    global rank 0 as ``<out>/<name>.pt``."""
    import argparse
    import gc
    import time
    import traceback

    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenarios", required=True)
    a = p.parse_args()
    from sfpo_megatron.distributed import parallel
    from sfpo_megatron.distributed.platform import setup_platform

    setup_platform()
    for name in a.scenarios.split(","):
        t0 = time.perf_counter()
        try:
            result = scenario(name, a.hf, a.out)
        except Exception:
            traceback.print_exc()
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(result, a.out / f"{name}.pt")
            print(f"scenario {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()
    parallel.destroy()
