"""RL algorithm core: GRPO / SFPO / VCPO.

Modules (imported explicitly; ``vocab_parallel`` pulls in megatron-core, the rest only torch):

* ``advantages``      group-normalized GRPO / Dr.GRPO advantages, per-token broadcast
* ``losses``          PPO clipped surrogate, dual clip, entropy bonus, KL, micro-batch-invariant
                      loss aggregation (``token-mean`` / ``seq-mean-token-mean`` /
                      ``seq-mean-token-sum-norm``)
* ``vocab_parallel``  log-probs and entropy from megatron's vocab-parallel logits
* ``sfpo_controller`` the SFPO α schedule (entropy z-score trigger, checkpointable)
* ``vcpo``            VCPO importance weights, ESS-scaled LR, off-policy optimal baseline
"""
