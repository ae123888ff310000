"""The SFPO α schedule on synthetic entropy series with hand-computed z-scores."""

from __future__ import annotations

import json
import math

import pytest

from sfpo_megatron.algorithms.sfpo_controller import SFPOConfigError, SFPOController

# Window 3, entropies 1, 1, 1, 2: at step 4 the window is [1, 1, 2] (H_s included),
# mean 4/3, population std sqrt(2/9) = 0.4714, z = (2 - 4/3) / (0.4714 + 1e-9) = 1.41421.
Z_SPIKE = (2.0 / 3.0) / (math.sqrt(2.0 / 9.0) + 1e-9)


def run(ctrl: SFPOController, series, first_step: int = 1):
    zs = []
    for i, h in enumerate(series):
        zs.append(ctrl.observe(first_step + i, h))
    return zs


def test_trigger_fires_at_the_hand_computed_step():
    ctrl = SFPOController(alpha0=0.8, window=3, threshold=1.0)
    zs = run(ctrl, [1.0, 1.0])
    assert zs == [None, None]  # window not full: no test yet
    assert ctrl.observe(3, 1.0) == 0.0  # std 0: z = 0 / 1e-9
    assert not ctrl.triggered
    z = ctrl.observe(4, 2.0)
    assert z == pytest.approx(Z_SPIKE, rel=1e-12)
    assert ctrl.trigger_step == 4 and ctrl.trigger_z == pytest.approx(Z_SPIKE, rel=1e-12)
    # The entropy of step 4 only affects later steps: α0 through step 4, 0 from step 5 on.
    assert [ctrl.alpha_for_step(s) for s in (1, 4, 5, 100)] == [0.8, 0.8, 0.0, 0.0]
    assert ctrl.inner_steps_for_step(4) == 3 and ctrl.inner_steps_for_step(5) == 0
    assert ctrl.metrics(5) == {"sfpo/alpha": 0.0, "sfpo/entropy_zscore": pytest.approx(Z_SPIKE),
                               "sfpo/trigger_step": 4.0}


def test_conventions_population_std_and_current_value_in_window():
    # Population std gives z = 1.414 >= 1.3; a sample std (ddof=1) would give 1.155 and not fire.
    ctrl = SFPOController(window=3, threshold=1.3)
    run(ctrl, [1.0, 1.0, 1.0, 2.0])
    assert ctrl.trigger_step == 4
    # With H_s inside the window z can never exceed sqrt(ω-1) = 1.414 for ω = 3, so τ = 1.5
    # never fires; excluding H_s would give (2 - 1) / 1e-9 and fire at once.
    ctrl = SFPOController(window=3, threshold=1.5)
    run(ctrl, [1.0, 1.0, 1.0, 2.0, 5.0, 30.0])
    assert not ctrl.triggered


def test_longer_series_matches_numpy_formula():
    series = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 2.02, 2.3]
    ctrl = SFPOController(window=5, threshold=1.5)
    zs = run(ctrl, series)
    assert zs[:4] == [None] * 4
    for s in range(5, len(series) + 1):
        w = series[s - 5:s]
        mean = sum(w) / 5
        std = math.sqrt(sum((x - mean) ** 2 for x in w) / 5) + 1e-9
        assert zs[s - 1] == pytest.approx((w[-1] - mean) / std, rel=1e-12)
    # z at step 8: window [1.95, 2.0, 2.02, 2.3, ...] -> only the last jump crosses 1.5
    assert ctrl.trigger_step == 8


def test_one_sided_ignores_a_negative_spike_two_sided_fires():
    one = SFPOController(window=3, threshold=1.0)
    two = SFPOController(window=3, threshold=1.0, two_sided=True)
    run(one, [1.0, 1.0, 1.0, 0.0])
    run(two, [1.0, 1.0, 1.0, 0.0])
    assert one.last_z == pytest.approx(-Z_SPIKE) and not one.triggered
    assert two.trigger_step == 4 and two.trigger_z == pytest.approx(-Z_SPIKE)
    assert one.alpha_for_step(5) == 0.8 and two.alpha_for_step(5) == 0.0


def test_state_round_trips_through_json_and_never_fires_again():
    ctrl = SFPOController(window=3, threshold=1.0)
    run(ctrl, [1.0, 1.0, 1.0, 2.0, 2.0])
    state = json.loads(json.dumps(ctrl.state_dict()))
    resumed = SFPOController(window=3, threshold=1.0)
    resumed.load_state_dict(state)
    assert resumed.trigger_step == 4 and resumed.alpha_for_step(6) == 0.0
    run(resumed, [1.0, 1.0, 1.0, 9.0], first_step=6)  # a later, bigger spike
    assert resumed.trigger_step == 4 and resumed.trigger_z == pytest.approx(Z_SPIKE)
    assert resumed.last_z == pytest.approx(Z_SPIKE)
    # A stricter threshold after resume does not un-fire the trigger either.
    strict = SFPOController(window=3, threshold=100.0)
    strict.load_state_dict(state)
    assert strict.alpha_for_step(5) == 0.0


def test_resume_before_the_trigger_continues_the_same_window():
    series = [1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 1.6, 1.0]
    straight = SFPOController(window=4, threshold=1.2)
    run(straight, series)
    first = SFPOController(window=4, threshold=1.2)
    run(first, series[:5])
    assert not first.triggered
    second = SFPOController(window=4, threshold=1.2)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(second, series[5:], first_step=6)
    assert straight.trigger_step == second.trigger_step == 7
    assert second.trigger_z == straight.trigger_z


def test_fixed_stop_step_and_alpha_zero():
    ctrl = SFPOController(alpha0=0.9, stop_step=5)
    assert ctrl.alpha_for_step(5) == 0.9 and ctrl.alpha_for_step(6) == 0.0
    assert ctrl.inner_steps_for_step(6) == 0
    grpo = SFPOController(alpha0=0.0)
    assert grpo.alpha_for_step(1) == 0.0 and grpo.inner_steps_for_step(1) == 0


def test_bad_values_name_the_problem():
    with pytest.raises(SFPOConfigError, match=r"alpha0 \(--sfpo-alpha\) must be in \[0, 1\], got 1.5"):
        SFPOController(alpha0=1.5)
    with pytest.raises(SFPOConfigError, match=r"window \(--sfpo-zscore-window\) must be >= 2, got 1"):
        SFPOController(window=1)
    with pytest.raises(SFPOConfigError, match=r"inner_steps \(--sfpo-inner-steps\) must be >= 0, got -1"):
        SFPOController(inner_steps=-1)
    ctrl = SFPOController()
    ctrl.observe(3, 1.0)
    with pytest.raises(SFPOConfigError, match=r"observe\(step=3\) after step 3: steps must increase"):
        ctrl.observe(3, 1.0)
    with pytest.raises(SFPOConfigError, match="mean_entropy at step 4 must be finite, got nan"):
        ctrl.observe(4, float("nan"))
    with pytest.raises(SFPOConfigError, match="state version 7 is not 1"):
        ctrl.load_state_dict({"version": 7})
