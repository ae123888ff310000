"""Rollout samples → padded training tensors (rl/train_batch.py), on hand-written examples."""

from __future__ import annotations

import pytest
import torch

from sfpo_megatron.records import Sample
from sfpo_megatron.trainer.train_batch import (
    TrainBatch,
    TrainBatchError,
    check_update_layout,
    collate,
    local_mini_batches,
)

PAD = 9


def sample(prompt, response, logprobs=None, advantage=0.5, group=0, version=3) -> Sample:
    return Sample(prompt_index=group, group_id=group, prompt_ids=list(prompt),
                  response_ids=list(response),
                  rollout_logprobs=list(logprobs if logprobs is not None
                                        else [-0.1 * (i + 1) for i in range(len(response))]),
                  weight_version=version, advantage=advantage)


def test_layout_right_padded_labels_shifted_mask_on_response_labels():
    b = collate([sample([5, 6, 7], [20, 21], [-1.0, -2.0], advantage=1.5, group=4, version=7),
                 sample([5], [30, 31, 32, 33], advantage=-0.25, group=4)], PAD, pad_to_multiple=4)
    assert b.tokens.tolist() == [[5, 6, 7, 20, 21, PAD, PAD, PAD],
                                 [5, 30, 31, 32, 33, PAD, PAD, PAD]]
    assert b.labels.tolist() == [[6, 7, 20, 21, PAD, PAD, PAD, PAD],
                                 [30, 31, 32, 33, PAD, PAD, PAD, PAD]]
    assert b.loss_mask.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0],
                                          [1, 1, 1, 1, 0, 0, 0, 0]]
    # Masked labels are exactly the response tokens, in order.
    assert b.labels[0][b.loss_mask[0]].tolist() == [20, 21]
    assert b.rollout_logprobs[0].tolist() == [0, 0, -1.0, -2.0, 0, 0, 0, 0]
    assert b.advantages.tolist() == [1.5, -0.25]
    assert b.group_ids.tolist() == [4, 4] and b.weight_versions.tolist() == [7, 3]
    assert b.old_logprobs is None and b.num_response_tokens == 6


def test_sequence_length_rounding_and_fixed_length():
    s = [sample([1, 2, 3], [4, 5, 6, 7, 8])]  # 8 tokens
    assert collate(s, PAD, pad_to_multiple=1).seq_length == 8
    assert collate(s, PAD, pad_to_multiple=8).seq_length == 8
    assert collate(s, PAD, pad_to_multiple=5).seq_length == 10
    assert collate(s, PAD, seq_length=12).seq_length == 12
    with pytest.raises(TrainBatchError, match="sample 0 has 8 prompt \\+ response tokens, more "
                                              "than the sequence length 7"):
        collate(s, PAD, seq_length=7)


@pytest.mark.parametrize("bad, message", [
    (sample([], [1, 2]), "sample 0 \\(prompt 0\\) has an empty prompt"),
    (sample([1], [2, 3], [-1.0]), "sample 0 \\(prompt 0\\) has 2 response tokens but 1 rollout "
                                  "logprobs"),
    (sample([1, -4], [2]), "sample 0 \\(prompt 0\\) has a negative token id"),
    (sample([1], [2], advantage=float("nan")), "sample 0 \\(prompt 0\\) has advantage nan"),
])
def test_bad_samples_are_named(bad, message):
    with pytest.raises(TrainBatchError, match=message):
        collate([bad], PAD)


def test_empty_inputs_rejected():
    with pytest.raises(TrainBatchError, match="at least one sample"):
        collate([], PAD)
    with pytest.raises(TrainBatchError, match="pad_id must be a token id >= 0, got -1"):
        collate([sample([1], [2])], -1)


def test_update_layout_errors_name_the_numbers():
    check_update_layout(16, 2, 2, 2)
    with pytest.raises(TrainBatchError, match="^rollout batch of 10 samples is not divisible by "
                                              "--num-steps-per-rollout 4$"):
        check_update_layout(10, 4, 1, 1)
    with pytest.raises(TrainBatchError, match="mini-batch of 6 samples \\(12 / "
                                              "--num-steps-per-rollout 2\\) is not divisible by "
                                              "data-parallel size 2 x --micro-batch-size 2 = 4"):
        check_update_layout(12, 2, 2, 2)
    with pytest.raises(TrainBatchError, match="--num-steps-per-rollout must be >= 1, got 0"):
        check_update_layout(12, 0, 1, 1)


def _batch(n: int) -> TrainBatch:
    return collate([sample([1, 2], [10 + i] * (1 + i % 3), advantage=float(i)) for i in range(n)],
                   PAD)


def test_dp_shards_of_mini_batches_cover_each_mini_batch_in_order():
    b = _batch(12)
    shards = [local_mini_batches(b, 3, r, 2) for r in range(2)]
    assert all(len(s) == 3 for s in shards)
    for k, mini in enumerate(b.split(3)):
        joined = TrainBatch.concat([shards[0][k], shards[1][k]])
        assert torch.equal(joined.tokens, mini.tokens)
        assert joined.advantages.tolist() == [float(i) for i in range(4 * k, 4 * k + 4)]
    micro = shards[1][2].micro_batches(1)
    assert [m.advantages.item() for m in micro] == [10.0, 11.0]
    with pytest.raises(TrainBatchError, match="shard of 2 samples does not split into "
                                              "micro-batches of --micro-batch-size 3"):
        shards[1][2].micro_batches(3)


def test_concat_split_round_trip_keeps_optional_fields():
    b = _batch(4)
    b.old_logprobs = torch.randn(b.tokens.shape)
    back = TrainBatch.concat(b.split(2))
    for name in ("tokens", "labels", "loss_mask", "advantages", "old_logprobs"):
        assert torch.equal(getattr(back, name), getattr(b, name))
    assert back.ref_logprobs is None
    parts = b.split(2)
    parts[1].old_logprobs = None
    with pytest.raises(TrainBatchError, match="old_logprobs is set on some batches"):
        TrainBatch.concat(parts)
    with pytest.raises(TrainBatchError, match="labels must be \\[B=4, S=8\\], got \\(4, 7\\)"):
        TrainBatch(b.tokens, b.labels[:, :7], b.loss_mask, b.advantages, b.rollout_logprobs,
                   b.group_ids, b.weight_versions)
