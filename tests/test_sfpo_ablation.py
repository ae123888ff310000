"""benchmarks/sfpo_ablation.py: the held-out task's disjoint questions, the arms' rl flags, the
report rebuilt from run files (numbers by hand), and the --quick smoke run end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import REPO, load_module

from sfpo_megatron.arguments import build_rl_parser
from sfpo_megatron.data.prompts import load_prompt_dataset
from sfpo_megatron.data.rewards import reasoning_gym_reward
from sfpo_megatron.data.tokenizer import load_tokenizer
from sfpo_megatron.demo.pipeline import DemoConfig, Paths, rl_flags
from sfpo_megatron.demo.task import (
    TRAIN_SEED,
    VALID_SEED,
    build_tokenizer,
    get_task,
    heldout_split,
    render_prompt,
    sft_corpus,
)
from sfpo_megatron.rl.loop import check_rl_args
from sfpo_megatron.update.policy_update import passes_per_batch

HELD = get_task("chain_sum_heldout")


def test_heldout_split_has_disjoint_questions_and_counts_the_overlap(tmp_path: Path) -> None:
    out = heldout_split(HELD, 3000, 400, tmp_path)
    rows = {split: [json.loads(line) for line in open(path)] for split, path in out["paths"].items()}
    train_q = {r["prompt"] for r in rows["train"]}
    valid_q = [r["prompt"] for r in rows["valid"]]
    assert len(rows["train"]) == out["train_items"] == 3000
    assert len(valid_q) == len(set(valid_q)) == out["valid_questions"] > 20  # each question once
    assert not train_q & set(valid_q) and out["valid_in_train"] == 0
    assert all(HELD.is_heldout(q) for q in valid_q) and not any(HELD.is_heldout(q) for q in train_q)
    # the SFT corpus leaves the held-out questions out too
    assert not any(text.startswith(render_prompt(q)) for text in sft_corpus(HELD, 500) for q in valid_q)
    # unfiltered, the streams overlap: counted from the plain reasoning-gym streams
    plain_train = {e["question"] for e in HELD.entries(3000, TRAIN_SEED)}
    plain_valid = HELD.entries(400, VALID_SEED)
    overlap = sum(e["question"] in plain_train for e in plain_valid)
    assert out["unfiltered_overlap"] == {"valid_items": 400, "in_train": overlap, "share": overlap / 400}
    assert overlap > 300


def test_heldout_prompt_files_read_like_the_rg_items(tmp_path: Path) -> None:
    """A prompt-file row renders the same prompt as the `rg:` item and scores with reasoning-gym."""
    tok = load_tokenizer(build_tokenizer(sft_corpus(HELD, 2000), tmp_path / "tok", 64))
    out = heldout_split(HELD, 200, 50, tmp_path)
    data = load_prompt_dataset(out["paths"]["valid"], tok)
    for i in range(len(data)):
        item = data[i]
        question = item.metadata["rg_entry"]["question"]
        assert item.prompt_text == render_prompt(question)
        assert reasoning_gym_reward(" " + item.answer, item.answer, item.metadata) == 1.0
        assert reasoning_gym_reward(" 999", item.answer, item.metadata) < 1.0


def test_arms_parse_into_their_settings(tmp_path: Path) -> None:
    bench = load_module(REPO / "benchmarks" / "sfpo_ablation.py")
    specs = bench.arms(stop_step=7)
    cfg = DemoConfig(task="chain_sum_heldout", out=tmp_path)
    jobs = bench.arm_jobs(cfg, Paths(tmp_path), specs, seed=4)
    parsed = {arm: build_rl_parser().parse_args(job.cmd[job.cmd.index("rl") + 1:]) for arm, job in jobs.items()}
    got = {arm: (a.algorithm, a.sfpo_inner_steps, a.sfpo_alpha, a.sfpo_no_slow_pass, a.sfpo_stop_step,
                 passes_per_batch(a)) for arm, a in parsed.items()}
    assert got == {"grpo": ("grpo", 3, 0.8, False, None, 1), "sfpo": ("sfpo", 3, 0.8, False, None, 4),
                   "alpha0.5": ("sfpo", 3, 0.5, False, None, 4), "alpha1.0": ("sfpo", 3, 1.0, False, None, 4),
                   "k1": ("sfpo", 1, 0.8, False, None, 2), "k7": ("sfpo", 7, 0.8, False, None, 8),
                   "no-stage3": ("sfpo", 3, 0.8, True, None, 3), "stop-step": ("sfpo", 3, 0.8, False, 7, 4)}
    for a in parsed.values():
        check_rl_args(a)
        assert (a.seed, a.sfpo_zscore_window, a.sfpo_zscore_threshold, a.lr) == (4, 30, 1.0, 3e-4)
        # the held-out task trains and validates on its prompt files
        assert a.prompt_data == str(tmp_path / "data" / "train_prompts.jsonl")
        assert a.eval_prompt_data == [f"val={tmp_path / 'data' / 'valid_prompts.jsonl'}"]
    assert len({str(job.metrics) for job in jobs.values()}) == len(specs)  # one run directory each
    # the demo task keeps its rg: specs
    assert rl_flags(DemoConfig(), Paths(tmp_path), "sfpo", 0, tmp_path)[7].startswith("rg:basic_arithmetic?")


def _write_run(path: Path, accs: list[float]) -> None:
    """A run evaluated every 5 steps from step 0 (512 rollouts a step), one accuracy each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = []
    for step in range(0, 5 * (len(accs) - 1) + 1):
        rec = {"iteration": step}
        if step:
            rec.update({"rollout/num_samples": 512, "time/step_s": 1.0})
        if step % 5 == 0:
            rec.update({"eval/val/avg@2": accs[step // 5], "eval/val/pass@2": min(1.0, accs[step // 5] + 0.1)})
        recs.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_report_from_runs_by_hand(tmp_path: Path) -> None:
    bench = load_module(REPO / "benchmarks" / "sfpo_ablation.py")
    specs = bench.arms(stop_step=5)
    work = tmp_path / "work"
    root = work / "ablation_basic_arithmetic"
    # seed s, arm a: accuracies 0.5 → best → final; SFPO's best 0.70 / 0.74, GRPO's 0.60 / 0.62
    best = {"grpo": (0.60, 0.62), "sfpo": (0.70, 0.74), "alpha0.5": (0.68, 0.70), "alpha1.0": (0.71, 0.73),
            "k1": (0.65, 0.66), "k7": (0.69, 0.76), "no-stage3": (0.66, 0.72), "stop-step": (0.70, 0.72)}
    for seed in (0, 1):
        for arm, spec in specs.items():
            b = best[arm][seed]
            _write_run(bench.metrics_path(Paths(root), specs, arm, seed), [0.5, b, b - 0.01])
    (root / "warm_start.json").write_text(json.dumps({"task": {"task": "basic_arithmetic"}}))
    argv = ["--seeds", "2", "--report-only", "--tasks", "basic_arithmetic", "--rl-steps", "10",
            "--eval-prompts", "500", "--work", str(work), "--results", str(tmp_path / "res"), "--name", "t"]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "res" / "t.json").read_text())
    assert (tmp_path / "res" / "t.png").read_bytes()[:4] == b"\x89PNG"
    agg = out["tasks"]["basic_arithmetic"]["aggregate"]
    assert agg["k7"]["best"]["mean"] == pytest.approx(0.725)
    assert agg["k7"]["final"]["values"] == pytest.approx([0.68, 0.75])
    d = agg["k1"]["best_minus_sfpo"]  # -0.05 and -0.08: every resample below 0
    assert d["mean"] == pytest.approx(-0.065) and d["ci95"][1] < 0
    assert d["words"] == "lower than SFPO"
    d = agg["alpha1.0"]["best_minus_sfpo"]  # +0.01 and -0.01
    assert d["mean"] == pytest.approx(0.0, abs=1e-12)
    assert d["words"] == "the 95 % CI includes 0: no difference shown"
    assert agg["sfpo"]["best_minus_grpo"]["words"] == "higher than GRPO"
    assert "best_minus_sfpo" not in agg["sfpo"] and "best_minus_grpo" not in agg["grpo"]
    assert out["tasks"]["basic_arithmetic"]["config"]["out"] is None  # no machine path
    assert out["stop_step"] == 5 and out["plot"] == "t.png"
    assert any(line.strip().startswith("k1") and "lower than SFPO" in line for line in out["report"])
    # an unfinished seed is left out of the report
    _write_run(bench.metrics_path(Paths(root), specs, "k7", 1), [0.5, 0.6])
    assert bench.main(argv) == 1  # one finished seed left: no CI, nothing written over


@pytest.mark.slow  # two warm starts and 8 arms x 2 seeds x 2 tasks of RL: minutes
def test_quick_smoke_run_end_to_end(tmp_path: Path) -> None:
    bench = load_module(REPO / "benchmarks" / "sfpo_ablation.py")
    assert bench.main(["--quick", "--seeds", "2", "--work", str(tmp_path / "w"), "--results",
                       str(tmp_path / "res"), "--no-progress"]) == 0
    out = json.loads((tmp_path / "res" / "sfpo_ablation.json").read_text())
    assert set(out["tasks"]) == {"basic_arithmetic", "chain_sum_heldout"}
    held = out["tasks"]["chain_sum_heldout"]["warm_start"]["heldout"]
    assert held["valid_in_train"] == 0 and held["valid_questions"] > 0
    for task in out["tasks"].values():
        assert [s["seed"] for s in task["seeds"]] == [0, 1]
        for s in task["seeds"]:
            assert set(s["arms"]) == set(bench.arms(1))
            assert all(a["curve"]["steps"][-1] == 2 for a in s["arms"].values())
    # the no-Stage-III arm took K passes per step, the others their own
    metrics = [json.loads(line) for line in open(tmp_path / "w" / "ablation_basic_arithmetic" /
                                                 "rl_sfpo_no-stage3_s0" / "logs" / "metrics.jsonl")]
    assert [m["actor/passes"] for m in metrics if "actor/passes" in m] == [3.0, 3.0]
