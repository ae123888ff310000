"""The demo's pieces: task specs, tokenizer and SFT format, reward, report numbers and plot, flags."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from launch import REPO, load_module

from sfpo_megatron.data.prompts import load_prompt_dataset, parse_rg_spec
from sfpo_megatron.data.rewards import reasoning_gym_reward
from sfpo_megatron.data.tokenizer import load_tokenizer
from sfpo_megatron.demo.report import (
    Curve,
    ReportError,
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    compare,
    curve_from_metrics,
    describe_ci,
    eval_standard_error,
    format_summary,
    format_table,
    plot_curves,
    summarize_seeds,
)
from sfpo_megatron.demo.task import (
    TASKS,
    VALID_SEED,
    DemoTaskError,
    build_tokenizer,
    exact_match_reward,
    get_task,
    render_prompt,
    sft_corpus,
    sft_text,
)

TASK = get_task("basic_arithmetic")


# ------------------------------------------------------------------------------------------ task


def test_spec_round_trips_through_the_loops_parser() -> None:
    spec = TASK.spec(50, 7)
    name, config = parse_rg_spec(spec)
    assert name == "basic_arithmetic"
    # "+" survives the query string (unquoted it would come back as a space)
    assert config == {"size": 50, "seed": 7, **TASK.config}
    assert config["operators"] == ("+", "-")


def test_unknown_task_names_the_presets() -> None:
    with pytest.raises(DemoTaskError, match=r"unknown demo task 'nope'; known: basic_arithmetic, chain_sum"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_items_are_small_two_term_sums(name: str) -> None:
    entries = get_task(name).entries(200, 3)
    for e in entries:
        expr = e["metadata"]["expression"]
        a, op, b = expr.split()
        assert op in "+-" and 0 <= int(a) <= 10 and 0 <= int(b) <= 10
        assert int(e["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = sft_corpus(TASK, 3000)
    return load_tokenizer(build_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", 64))


def test_sft_text_is_the_loops_prompt_followed_by_the_answer(tokenizer) -> None:
    spec = TASK.spec(40, VALID_SEED)
    dataset = load_prompt_dataset(spec, tokenizer)
    for i in range(len(dataset)):
        item = dataset[i]
        question = item.metadata["rg_entry"]["question"]
        assert item.prompt_text == render_prompt(question)
        text = sft_text(question, item.answer)
        assert text == item.prompt_text + " " + item.answer
        # The ids the SFT model trains on start with exactly the ids the RL loop prompts with.
        full = tokenizer.encode(text)
        assert full[: len(item.prompt_ids)] == item.prompt_ids
        assert full == item.prompt_ids + tokenizer.encode(" " + item.answer)
        assert tokenizer.decode(full) == text


def test_tokenizer_is_small_with_single_digit_tokens(tokenizer) -> None:
    assert tokenizer.vocab_size <= 64
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 3)
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode(" -12 + 107")]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
    # BPE merges the fixed words: a prompt is short
    assert len(tokenizer.encode(render_prompt("Calculate 10 - 2."))) <= 14


def test_exact_match_reward_refuses_partial_credit() -> None:
    entry = next(e for e in TASK.entries(50, 1) if len(e["answer"]) == 1)
    meta = {"rg_dataset": TASK.name, "rg_config": {**TASK.config, "size": 50, "seed": 1}, "rg_entry": entry}
    answer = entry["answer"]
    assert exact_match_reward(" " + answer, answer, meta) == 1.0
    wrong = "1" + answer  # contains the reference: reasoning-gym gives partial credit
    assert 0.0 < reasoning_gym_reward(wrong, answer, meta) < 1.0
    assert exact_match_reward(wrong, answer, meta) == 0.0


# ---------------------------------------------------------------------------------------- report


def _records(accs: list[float], method: str, per_step: int = 512, step_s: float = 2.0,
             eval_s: float = 0.5, trigger: int | None = None) -> list[dict]:
    """metrics.jsonl records of a run evaluated every 2 steps (step 0 = warm start)."""
    recs = [{"iteration": 0, "eval/val/avg@2": accs[0], "eval/val/pass@2": min(1.0, accs[0] + 0.2),
             "time/eval_s": eval_s}]
    for step in range(1, 2 * (len(accs) - 1) + 1):
        rec = {"iteration": step, "rollout/num_samples": per_step, "time/step_s": step_s,
               "sfpo/trigger_step": -1 if trigger is None or step < trigger else trigger}
        if step % 2 == 0:
            rec.update({"eval/val/avg@2": accs[step // 2], "eval/val/pass@2": min(1.0, accs[step // 2] + 0.2),
                        "time/eval_s": eval_s, "time/step_s": step_s + eval_s})
        recs.append(rec)
    return recs


def test_curve_from_metrics_counts_rollouts_and_training_time() -> None:
    curve = curve_from_metrics(_records([0.40, 0.45, 0.52, 0.50], "grpo"), "GRPO")
    assert curve.steps == [0, 2, 4, 6]
    assert curve.rollouts == [0, 1024, 2048, 3072]
    assert curve.accuracy == [0.40, 0.45, 0.52, 0.50]
    assert curve.wall_s == pytest.approx([0.0, 4.0, 8.0, 12.0])  # evaluation time excluded
    assert curve.pass_at_k == pytest.approx([0.60, 0.65, 0.72, 0.70])
    assert curve.trigger_step is None
    assert curve_from_metrics(_records([0.4, 0.5, 0.6], "sfpo", trigger=3), "SFPO").trigger_step == 3


def test_curve_needs_evaluations() -> None:
    with pytest.raises(ReportError, match="no eval/val/avg@k metric"):
        curve_from_metrics([{"iteration": 1, "rollout/num_samples": 8}], "GRPO", eval_name="val")


PASSES = {"grpo": 1, "grpo-e4": 4, "sfpo": 4}


def test_rollouts_to_reach_each_controls_best() -> None:
    grpo = curve_from_metrics(_records([0.40, 0.45, 0.52, 0.50, 0.52], "g"), "GRPO")
    e4 = curve_from_metrics(_records([0.40, 0.50, 0.55, 0.58, 0.57], "e"), "GRPO-E4")
    sfpo = curve_from_metrics(_records([0.40, 0.53, 0.51, 0.60, 0.55], "s", trigger=5), "SFPO")
    c = compare(grpo, sfpo)
    assert (c.control, c.control_best, c.sfpo_best) == ("grpo", 0.52, 0.60)
    assert c.control_rollouts == 2048  # GRPO's first evaluation at its best (step 4)
    assert c.sfpo_rollouts == 1024  # SFPO's first at >= 0.52 (step 2)
    assert c.rollout_ratio == 2.0
    assert (c.control_wall_s, c.sfpo_wall_s, c.time_ratio) == (8.0, 4.0, 2.0)
    assert c.sfpo_trigger_step == 5
    d = compare(e4, sfpo)
    assert (d.control, d.control_best, d.control_rollouts, d.sfpo_rollouts) == ("grpo-e4", 0.58, 3072, 3072)
    assert d.rollout_ratio == 1.0

    table = format_table({"grpo": grpo, "grpo-e4": e4, "sfpo": sfpo}, [c, d], PASSES, ["one seed"])
    lines = table.splitlines()
    assert lines[0].split() == ["step", "rollouts", "GRPO", "acc", "%", "GRPO-E4", "acc", "%", "SFPO", "acc", "%"]
    assert lines[1].split() == ["0", "0", "40.0", "40.0", "40.0"]
    assert lines[3].split() == ["4", "2,048", "52.0", "55.0", "51.0"]
    assert "best validation accuracy: GRPO 52.0 %, GRPO-E4 58.0 %, SFPO 60.0 %" in lines
    assert "SFPO vs GRPO (1 vs 4 optimizer passes per rollout batch):" in lines
    assert "  rollouts to reach GRPO's best (52.0 %): GRPO 2,048, SFPO 1,024  (GRPO/SFPO = 2.00x)" in lines
    assert "  training wall-clock to reach it: GRPO 8 s, SFPO 4 s  (GRPO/SFPO = 2.00x)" in lines
    assert ("SFPO vs GRPO-E4 (4 vs 4 optimizer passes per rollout batch, the same optimizer steps):"
            in lines)
    assert ("  rollouts to reach GRPO-E4's best (58.0 %): GRPO-E4 3,072, SFPO 3,072  (GRPO-E4/SFPO = 1.00x)"
            in lines)
    assert lines[-2:] == ["SFPO entropy switch-off: step 5", "one seed"]


def test_sfpo_that_never_reaches_and_a_warm_start_best() -> None:
    grpo = curve_from_metrics(_records([0.40, 0.45, 0.52], "g"), "GRPO")
    low = curve_from_metrics(_records([0.40, 0.41, 0.50], "s"), "SFPO")
    c = compare(grpo, low)
    assert c.sfpo_rollouts is None and c.rollout_ratio is None and c.time_ratio is None
    assert "GRPO 2,048, SFPO never  (GRPO/SFPO = -)" in format_table({"grpo": grpo, "sfpo": low}, [c])
    flat = curve_from_metrics(_records([0.40, 0.30, 0.35], "g"), "GRPO-E4")
    c = compare(flat, low)
    assert (c.control_rollouts, c.sfpo_rollouts, c.rollout_ratio) == (0, 0, None)
    assert "n/a: GRPO-E4 never beat the warm start" in format_table({"grpo-e4": flat, "sfpo": low}, [c])


def test_curve_rejects_mismatched_lengths() -> None:
    with pytest.raises(ReportError, match="accuracy has 1 entries for 2 evaluations"):
        Curve("GRPO", [0, 1], [0, 8], [0.5], [0.0, 1.0])


def test_plot_is_written(tmp_path: Path) -> None:
    grpo = curve_from_metrics(_records([0.40, 0.45, 0.52], "g"), "GRPO")
    e4 = curve_from_metrics(_records([0.40, 0.48, 0.53], "e"), "GRPO-E4 seed 0")
    sfpo = curve_from_metrics(_records([0.40, 0.50, 0.55], "s"), "SFPO")
    path = plot_curves([grpo, e4, sfpo], tmp_path / "sub" / "plot.png", title="t",
                       targets={"GRPO best": 0.52, "GRPO-E4 best": 0.53})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_eval_standard_error_matches_the_per_prompt_variance() -> None:
    rng = np.random.default_rng(0)
    # 1000 prompts with different difficulties, 2 samples each
    p = rng.beta(2, 2, size=1000)
    correct = rng.random((1000, 2)) < p[:, None]
    means = correct.mean(1)
    avg, pass2 = means.mean(), correct.any(1).mean()
    expected = means.std() / math.sqrt(1000)  # population std of per-prompt means
    assert eval_standard_error(avg, 1000, 2, pass2) == pytest.approx(expected, rel=1e-9)
    # k = 1: Bernoulli; k > 2: the p(1-p) bound
    assert eval_standard_error(0.5, 400, 1) == pytest.approx(0.025)
    assert eval_standard_error(0.5, 400, 4, 0.9) == pytest.approx(0.025)
    with pytest.raises(ReportError, match="n_prompts >= 1"):
        eval_standard_error(0.5, 0, 2)


def _exact_bootstrap(stat, values: list[tuple[float, ...]]) -> np.ndarray:
    """The statistic over every one of the n^n equally likely resamples of n seeds."""
    n = len(values)
    return np.array([stat([values[i] for i in idx]) for idx in itertools.product(range(n), repeat=n)])


def _check_percentile(draws: np.ndarray, q: float, level: float, tol: float = 0.004) -> None:
    """``q`` is a ``level`` quantile of the exact distribution ``draws`` (up to Monte Carlo error)."""
    assert np.mean(draws < q - 1e-12) <= level + tol
    assert np.mean(draws <= q + 1e-12) >= level - tol


def test_bootstrap_ratio_ci_matches_the_exact_bootstrap_distribution() -> None:
    num, den = [4.0, 5.0, 7.5, 5.0, 3.0], [2.0, 2.2, 3.0, 2.5, 1.9]
    point, lo, hi = bootstrap_ratio_ci(num, den, n_boot=100_000)
    assert point == pytest.approx(sum(num) / sum(den))
    exact = _exact_bootstrap(lambda rows: sum(r[0] for r in rows) / sum(r[1] for r in rows),
                             list(zip(num, den)))
    _check_percentile(exact, lo, 0.025)
    _check_percentile(exact, hi, 0.975)
    assert bootstrap_ratio_ci(num, den, n_boot=2000) == bootstrap_ratio_ci(num, den, n_boot=2000)  # seeded
    assert bootstrap_ratio_ci([3.0], [1.5]) == (2.0, 2.0, 2.0)
    with pytest.raises(ReportError, match="matching, non-empty"):
        bootstrap_ratio_ci([1.0], [1.0, 2.0])


def test_bootstrap_mean_ci_matches_the_exact_bootstrap_distribution() -> None:
    diffs = [0.02, -0.01, 0.05, 0.00, 0.11]
    mean, lo, hi = bootstrap_mean_ci(diffs, n_boot=100_000)
    assert mean == pytest.approx(0.034)
    exact = _exact_bootstrap(lambda rows: sum(r[0] for r in rows) / len(rows), [(d,) for d in diffs])
    _check_percentile(exact, lo, 0.025)
    _check_percentile(exact, hi, 0.975)


def test_describe_ci_says_when_the_interval_includes_no_difference() -> None:
    more, fewer = "SFPO needs fewer rollouts than GRPO", "SFPO needs more rollouts than GRPO"
    assert describe_ci(0.8, 1.6, 1.0, more, fewer) == "the 95 % CI includes 1: no difference shown"
    assert describe_ci(1.0, 1.6, 1.0, more, fewer) == "the 95 % CI includes 1: no difference shown"
    assert describe_ci(0.5, 1.0, 1.0, more, fewer) == "the 95 % CI includes 1: no difference shown"
    assert describe_ci(1.01, 1.6, 1.0, more, fewer) == more
    assert describe_ci(0.5, 0.99, 1.0, more, fewer) == fewer
    assert describe_ci(-0.02, 0.03, 0.0, "higher", "lower") == "the 95 % CI includes 0: no difference shown"
    assert describe_ci(0.01, 0.03, 0.0, "higher", "lower") == "higher"


def _seed(seed: int, best: dict[str, float], vs: dict[str, tuple]) -> dict:
    """One seed's results; vs: {control: (control rollouts, SFPO rollouts or None, control s, SFPO s)}."""
    rows = {}
    for control, (cr, sr, cs, ss) in vs.items():
        rows[control] = {"control": control, "control_best": best[control], "sfpo_best": best["sfpo"],
                         "control_rollouts": cr, "control_wall_s": cs, "sfpo_rollouts": sr,
                         "sfpo_wall_s": ss, "sfpo_trigger_step": None,
                         "rollout_ratio": None if not sr else cr / sr,
                         "time_ratio": None if not sr else cs / ss}
    return {"seed": seed, "best": best, "vs": rows}


def test_summarize_seeds_gives_ratios_of_means_with_cis_in_words() -> None:
    per_seed = [
        _seed(0, {"grpo": 0.66, "grpo-e4": 0.80, "sfpo": 0.81},
              {"grpo": (20480, 7680, 160.0, 80.0), "grpo-e4": (10240, 12800, 90.0, 100.0)}),
        _seed(1, {"grpo": 0.67, "grpo-e4": 0.79, "sfpo": 0.80},
              {"grpo": (17920, 7680, 150.0, 70.0), "grpo-e4": (12800, 10240, 100.0, 85.0)}),
        _seed(2, {"grpo": 0.65, "grpo-e4": 0.82, "sfpo": 0.79},
              {"grpo": (20480, 5120, 170.0, 50.0), "grpo-e4": (15360, None, 120.0, None)}),
    ]
    agg = summarize_seeds(per_seed)
    assert agg["seeds"] == 3
    assert agg["best_mean"] == pytest.approx({"grpo": 0.66, "grpo-e4": 0.80333333, "sfpo": 0.8})
    g, e = agg["vs"]["grpo"], agg["vs"]["grpo-e4"]
    # every resample's GRPO/SFPO ratio is above 1: the CI is, and the words say so
    assert g["rollout_ratio"]["ratio_of_means"] == pytest.approx((20480 + 17920 + 20480) / (7680 * 2 + 5120))
    assert g["rollout_ratio"]["ci95"][0] > 1.0
    assert g["rollout_ratio"]["words"] == "SFPO needs fewer rollouts than GRPO"
    assert g["best_diff"]["words"] == "SFPO's best is higher than GRPO's"
    assert (g["seeds_sfpo_reached"], g["seeds_in_ratios"]) == (3, 3)
    # against GRPO-E4: seed 2 never reached, the two others' ratios straddle 1
    assert (e["seeds_sfpo_reached"], e["seeds_in_ratios"]) == (2, 2)
    assert e["rollout_ratio"]["ratio_of_means"] == pytest.approx((10240 + 12800) / (12800 + 10240))
    lo, hi = e["rollout_ratio"]["ci95"]
    assert lo < 1.0 < hi
    assert e["rollout_ratio"]["words"] == "the 95 % CI includes 1: no difference shown"
    assert e["best_diff"]["mean"] == pytest.approx((0.01 + 0.01 - 0.03) / 3)
    assert e["best_diff"]["words"] == "the 95 % CI includes 0: no difference shown"

    text = format_summary(per_seed, agg, PASSES)
    lines = text.splitlines()
    assert lines[1].split() == ["seed", "GRPO", "GRPO-E4", "SFPO"]
    assert lines[5].split() == ["mean", "66.0", "80.3", "80.0"]
    assert "SFPO vs GRPO-E4 (4 vs 4 optimizer passes per rollout batch, the same optimizer steps):" in lines
    assert "  SFPO reached GRPO's best in 3 of 3 seeds" in lines
    assert ("  SFPO reached GRPO-E4's best in 2 of 3 seeds (the ratios below leave out the seeds where "
            "it never did: they favour SFPO)" in lines)
    assert any(line.startswith("  GRPO-E4/SFPO rollouts to GRPO-E4's best: 1.00x (95 % CI ")
               and line.endswith(", 2 seeds): the 95 % CI includes 1: no difference shown") for line in lines)
    assert any(line.startswith("  best accuracy, SFPO - GRPO-E4: -0.3 points (95 % CI ")
               and line.endswith("the 95 % CI includes 0: no difference shown") for line in lines)
    one = summarize_seeds(per_seed[:1])["vs"]["grpo"]
    assert one["rollout_ratio"]["ci95"] == [20480 / 7680] * 2
    assert one["rollout_ratio"]["words"] == one["best_diff"]["words"] == "one seed: no confidence interval"
    with pytest.raises(ReportError, match="no seeds"):
        summarize_seeds([])


def _write_run(path: Path, accs: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(accs, "x")))


def test_benchmark_rebuilds_its_results_from_the_runs(tmp_path: Path) -> None:
    bench = load_module(REPO / "benchmarks" / "sfpo_vs_grpo.py")
    work = tmp_path / "work"
    runs = {  # per seed and arm: accuracy at steps 0, 2, 4, 6, 8 (512 rollouts a step)
        0: {"grpo": [0.40, 0.45, 0.52, 0.50, 0.52], "grpo-e4": [0.40, 0.50, 0.55, 0.58, 0.57],
            "sfpo": [0.40, 0.53, 0.51, 0.60, 0.55]},
        1: {"grpo": [0.40, 0.48, 0.47, 0.50, 0.49], "grpo-e4": [0.40, 0.56, 0.61, 0.59, 0.60],
            "sfpo": [0.40, 0.44, 0.51, 0.57, 0.59]},
    }
    for seed, arms in runs.items():
        for arm, accs in arms.items():
            _write_run(work / f"rl_{arm}_s{seed}" / "logs" / "metrics.jsonl", accs)
    (work / "timings.json").write_text(json.dumps({"rl_s0": {"wall_s": 30.0, "cpu_s": 50.0}}))
    argv = ["--seeds", "2", "--report-only", "--work", str(work), "--results", str(tmp_path / "res"),
            "--name", "t", "--rl-steps", "8", "--eval-prompts", "1000"]
    assert bench.main(argv) == 0
    out = json.loads((tmp_path / "res" / "t.json").read_text())
    assert (tmp_path / "res" / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert out["arms"] == {"grpo": {"algorithm": "grpo", "ppo_epochs": 1, "passes_per_batch": 1},
                           "grpo-e4": {"algorithm": "grpo", "ppo_epochs": 4, "passes_per_batch": 4},
                           "sfpo": {"algorithm": "sfpo", "ppo_epochs": 1, "passes_per_batch": 4}}
    assert [s["best"] for s in out["seeds"]] == [{"grpo": 0.52, "grpo-e4": 0.58, "sfpo": 0.60},
                                                 {"grpo": 0.50, "grpo-e4": 0.61, "sfpo": 0.59}]
    # rollouts to each control's best, by hand: the first evaluation at or above it
    vs = [(s["vs"]["grpo"], s["vs"]["grpo-e4"]) for s in out["seeds"]]
    assert [(g["control_rollouts"], g["sfpo_rollouts"]) for g, _ in vs] == [(2048, 1024), (3072, 2048)]
    assert [(e["control_rollouts"], e["sfpo_rollouts"]) for _, e in vs] == [(3072, 3072), (2048, None)]
    agg = out["aggregate"]["vs"]
    assert agg["grpo"]["rollout_ratio"]["ratio_of_means"] == pytest.approx(5120 / 3072)
    assert agg["grpo-e4"]["rollout_ratio"]["ratio_of_means"] == 1.0  # seed 1 never reached: left out
    assert (agg["grpo-e4"]["seeds_sfpo_reached"], agg["grpo-e4"]["seeds_in_ratios"]) == (1, 1)
    assert agg["grpo-e4"]["best_diff"]["mean"] == pytest.approx((0.02 - 0.02) / 2)
    assert "  SFPO reached GRPO-E4's best in 1 of 2 seeds (the ratios below leave out the seeds where " \
           "it never did: they favour SFPO)" in out["report"]
    assert out["timings"] == {"rl_s0": {"wall_s": 30.0, "cpu_s": 50.0}} and out["total_wall_s"] == 30.0
    assert out["config"]["out"] is None  # outside the repository: no machine's path in the results
    # GRPO-E4 against GRPO, by hand: GRPO's best 0.52 (2048 rollouts) / 0.50 (3072); GRPO-E4 first
    # at or above it at 2048 / 1024 rollouts
    equal = out["equal_steps_vs_grpo"]
    assert equal["arm"] == "grpo-e4"
    assert [(r["control_rollouts"], r["sfpo_rollouts"]) for r in equal["seeds"]] == [(2048, 2048), (3072, 1024)]
    assert equal["aggregate"]["vs"]["grpo"]["rollout_ratio"]["ratio_of_means"] == pytest.approx(5120 / 3072)
    assert equal["aggregate"]["vs"]["grpo"]["best_diff"]["mean"] == pytest.approx((0.06 + 0.11) / 2)
    assert "GRPO-E4 vs GRPO (1 vs 4 optimizer passes per rollout batch):" in out["report"]
    assert "  GRPO-E4 reached GRPO's best in 2 of 2 seeds" in out["report"]
    # --from-json: the same results from the JSON alone (the run directories gone)
    shutil.rmtree(work)
    assert bench.main(["--from-json", str(tmp_path / "res" / "t.json"), "--results", str(tmp_path / "again"),
                       "--name", "t"]) == 0
    assert json.loads((tmp_path / "again" / "t.json").read_text()) == out
    # --skip-done keeps finished seeds; a run that stopped early is not finished
    for arm, accs in runs[0].items():
        _write_run(work / f"rl_{arm}_s0" / "logs" / "metrics.jsonl", accs)
    metrics = {arm: work / f"rl_{arm}_s0" / "logs" / "metrics.jsonl" for arm in runs[0]}
    cfg = bench.DemoConfig(rl_steps=8)
    assert bench.finished(cfg, metrics)
    _write_run(metrics["sfpo"], [0.40, 0.53, 0.51])
    assert not bench.finished(cfg, metrics)


# ----------------------------------------------------------------------------------------- flags


def test_rl_flags_parse_and_fit_the_update_layout(tmp_path: Path) -> None:
    from sfpo_megatron.arguments import build_rl_parser
    from sfpo_megatron.demo.pipeline import DemoConfig, Paths, rl_flags
    from sfpo_megatron.rl.loop import check_rl_args
    from sfpo_megatron.trainer.train_batch import check_update_layout
    from sfpo_megatron.update.policy_update import passes_per_batch

    for cfg in (DemoConfig(), DemoConfig.quick()):
        assert list(cfg.arms) == ["grpo", "grpo-e4", "sfpo"]
        assert cfg.passes_per_batch == {"grpo": 1, "grpo-e4": 4, "sfpo": 4}
        parsed = {arm: build_rl_parser().parse_args(rl_flags(cfg, Paths(tmp_path), arm, 3, tmp_path / "rl"))
                  for arm in cfg.arms}
        for arm, args in parsed.items():
            check_rl_args(args)
            assert passes_per_batch(args) == cfg.passes_per_batch[arm]
        assert [(a.algorithm, a.ppo_epochs) for a in parsed.values()] == [("grpo", 1), ("grpo", 4), ("sfpo", 1)]
        # the arms differ in those two flags only
        common = [{k: v for k, v in vars(a).items() if k not in ("algorithm", "ppo_epochs")}
                  for a in parsed.values()]
        assert common[0] == common[1] == common[2]
        args = parsed["sfpo"]
        assert (args.algorithm, args.seed, args.sfpo_alpha, args.sfpo_inner_steps) == ("sfpo", 3, 0.8, 3)
        assert args.reward_fn == "sfpo_megatron.demo.task:exact_match_reward"
        assert parse_rg_spec(args.prompt_data)[1]["size"] == cfg.train_prompts
        assert args.eval_prompt_data[0].startswith("val=rg:basic_arithmetic?size=")
        check_update_layout(args.rollout_batch_size * args.n_samples_per_prompt, args.num_steps_per_rollout,
                            1, args.micro_batch_size)
    with pytest.raises(ValueError, match=r"arm must be one of \('grpo', 'grpo-e4', 'sfpo'\), got 'ppo'"):
        rl_flags(DemoConfig(), Paths(tmp_path), "ppo", 0, tmp_path)
    assert "grpo-e6" in DemoConfig(sfpo_inner_steps=5).arms


# --------------------------------------------------------------------------- SFT early stopping

_FAKE_TRAINER = """
import json, sys, time
from sfpo_megatron.components.preemption import EXIT_CODE, PreemptionHandler
handler = PreemptionHandler().install()
with open(sys.argv[1], "a") as f:
    for it in range(1, 200):
        f.write(json.dumps({"iteration": it, "lm_loss": 1.0 - 0.01 * it}) + "\\n")
        f.flush()
        time.sleep(0.05)
        if handler.should_stop():
            print("stopped at", it, flush=True)
            sys.exit(EXIT_CODE)
"""


def test_loss_target_stops_a_real_trainer_through_its_preemption_path(tmp_path: Path) -> None:
    import sys

    from sfpo_megatron.demo.pipeline import Job, LossTarget, run_jobs

    metrics = tmp_path / "metrics.jsonl"
    stop = LossTarget(target=0.60, window=5)
    job = Job("fake SFT", [sys.executable, "-c", _FAKE_TRAINER, str(metrics)], tmp_path / "log.txt",
              metrics, 200, watch=stop)
    run_jobs([job], show_progress=False)
    # The mean of the last 5 losses first reaches 0.60 at iteration 42 (losses 0.62 .. 0.58);
    # the watcher polls every 0.5 s, so it sees that a few iterations later.
    assert stop.stopped_at is not None and 42 <= stop.stopped_at
    assert stop.loss == pytest.approx(1.0 - 0.01 * (stop.stopped_at - 2))
    assert job.proc.returncode == 143  # the preemption exit, long before iteration 199
    stopped = int(job.log.read_text().rsplit("stopped at", 1)[1].split()[0])
    assert stop.stopped_at <= stopped <= stop.stopped_at + 40


def test_failed_job_reports_its_log(tmp_path: Path) -> None:
    import sys

    from sfpo_megatron.demo.pipeline import DemoError, Job, run_jobs

    job = Job("broken", [sys.executable, "-c", "import sys; print('boom here'); sys.exit(3)"],
              tmp_path / "log.txt")
    with pytest.raises(DemoError, match=r"broken failed \(exit code 3\)(.|\n)*boom here"):
        run_jobs([job], show_progress=False)
