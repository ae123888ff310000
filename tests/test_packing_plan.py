"""The packing plan of --use-dynamic-batch-size (trainer/packing.py), as pure functions of token
counts: budget, coverage, DP balance, equal micro-batch counts, the over-long error; and the
packed tensors' layout (THD rows, cu_seqlens, per-sequence positions, the way back to rows)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sfpo_megatron.errors import UserError
from sfpo_megatron.records import Sample
from sfpo_megatron.trainer.packing import (
    PackSpec,
    balance_over_dp,
    first_fit_decreasing,
    pack_rows,
    pack_shards,
    plan_micro_batches,
)
from sfpo_megatron.trainer.train_batch import collate


def long_tailed(n: int, seed: int, budget: int) -> list[int]:
    rng = random.Random(seed)
    return [min(budget, max(1, round(math.exp(rng.gauss(math.log(64), 1.0))))) for _ in range(n)]


CASES = [(lengths, budget, dp) for seed in range(6) for dp in (1, 2, 4)
         for budget in (1024, 300) for lengths in [long_tailed(32, seed, budget)]]
CASES += [([5, 5, 5, 5], 5, 2), ([1] * 8, 100, 4), ([100, 1, 1, 1], 100, 2), ([7, 3], 10, 2),
          ([9, 9, 9, 9, 9, 9, 1, 1], 10, 2)]


@pytest.mark.parametrize("lengths,budget,dp", CASES)
def test_plan_invariants(lengths, budget, dp):
    plan = plan_micro_batches(lengths, budget, dp)
    assert len(plan) == dp
    # Every sample in exactly one micro-batch.
    seen = sorted(i for rank in plan for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    # The budget holds for every micro-batch.
    for rank in plan:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= budget
    # Every rank runs the same number of micro-batches and holds the same number of samples.
    assert len({len(rank) for rank in plan}) == 1
    assert len({sum(len(mb) for mb in rank) for rank in plan}) == 1
    # DP ranks' token counts are within one longest sequence of each other.
    loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(loads) - min(loads) <= max(lengths)


def test_micro_batch_count_is_first_fit_decreasing():
    # 6+4 | 5+5 | 3+3+2+2: FFD packs to the budget exactly, in 3 micro-batches.
    assert first_fit_decreasing([6, 5, 5, 4, 3, 3, 2, 2], 10) == [[0, 3], [1, 2], [4, 5, 6, 7]]
    # The lower bound ceil(total / budget) is reached on a long-tailed batch at DP=1.
    lengths = long_tailed(64, 0, 1024)
    assert len(first_fit_decreasing(lengths, 2048)) == math.ceil(sum(lengths) / 2048)


def test_balance_is_sorted_round_robin_lightest_first():
    # Rounds (100, 90) → r0, r1; (10, 5) → r1 (lighter), r0; (4, 1) → r1, r0: loads 106, 104.
    assert balance_over_dp([100, 90, 10, 5, 4, 1], 2) == [[0, 3, 5], [1, 2, 4]]


def test_equal_counts_by_splitting():
    # Shards {5, 3} (8 > 7: two micro-batches) and {4, 3} (7: one, split to match).
    assert plan_micro_batches([5, 4, 3, 3], 7, 2) == [[[0], [3]], [[1], [2]]]


def test_empty_micro_batch_when_nothing_is_left_to_split():
    # Equal sample counts always leave something to split; shards of unequal counts may not.
    assert pack_shards([[5, 5], [3]], 5) == [[[0], [1]], [[0], []]]


def test_over_long_sample_is_an_error_naming_both_numbers():
    with pytest.raises(UserError) as e:
        plan_micro_batches([10, 300, 20, 5], 256, 2)
    assert str(e.value) == ("sample 1 has 300 tokens (prompt + response), more than "
                            "--max-tokens-per-gpu 256")
    with pytest.raises(UserError, match="does not split into data-parallel size 2"):
        plan_micro_batches([1, 2, 3], 10, 2)


def sample(prompt, response):
    return Sample(prompt_index=0, group_id=0, prompt_ids=prompt, response_ids=response,
                  rollout_logprobs=[-1.0] * len(response), weight_version=0, reward=0.0,
                  advantage=0.5)


def test_packed_tensors_layout_and_unpack():
    batch = collate([sample([11, 12], [13, 14]), sample([21], [22]), sample([31, 32, 33], [34])],
                    pad_id=0)
    mb = pack_rows(batch, [2, 0], PackSpec(max_tokens=16, pad_id=0, multiple=4))
    assert mb.tokens.tolist() == [[31, 32, 33, 34, 11, 12, 13, 14]]
    assert mb.labels.tolist() == [[32, 33, 34, 0, 12, 13, 14, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert mb.cu_seqlens.tolist() == [0, 4, 8] and mb.max_seqlen == 4 and mb.real_tokens == 8
    # Padded to a multiple of 4: the padding is a segment of its own.
    mb2 = pack_rows(batch, [1, 0], PackSpec(max_tokens=16, pad_id=0, multiple=4))
    assert mb2.tokens.tolist() == [[21, 22, 11, 12, 13, 14, 0, 0]]
    assert mb2.cu_seqlens.tolist() == [0, 2, 6, 8]
    assert mb2.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 0, 1]]
    # The rows the loss sees are the padded rows (cut to the longest), in pack order.
    assert mb2.rows.tokens.tolist() == [[21, 22, 0, 0], [11, 12, 13, 14]]
    assert mb2.rows.loss_mask.tolist() == batch.loss_mask[[1, 0], :4].tolist()
    values = torch.arange(1.0, 9.0).reshape(1, 8)
    assert mb2.unpack(values).tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    # Fixed length (pipeline parallelism) and an empty micro-batch (nothing to learn from).
    empty = pack_rows(batch, [], PackSpec(max_tokens=16, pad_id=0, fixed_length=16))
    assert empty.tokens.shape == (1, 16) and empty.index == [] and not empty.rows.loss_mask.any()
    assert empty.cu_seqlens.tolist() == [0, 16]
    with pytest.raises(UserError, match="micro-batch of 8 tokens is over --max-tokens-per-gpu 6"):
        pack_rows(batch, [2, 0], PackSpec(max_tokens=6, pad_id=0))
