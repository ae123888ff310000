"""Impossible layouts stop at start-up with an error naming the numbers."""

from __future__ import annotations

import re

import pytest
from launch import sfpo
from tiny_models import write_tiny_config

from sfpo_megatron.distributed.parallel import LayoutError, check_layout

BASE = dict(world_size=4, tp=1, pp=1, num_layers=4, num_attention_heads=8, num_query_groups=4,
            micro_batch_size=1, global_batch_size=8)


@pytest.mark.parametrize("change,message", [
    (dict(tp=3, world_size=3), "tensor-model-parallel-size 3 does not divide the number of "
                               "attention heads 8"),
    (dict(tp=8, world_size=8), "tensor-model-parallel-size 8 does not divide the number of "
                               "key/value heads 4"),
    (dict(pp=3, world_size=3, global_batch_size=3), "pipeline-model-parallel-size 3 does not "
                                                    "divide the number of layers 4"),
    (dict(pp=2, vpp=4), "pipeline-model-parallel-size 2 x virtual-pipeline-model-parallel-size "
                        "4 does not divide the number of layers 4"),
    (dict(tp=2, pp=2, world_size=6), "world size 6 is not a multiple of "
                                     "tensor-model-parallel-size 2 x "
                                     "pipeline-model-parallel-size 2 = 4"),
    (dict(global_batch_size=6, micro_batch_size=1), "global-batch-size 6 is not divisible by "
                                                    "micro-batch-size 1 x data-parallel-size 4 "
                                                    "= 4"),
    (dict(micro_batch_size=0), "--micro-batch-size must be >= 1, got 0"),
])
def test_layout_error_messages(change, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        check_layout(**{**BASE, **change})


def test_valid_layout_returns_dp():
    assert check_layout(**{**BASE, "tp": 2}) == 2


@pytest.mark.flags("--global-batch-size", "--micro-batch-size", "--pipeline-model-parallel-size",
                   cmd="pretrain")
def test_cli_stops_at_startup_with_the_message(tmp_path):
    cfg = write_tiny_config(tmp_path / "m", "qwen2")  # 4 heads, 2 KV heads, 2 layers
    out = sfpo(2, "pretrain", ["--model-config", str(cfg), "--mock-data",
                               "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                               "--global-batch-size", "3", "--train-iters", "1"],
               check=False, timeout=180)
    assert out.returncode != 0
    assert ("global-batch-size 3 is not divisible by micro-batch-size 2 x data-parallel-size 1 "
            "= 2") in out.stderr
    assert "raise LayoutError" not in out.stderr  # one line, not a traceback from the trainer
