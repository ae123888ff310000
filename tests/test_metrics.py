"""MetricsLogger: metrics.jsonl lines and TensorBoard events, read back with tensorboard itself."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sfpo_megatron.components.metrics import (
    MetricsError,
    MetricsLogger,
    ThroughputMeter,
    memory_stats,
    read_metrics,
)


def _scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_the_logged_values(tmp_path):
    log_dir, tb_dir = tmp_path / "logs", tmp_path / "tb"
    with MetricsLogger(str(log_dir), str(tb_dir), rank=0) as logger:
        for it in range(1, 4):
            logger.log(it, {"loss": torch.tensor(2.0 / it), "lr": 1e-3 * it, "grad_norm": 0.5 + it,
                            "tokens_per_s": 1000 * it})
            # Each line is on disk as soon as it is logged (flushed), before close().
            assert len((log_dir / "metrics.jsonl").read_text().splitlines()) == it
    lines = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"iteration": 2, "loss": 1.0, "lr": 2e-3, "grad_norm": 2.5, "tokens_per_s": 2000.0}
    assert read_metrics(str(log_dir)) == lines
    scalars = _scalars(tb_dir)
    assert set(scalars) == {"loss", "lr", "grad_norm", "tokens_per_s"}
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([2.0, 1.0, 2.0 / 3])  # float32 events
    assert [v for _, v in scalars["tokens_per_s"]] == [1000.0, 2000.0, 3000.0]


def test_other_ranks_write_nothing_and_the_flag_picks_the_writer(tmp_path):
    quiet = MetricsLogger(str(tmp_path / "l1"), str(tmp_path / "t1"), rank=3)
    quiet.log(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "l1").exists() and not (tmp_path / "t1").exists()
    # e.g. the last pipeline stage's DP rank 0 holds the loss; rank 0 does not.
    MetricsLogger(str(tmp_path / "l2"), None, rank=0, enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "l2").exists()
    with MetricsLogger(str(tmp_path / "l3"), None, rank=1, enabled=True) as last_stage:
        last_stage.log(5, {"loss": 0.25})
    assert read_metrics(str(tmp_path / "l3")) == [{"iteration": 5, "loss": 0.25}]


def test_resume_appends_and_replaces_relogged_iterations(tmp_path):
    log_dir, tb_dir = tmp_path / "logs", tmp_path / "tb"
    with MetricsLogger(str(log_dir), str(tb_dir), rank=0) as logger:
        for it in range(1, 5):
            logger.log(it, {"loss": float(it)})
    # A crash mid-write leaves an unterminated line; the resumed run must not glue onto it.
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "lo')
    # Resume from the checkpoint at iteration 2: iterations 3.. are logged again with new values.
    time.sleep(1.1)  # TensorBoard names event files by the second
    with MetricsLogger(str(log_dir), str(tb_dir), rank=0, start_iteration=3) as logger:
        for it in range(3, 6):
            logger.log(it, {"loss": 10.0 * it})
    records = read_metrics(str(log_dir / "metrics.jsonl"))
    assert [(r["iteration"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert len(read_metrics(str(log_dir), last_per_iteration=False)) == 7
    assert _scalars(tb_dir)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]  # purged


def test_bad_values_and_bad_lines_are_named(tmp_path):
    with MetricsLogger(str(tmp_path), None, rank=0) as logger:
        with pytest.raises(MetricsError, match=r"metric 'loss' = 'high' is not a real number"):
            logger.log(1, {"loss": "high"})
        with pytest.raises(MetricsError, match=r"metric 'loss' is a tensor of shape \(2,\), not a scalar"):
            logger.log(1, {"loss": torch.ones(2)})
        logger.log(1, {"loss": math.nan})  # a diverged loss is still recorded
    assert math.isnan(read_metrics(str(tmp_path))[0]["loss"])
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(str(tmp_path))


def test_memory_and_throughput_helpers():
    before = memory_stats("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB that stays alive
    after = memory_stats("cpu")
    assert after["memory/rss_gib"] - before["memory/rss_gib"] > 50 / 1024  # torch.ones touched every page
    assert after["memory/peak_rss_gib"] >= after["memory/rss_gib"]
    del block
    meter = ThroughputMeter()
    with pytest.raises(RuntimeError, match="before start"):
        meter.tokens_per_second(1)
    meter.start()
    time.sleep(0.05)
    rate = meter.tokens_per_second(1000)
    assert 1000 / 1.0 < rate <= 1000 / 0.05
