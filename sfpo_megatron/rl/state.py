"""The state of an RL run that checkpoints carry, and where a run's policy comes from.

Policy initialisation, in order: the newest checkpoint in ``--save`` (a restarted run continues:
model, optimizer, scheduler, RNG, sampler position, SFPO controller, weight version, step);
``--load`` (a torch_dist checkpoint: an RL checkpoint resumes unless ``--finetune``, any other,
e.g. one converted from HF, gives the weights only); ``--hf-checkpoint`` (HF safetensors).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from sfpo_megatron.components.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_common_state,
    resolve_load_dir,
)
from sfpo_megatron.conversion.hf_mapping import load_hf_weights
from sfpo_megatron.errors import UserError

log = logging.getLogger("sfpo_megatron.rl")

STATE_KEY = "rl"  # extra_state key of RL checkpoints
STATE_VERSION = 1


@dataclass
class RunState:
    step: int = 0  # completed RL steps
    weight_version: int = 0  # the servers' weights; = step after a fresh start
    sampler: dict | None = None
    updater: dict | None = None
    reward_errors: int = 0  # over the whole run, resumes included
    reward_timeouts: int = 0
    async_state: dict | None = None  # AsyncRolloutProducer.state_dict() of an async checkpoint


def peek_extra_state(root: str) -> dict | None:
    """The ``extra_state`` of the checkpoint ``root`` resolves to (read from its common state)."""
    found = resolve_load_dir(root)
    if found is None:
        return None
    return dict(read_common_state(found[0]).get("extra_state") or {})


def init_policy(args: argparse.Namespace, setup, arch) -> RunState:
    """Resume from --save, else initialise from --load / --hf-checkpoint (see the module doc)."""
    if args.save and resolve_load_dir(args.save) is not None:
        res = load_checkpoint(args.save, setup.model, setup.optimizer, setup.scheduler)
        state = res.extra_state.get(STATE_KEY)
        if state is None:
            raise CheckpointError(f"--save {args.save} holds a checkpoint that is not an RL checkpoint "
                                  f"(no {STATE_KEY!r} state): point --save at a new directory")
        log.info("resuming RL run from %s at step %d", args.save, res.iteration)
        return _run_state(state)
    if args.load:
        extra = peek_extra_state(args.load)
        if extra is None:
            raise CheckpointError(f"--load {args.load} holds no checkpoint")
        rl_state = extra.get(STATE_KEY)
        resume = rl_state is not None and not args.finetune
        res = load_checkpoint(args.load, setup.model, setup.optimizer, setup.scheduler,
                              load_optim=resume and not args.no_load_optim,
                              load_rng=resume and not args.no_load_rng)
        if not res.loaded_optimizer:
            setup.optimizer.reload_model_params()
        log.info("policy from %s (%s)", args.load, "resuming its RL state" if resume else "weights only")
        return _run_state(rl_state) if resume else RunState()
    if args.hf_checkpoint:
        load_hf_weights(setup.model, arch, args.hf_checkpoint)
        setup.optimizer.reload_model_params()
        log.info("policy from HF weights %s", args.hf_checkpoint)
        return RunState()
    log.warning("no --save checkpoint, --load or --hf-checkpoint: the policy starts from random weights")
    return RunState()


class ResumeMismatchError(UserError):
    """A resumed run whose flags cannot continue the checkpoint's run."""


def restore_sampler(sampler, state: dict, args: argparse.Namespace) -> None:
    """Continue the checkpoint's prompt stream in ``sampler`` (a ``PromptSampler`` over
    ``--prompt-data``). Its position only means something for the same data and seed, so another
    dataset size or seed is refused naming the flag and both values."""
    size, saved = len(sampler.dataset), state.get("dataset_size")
    if saved is not None and saved != size:
        raise ResumeMismatchError(
            f"--prompt-data {args.prompt_data} has {size} prompts but the checkpoint being resumed "
            f"sampled from {saved}: its prompt order and position do not carry over; resume with "
            "the same --prompt-data, or start a new run (another --save) from its weights with "
            "--load CKPT --finetune")
    if state.get("seed") is not None and state["seed"] != sampler.seed:
        raise ResumeMismatchError(
            f"--seed {sampler.seed} differs from the checkpoint's {state['seed']}: its prompt "
            "order does not carry over; resume with the same --seed")
    try:
        sampler.load_state_dict(state)
    except ValueError as e:  # the remaining checks of the sampler itself
        raise ResumeMismatchError(f"cannot resume the --prompt-data sampler: {e}") from None


def _run_state(state: dict) -> RunState:
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"RL checkpoint state version {state.get('version')!r} is not {STATE_VERSION}")
    return RunState(step=int(state["step"]), weight_version=int(state["weight_version"]),
                    sampler=state["sampler"], updater=state["updater"],
                    reward_errors=int(state["reward_errors"]), reward_timeouts=int(state["reward_timeouts"]),
                    async_state=state.get("async"))
