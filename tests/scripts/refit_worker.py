"""torchrun worker for tests/test_refit.py: a TP=2 megatron trainer against a real CPU rollout server.

    torchrun --nproc_per_node 2 tests/scripts/refit_worker.py MODEL_DIR SERVER_URL WORKDIR OUT_JSON

1. Logprob parity: responses sampled by the server (temperatures 1.0 and 0.7) are scored by the
   trainer's megatron forward (rl/policy_forward.compute_logprobs); max |Δ| per temperature.
2. For each weight transport (gloo broadcast, disk, and disk with --colocate): one GRPO update
   (rl/sfpo.PolicyUpdater), the server's full log-softmax over the vocabulary on a probe
   sequence before and after ``RolloutEngines.refit`` vs the trainer's (TP-gathered logits), every
   weight read back from the server vs the trainer's HF export, and the reported weight_version.
   The colocated run also records the server's answer to /generate while its memory is released.
Rank 0 writes everything as JSON.
"""

from __future__ import annotations

import json
import sys

import requests
import torch
import torch.distributed as dist

from sfpo_megatron.distributed import parallel
from sfpo_megatron.distributed.platform import setup_platform

PROMPTS = [[5, 17, 42, 99, 3], [250, 7, 7, 130], [64, 65, 66, 67, 68, 69, 70], [11, 300 - 1, 12]]
PROBE = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]


def rl_args(model_dir: str, url: str, workdir: str, transport: str, colocate: bool = False):
    from sfpo_megatron.arguments import build_rl_parser

    argv = ["--model-config", model_dir, "--tensor-model-parallel-size", "2", "--prompt-data", "unused.jsonl",
            "--rollout-backend", "external", "--rollout-urls", url, "--weight-transport", transport,
            # Small buckets: the 27 tensors travel in several buckets.
            "--update-weight-buffer-size", "40000", "--algorithm", "grpo", "--lr", "3e-2",
            "--micro-batch-size", "2", "--rollout-temperature", "1.0", "--seed", "5", "--save", workdir]
    if colocate:
        argv.append("--colocate")
    return build_rl_parser().parse_args(argv)


def trainer_log_softmax(model, tokens: list[int], vocab: int) -> torch.Tensor:
    """Full-vocabulary log-softmax of the trainer's logits: TP shards gathered, padding dropped."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from sfpo_megatron.conversion.hf_mapping import unwrap

    t = torch.tensor([tokens])
    with torch.no_grad():
        logits = unwrap(model[0])(t, torch.arange(len(tokens))[None], None)
        full = gather_from_tensor_model_parallel_region(logits)
    return torch.log_softmax(full[0, :, :vocab].float(), dim=-1)


def server_log_softmax(url: str, tokens: list[int], vocab: int) -> tuple[torch.Tensor, str]:
    """The server's log-softmax at every prompt position (prefill-only scoring request)."""
    r = requests.post(url + "/generate", json={
        "input_ids": tokens, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": vocab}, timeout=120)
    r.raise_for_status()
    meta = r.json()["meta_info"]
    rows = []
    for entry in meta["input_top_logprobs"][1:]:  # position k: token k given tokens < k
        row = torch.empty(vocab, dtype=torch.float64)
        for value, token, _ in entry:
            row[token] = value
        rows.append(row)
    return torch.stack(rows), meta["weight_version"]


def exported(model, arch) -> dict[str, torch.Tensor]:
    from sfpo_megatron.conversion.hf_mapping import iter_hf_weights

    return {name: t.detach().clone() for name, t in iter_hf_weights(model, arch)}


def server_weights(url: str, names_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in names_shapes.items():
        numel = int(torch.Size(shape).numel())
        r = requests.post(url + "/get_weights_by_name", json={"name": name, "truncate_size": numel}, timeout=60)
        r.raise_for_status()
        out[name] = torch.tensor(r.json(), dtype=torch.float32).reshape(shape)
    return out


def main() -> None:
    import faulthandler
    import logging
    import signal

    faulthandler.register(signal.SIGUSR2)
    logging.basicConfig(level=logging.INFO)
    model_dir, url, workdir, out_path = sys.argv[1:5]
    setup_platform()
    from sfpo_megatron.conversion.hf_mapping import load_hf_weights
    from sfpo_megatron.distributed.rank0 import on_rank0
    from sfpo_megatron.models.hf_config import load_hf_config
    from sfpo_megatron.records import Sample
    from sfpo_megatron.rollout.engines import RolloutEngines
    from sfpo_megatron.trainer.model_setup import build_training_setup
    from sfpo_megatron.trainer.policy_forward import compute_logprobs
    from sfpo_megatron.trainer.train_batch import collate
    from sfpo_megatron.update.policy_update import PolicyUpdater

    args = rl_args(model_dir, url, workdir, "distributed")
    parallel.initialize(tp=2, seed=args.seed)
    rank0 = dist.get_rank() == 0
    arch = load_hf_config(model_dir)
    args.calculate_per_token_loss = False
    setup = build_training_setup(args, arch, total_scheduler_steps=10)
    load_hf_weights(setup.model, arch, model_dir)
    setup.optimizer.reload_model_params()
    updater = PolicyUpdater(args, setup, pad_id=0)
    vocab = arch.vocab_size
    results: dict = {"parity": {}, "refit": {}}

    engines = RolloutEngines(args, model_dir, workdir + "/distributed")
    engines.start(setup.model, 0)  # external servers: the initial refit pushes the loaded weights

    def sample(temperature: float, seed: int) -> list[Sample]:
        out = engines.client.generate(PROMPTS, {"max_new_tokens": 12, "temperature": temperature}, n=4,
                                      seed=seed)
        samples = []
        for i, group in enumerate(out):
            for s in group:
                samples.append(Sample(prompt_index=i, group_id=i, prompt_ids=s.prompt_ids,
                                      response_ids=s.output_ids, rollout_logprobs=s.output_logprobs,
                                      weight_version=int(s.weight_version),
                                      reward=float(s.sample_index % 2), advantage=0.0))
        return samples

    # 1. logprob parity, at the weights the server was just given
    for temperature in (1.0, 0.7):
        samples = on_rank0(lambda: sample(temperature, 1234))
        batch = collate(samples, pad_id=0)
        lp = compute_logprobs(setup.model, batch, micro_batch_size=2, temperature=temperature, vocab_size=vocab)
        diff = (lp.logprobs - batch.rollout_logprobs)[batch.loss_mask].abs()
        results["parity"][str(temperature)] = {"max_abs_diff": float(diff.max()), "tokens": int(diff.numel()),
                                               "versions": sorted({s.weight_version for s in samples})}

    # 2. update + refit through each transport
    version = 0
    for name, transport, colocate in (("distributed", "distributed", False), ("disk", "disk", False),
                                      ("colocated_disk", "disk", True)):
        if name != "distributed":
            engines = RolloutEngines(rl_args(model_dir, url, workdir, transport, colocate), model_dir,
                                     f"{workdir}/{name}")
            engines.start(setup.model, version)
        samples = on_rank0(lambda: sample(1.0, 99 + version))
        for s in samples:  # ±1 advantages: a real policy-gradient step
            s.advantage = 1.0 if s.reward > 0 else -1.0
        entry: dict = {}
        if colocate:
            engines.release_memory()
            if rank0:
                r = requests.post(url + "/generate", json={"input_ids": PROBE, "sampling_params": {"max_new_tokens": 1}},
                                  timeout=60)
                entry["generate_while_released"] = r.status_code
        updater.update(samples, version + 1)
        trainer_lp = trainer_log_softmax(setup.model, PROBE, vocab)[:-1]
        if colocate:
            on_rank0(lambda: engines._resume(["weights"]))  # read the stale weights for the "before" check
        if rank0:
            before, v_before = server_log_softmax(url, PROBE, vocab)
            entry["before_max_abs_diff"] = float((before - trainer_lp.double()).abs().max())
            entry["version_before"] = v_before
        if colocate:
            on_rank0(lambda: engines.client.release_memory_occupation())
        stats = engines.refit(setup.model, version + 1)
        version += 1
        weights = exported(setup.model, arch)
        if rank0:
            after, v_after = server_log_softmax(url, PROBE, vocab)
            entry["after_max_abs_diff"] = float((after - trainer_lp.double()).abs().max())
            entry["version_after"] = v_after
            entry["reported_versions"] = engines.client.get_weight_version()
            served = server_weights(url, {n: t.shape for n, t in weights.items()})
            entry["weights_equal"] = all(torch.equal(served[n], weights[n].float()) for n in weights)
            entry["num_weights"] = len(weights)
            entry["num_buckets"] = stats.num_buckets
            entry["gb_per_s"] = stats.gb_per_s
        results["refit"][name] = entry
        if name != "colocated_disk":
            engines.close()
    if rank0:  # a synchronous rollout refuses responses from other weights than it expects
        from sfpo_megatron.data.prompts import PromptItem
        from sfpo_megatron.rollout.generate import RolloutVersionError, generate_groups

        items = [PromptItem(index=41, prompt_ids=PROMPTS[0], prompt_text="", answer="")]
        try:
            generate_groups(engines.client, items, None, None, n=2, params={"max_new_tokens": 2}, seed=1,
                            expected_version="999")
        except RolloutVersionError as e:
            results["version_check"] = str(e)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    engines.close()
    parallel.destroy()


if __name__ == "__main__":
    main()
