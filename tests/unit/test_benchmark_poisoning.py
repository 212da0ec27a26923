"""The poisoning benchmark: attackers and their updates, the defences' composition of the robust rules,
the simulation with both switched on (tiny fixture), the report's target checks, and the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import benchmarks.federation_sim as federation_sim
import benchmarks.poisoning as poisoning_cli
import benchmarks.poisoning_report as poisoning_report
from benchmarks.adversary import (
    ATTACKS,
    DEFAULT_DEFENCES,
    DEFENCES,
    INFLATED_SAMPLES,
    Defence,
    Poisoning,
    RoundAggregate,
    aggregate_round,
    alie_delta,
    alie_z,
    choose_attackers,
    poison_delta,
    round_record,
)
from benchmarks.federation_sim import SimConfig, SimResult, simulate
from benchmarks.poisoning import build_parser
from benchmarks.poisoning_report import best_option, markdown_report, option_checks, plot_accuracy
from mlecs.aggregation import ClientUpdate, weighted_average_per_tensor
from mlecs.aggregation.robust import weighted_median, weighted_trimmed_mean
from mlecs.data.avmnist import AVMnist, load_avmnist_tiny
from mlecs.learning.amt import AmtRecipe
from mlecs.model import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = np.random.default_rng(0).standard_normal((10, 384)).astype(np.float32)
# Five clients (the tiny fixture's speakers allow that many): one attacker at 20%, and enough honest
# clients for a median to mean something.
CONFIG = SimConfig(num_clients=5, rounds=1, unseen_speaker=None, model=ModelConfig(backbone="tiny"),
                   recipe=AmtRecipe(public_epochs=1, private_epochs=1, batch_size=16))


@pytest.fixture(scope="module")
def tiny() -> AVMnist:
    return load_avmnist_tiny()


# --- attackers and their updates ---------------------------------------------------------------------------


def test_poison_delta_scales_or_flips_every_tensor_and_leaves_clean_updates_alone() -> None:
    delta = {"a": np.array([1.0, -2.0], dtype=np.float32), "b": np.full((2, 2), 0.5, dtype=np.float32)}

    scaled, flipped, clean = (poison_delta(delta, a) for a in ("scale10", "signflip", "none"))

    np.testing.assert_array_equal(scaled["a"], [10.0, -20.0])
    np.testing.assert_array_equal(scaled["b"], np.full((2, 2), 5.0))
    np.testing.assert_array_equal(flipped["a"], [-1.0, 2.0])
    np.testing.assert_array_equal(flipped["b"], np.full((2, 2), -0.5))
    assert clean is delta
    assert scaled["a"].dtype == np.float32 and set(ATTACKS) == {"none", "scale10", "signflip",
                                                                           "weight-inflation", "alie"}


def test_twenty_percent_of_ten_clients_attack_chosen_by_the_seed() -> None:
    attack = Poisoning(attack="signflip")

    by_seed = [choose_attackers(10, attack, seed) for seed in range(6)]

    assert all(len(chosen) == 2 and chosen <= set(range(10)) for chosen in by_seed)
    assert by_seed[0] == choose_attackers(10, attack, 0)
    assert len(set(by_seed)) > 1  # the seed moves the attackers
    assert choose_attackers(10, Poisoning(), 0) == frozenset()  # nobody attacks in the clean run
    assert len(choose_attackers(3, attack, 0)) == 1  # at least one when attacking
    assert len(choose_attackers(10, replace(attack, fraction=0.4), 0)) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attack": "scale100"}, "unknown attack 'scale100'"),
        ({"defence": "krum"}, "unknown defence 'krum'"),
        ({"fraction": 0.5}, "fraction must be in (0, 0.5)"),
        ({"fraction": 0.0}, "fraction must be in (0, 0.5)"),
    ],
)
def test_poisoning_refuses_unknown_names_and_majority_attacks(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Poisoning(**kwargs)


def test_defence_refuses_exclusion_without_a_robust_rule_and_a_bad_trim() -> None:
    with pytest.raises(ValueError, match="exclude_above needs a robust rule"):
        Defence(exclude_above=2.0)
    with pytest.raises(ValueError, match="exclude_above needs a robust rule and a score >= 1"):
        Defence(rule="median", exclude_above=0.5)
    with pytest.raises(ValueError, match="trim must be in"):
        Defence(rule="trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match="rule must be"):
        Defence(rule="mode")


def test_defence_refuses_a_direction_check_without_a_robust_rule_or_outside_minus_one_to_one() -> None:
    with pytest.raises(ValueError, match="exclude_cosine_below needs a robust rule"):
        Defence(exclude_cosine_below=0.0)
    for bad in (1.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match=r"exclude_cosine_below: a cosine threshold must be in \[-1, 1\)"):
            Defence(rule="median", exclude_cosine_below=bad)
    assert Defence(rule="median", exclude_cosine_below=-1.0).excludes and not Defence(rule="median").excludes
    assert DEFENCES["median+cosine"] == Defence(rule="median", exclude_cosine_below=0.0)
    assert DEFENCES["median+exclude1.5+cosine"] == Defence(rule="median", exclude_above=1.5, exclude_cosine_below=0.0)


# --- defences: the coordinator's composition of the mlecs.aggregation functions ------------------------------


def _updates(rows: Sequence[Sequence[float]]) -> list[ClientUpdate]:
    """One update per row: tensor "w" is the row's first three values, "b" the rest."""
    return [ClientUpdate(client_id=str(i), tensors={"w": np.array(r[:3], dtype=np.float32),
                                                    "b": np.array(r[3:], dtype=np.float32)},
                         num_samples=10, modalities=frozenset({"audio", "image"}))
            for i, r in enumerate(rows)]


ROWS = [[1.0, 2.0, 0.0, 1.0], [1.2, 1.8, 0.1, 0.9], [0.9, 2.1, -0.1, 1.1], [1.1, 2.2, 0.0, 1.0],
        [0.8, 1.9, 0.2, 1.2], [10.0, 20.0, 0.0, 10.0]]  # the last one is a x10 attacker
WEIGHTS = [0.15, 0.2, 0.1, 0.2, 0.15, 0.2]


def _stack(updates: Sequence[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([np.asarray(u.tensors[name], dtype=np.float64).reshape(-1) for u in updates])


def test_no_defence_is_the_plain_weighted_mean() -> None:
    updates = _updates(ROWS)

    result = aggregate_round(updates, WEIGHTS, DEFENCES["none"])

    expected = weighted_average_per_tensor(updates, WEIGHTS)
    assert set(result.delta) == {"w", "b"}
    for name in expected:
        np.testing.assert_array_equal(result.delta[name], expected[name])
    assert result.excluded == frozenset() and result.scores == {} and result.clip_bound is None


def test_clip_scales_every_update_to_the_rounds_median_norm_before_the_mean() -> None:
    updates = _updates(ROWS)
    norms = [math.sqrt(sum(v * v for v in row)) for row in ROWS]
    bound = float(np.median(norms))
    factors = [min(1.0, bound / n) for n in norms]

    result = aggregate_round(updates, WEIGHTS, DEFENCES["clip"])

    assert result.clip_bound == pytest.approx(bound)
    total = sum(WEIGHTS)
    expected_w = sum(w * f * np.array(r[:3]) for w, f, r in zip(WEIGHTS, factors, ROWS, strict=True)) / total
    np.testing.assert_allclose(result.delta["w"], expected_w, rtol=1e-5)
    assert np.linalg.norm(result.delta["w"]) < 3.0  # the plain mean is pulled to about 4.6 by the attacker


@pytest.mark.parametrize(
    ("defence", "rule"),
    [
        ("median", weighted_median),
        ("trimmed_mean", lambda v, w: weighted_trimmed_mean(v, w, trim=0.2)),
    ],
)
def test_robust_rules_are_the_weighted_coordinate_wise_rules_with_the_mma_weights(
    defence: str, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> None:
    updates = _updates(ROWS)

    result = aggregate_round(updates, WEIGHTS, DEFENCES[defence])

    for name in ("w", "b"):
        expected = rule(_stack(updates, name), np.array(WEIGHTS))
        np.testing.assert_allclose(result.delta[name], expected.astype(np.float32), rtol=1e-6)
    assert set(result.scores) == {str(i) for i in range(len(ROWS))}
    assert result.scores["5"] > 5 and result.excluded == frozenset()  # scored, but nobody is left out


def test_clip_then_trimmed_mean_trims_the_clipped_updates() -> None:
    updates = _updates(ROWS)
    bound = float(np.median([math.sqrt(sum(v * v for v in row)) for row in ROWS]))
    clipped = [[v * min(1.0, bound / math.sqrt(sum(x * x for x in r))) for v in r] for r in ROWS]

    result = aggregate_round(updates, WEIGHTS, DEFENCES["clip+trimmed_mean"])

    expected = weighted_trimmed_mean(_stack(_updates(clipped), "w"), np.array(WEIGHTS), trim=0.2)
    np.testing.assert_allclose(result.delta["w"], expected, rtol=1e-5)


def test_median_with_exclusion_leaves_the_outlier_out_and_takes_the_median_of_the_rest() -> None:
    updates = _updates(ROWS)

    result = aggregate_round(updates, WEIGHTS, DEFENCES["median+exclude"])

    assert result.excluded == frozenset({"5"})
    assert max(s for c, s in result.scores.items() if c != "5") <= 2.0 < result.scores["5"]
    expected = weighted_median(_stack(updates[:5], "w"), np.array(WEIGHTS[:5]))
    np.testing.assert_allclose(result.delta["w"], expected, rtol=1e-6)


FLIPPED_ROWS = [*ROWS[:5], [-1.1, -2.0, -0.1, -1.0]]  # the last one is a sign-flipped honest update


def test_median_with_the_direction_check_leaves_a_sign_flip_out_and_takes_the_median_of_the_rest() -> None:
    updates = _updates(FLIPPED_ROWS)

    checked = aggregate_round(updates, WEIGHTS, DEFENCES["median+cosine"])
    unchecked = aggregate_round(updates, WEIGHTS, DEFENCES["median"])

    assert checked.excluded == frozenset({"5"}) and unchecked.excluded == frozenset()
    assert checked.cosines == unchecked.cosines  # measured against the same median either way
    assert checked.cosines["5"] < 0 < min(c for client, c in checked.cosines.items() if client != "5")
    for name in ("w", "b"):
        expected = weighted_median(_stack(updates[:5], name), np.array(WEIGHTS[:5]))
        np.testing.assert_allclose(checked.delta[name], expected, rtol=1e-6)


def test_robust_rules_work_per_tensor_over_its_holders() -> None:
    updates = _updates(ROWS)
    # Client 0 lacks a modality: it holds "w" only, as a device without that modality's extractor would.
    updates[0] = replace(updates[0], tensors={"w": updates[0].tensors["w"]})

    result = aggregate_round(updates, WEIGHTS, DEFENCES["median"])

    expected = weighted_median(_stack(updates[1:], "b"), np.array(WEIGHTS[1:]))
    np.testing.assert_allclose(result.delta["b"], expected, rtol=1e-6)


def test_round_record_counts_exclusions_by_kind_and_caps_infinite_scores() -> None:
    result = RoundAggregate(delta={}, excluded=frozenset({"1", "4"}), scores={"1": math.inf, "4": 2.5, "0": 1.1},
                            clip_bound=0.3)

    record = round_record(result, frozenset({1}))

    assert record == {"excluded_attackers": 1.0, "excluded_honest": 1.0, "score_max_honest": 2.5,
                      "score_min_attacker": 1e6, "clip_bound": 0.3}
    assert round_record(RoundAggregate(delta={}), frozenset()) == {"excluded_attackers": 0.0, "excluded_honest": 0.0}


def test_round_record_keeps_the_lowest_honest_and_highest_attacker_cosine() -> None:
    result = RoundAggregate(delta={}, excluded=frozenset({"1"}), cosines={"0": 0.4, "1": -0.3, "2": 0.2, "3": -0.5})

    record = round_record(result, frozenset({1, 3}))

    assert record == {"excluded_attackers": 1.0, "excluded_honest": 0.0, "cosine_min_honest": 0.2,
                      "cosine_max_attacker": -0.3}


# --- the simulation with attackers and defences ------------------------------------------------------------


def _spy_on_rounds(monkeypatch: pytest.MonkeyPatch) -> list[list[ClientUpdate]]:
    """Records the updates every round aggregates; the real aggregate_round still runs."""
    seen: list[list[ClientUpdate]] = []

    def spy(updates: Sequence[ClientUpdate], weights: Sequence[float], defence: Defence) -> RoundAggregate:
        seen.append(list(updates))
        return aggregate_round(updates, weights, defence)

    monkeypatch.setattr(federation_sim, "aggregate_round", spy)
    return seen


@pytest.mark.parametrize(("attack", "factor"), [("scale10", 10.0), ("signflip", -1.0)])
def test_attackers_upload_their_trained_delta_changed_and_everyone_else_uploads_theirs(
    tiny: AVMnist, monkeypatch: pytest.MonkeyPatch, attack: str, factor: float
) -> None:
    seen = _spy_on_rounds(monkeypatch)

    clean = simulate(tiny, "mlecs", 0.0, 0, CONFIG, TEXT)
    attacked = simulate(tiny, "mlecs", 0.0, 0, replace(CONFIG, poisoning=Poisoning(attack=attack)), TEXT)

    assert clean.attackers == () and len(attacked.attackers) == 1
    (attacker,) = attacked.attackers
    honest_updates, poisoned_updates = seen
    for honest, poisoned in zip(honest_updates, poisoned_updates, strict=True):
        assert set(poisoned.tensors) == set(honest.tensors)
        for name, value in honest.tensors.items():
            expected = value * np.float32(factor) if honest.client_id == str(attacker) else value
            np.testing.assert_allclose(poisoned.tensors[name], expected, rtol=1e-6, atol=0)
    assert attacked.global_accuracy != clean.global_accuracy or attacked.history != clean.history


@pytest.mark.parametrize(("ratio", "attacker_samples"), [(2.0, "capped"), (0.0, INFLATED_SAMPLES)])
def test_a_weight_inflating_attacker_flips_its_delta_and_claims_2_31_samples_capped_as_the_coordinator_does(
    tiny: AVMnist, monkeypatch: pytest.MonkeyPatch, ratio: float, attacker_samples: int | str
) -> None:
    seen = _spy_on_rounds(monkeypatch)
    poisoning = Poisoning(attack="weight-inflation", weight_ratio=ratio)

    result = simulate(tiny, "mlecs", 0.0, 0, replace(CONFIG, poisoning=poisoning), TEXT)

    (attacker,) = result.attackers
    (updates,) = seen
    honest = sorted(u.num_samples for u in updates if u.client_id != str(attacker))
    claimed = next(u.num_samples for u in updates if u.client_id == str(attacker))
    expected = math.floor(ratio * sorted(u.num_samples for u in updates)[(len(updates) - 1) // 2]) \
        if attacker_samples == "capped" else attacker_samples
    assert claimed == expected and max(honest) < 10_000


def test_alie_attackers_upload_the_mean_minus_z_sigma_of_every_clients_trained_delta() -> None:
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(client_id=str(i), tensors={"w": rng.normal(0, 1, (3, 4)).astype(np.float32),
                                                      **({"audio": np.ones(2, np.float32) * i} if i < 3 else {})},
                            num_samples=10, modalities=frozenset({"image"})) for i in range(10)]
    z = alie_z(10, 2)

    crafted = alie_delta(updates, 2)

    assert z == pytest.approx(0.2533, abs=1e-3)  # n = 10, m = 2: s = 4, z = Phi^-1(0.6)
    stack = np.stack([u.tensors["w"] for u in updates])
    np.testing.assert_allclose(crafted["w"], stack.mean(0) - z * stack.std(0), rtol=1e-5)
    np.testing.assert_allclose(crafted["audio"], np.full(2, 1.0 - z * np.std([0, 1, 2])), rtol=1e-5)  # its holders


def test_simulation_with_alie_replaces_each_attackers_update_with_the_crafted_one(
    tiny: AVMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_on_rounds(monkeypatch)

    result = simulate(tiny, "mlecs", 0.0, 0, replace(CONFIG, poisoning=Poisoning(attack="alie")), TEXT)

    (attacker,) = result.attackers
    (updates,) = seen
    poisoned = next(u for u in updates if u.client_id == str(attacker))
    honest = [u for u in updates if u.client_id != str(attacker)]
    shared = sorted(set.intersection(*(set(u.tensors) for u in updates)))
    assert shared and not all(np.array_equal(poisoned.tensors[n], honest[0].tensors[n]) for n in shared)
    assert 0.0 <= result.global_accuracy <= 1.0


def test_simulation_with_exclusion_leaves_the_scaled_attacker_out_and_records_it(tiny: AVMnist) -> None:
    config = replace(CONFIG, poisoning=Poisoning(attack="scale10", defence="median+exclude"))

    result = simulate(tiny, "mlecs", 0.0, 0, config, TEXT)

    record = result.history[0]
    assert record["excluded_attackers"] == 1.0 and record["excluded_honest"] == 0.0
    assert record["score_min_attacker"] > 2.0 >= record["score_max_honest"]
    assert 0.0 <= result.global_accuracy <= 1.0


def test_simulation_with_the_direction_check_records_cosines_and_leaves_out_what_points_away(tiny: AVMnist) -> None:
    config = replace(CONFIG, poisoning=Poisoning(attack="signflip", defence="median+cosine"))

    result = simulate(tiny, "mlecs", 0.0, 0, config, TEXT)

    record = result.history[0]
    assert -1.0 <= record["cosine_max_attacker"] <= 1.0 and -1.0 <= record["cosine_min_honest"] <= 1.0
    assert record["excluded_attackers"] == float(record["cosine_max_attacker"] < 0)
    assert record["excluded_honest"] == float(record["cosine_min_honest"] < 0)


def test_clean_runs_keep_the_learning_benchmarks_history(tiny: AVMnist) -> None:
    result = simulate(tiny, "mlecs", 0.0, 0, CONFIG, TEXT)

    assert set(result.history[0]) == {"round", "client_accuracy_mean", "global_accuracy", "cloud_accuracy", "seconds",
                                      "devices_s", "cloud_s", "evaluation_s"}


def test_defences_refuse_exact_lora_and_local_only(tiny: AVMnist) -> None:
    config = replace(CONFIG, poisoning=Poisoning(defence="median"))

    for method in ("mlecs-exact-lora", "local"):
        with pytest.raises(ValueError, match=f"defence 'median' needs a federated method without exact LoRA, "
                                             f"not '{method}'"):
            simulate(tiny, method, 0.0, 0, config, TEXT)


# --- report ------------------------------------------------------------------------------------------------


def _record(attack: str, defence: str, seed: int, accuracy: float, **extra: Any) -> dict[str, Any]:
    return {"attack": attack, "defence": defence, "seed": seed, "global_accuracy": accuracy, **extra}


def _grid(values: dict[tuple[str, str], tuple[float, float]]) -> list[dict[str, Any]]:
    return [_record(a, d, seed, v[seed]) for (d, a), v in values.items() for seed in (0, 1)]


GRID = _grid({
    ("none", "none"): (0.90, 0.92), ("none", "scale10"): (0.20, 0.30), ("none", "signflip"): (0.85, 0.85),
    ("median", "none"): (0.88, 0.90), ("median", "scale10"): (0.87, 0.90), ("median", "signflip"): (0.86, 0.88),
    ("clip", "none"): (0.90, 0.92), ("clip", "scale10"): (0.89, 0.91), ("clip", "signflip"): (0.82, 0.84),
})


def test_report_tables_accuracy_by_defence_and_attack_in_percent() -> None:
    report = markdown_report(GRID)

    lines = report.splitlines()
    assert lines[0] == "Global accuracy (%, test split), mean ± std over 2 seed(s) (fewer where a cell says so):"
    assert lines[2] == "| defence | attack none | attack scale10 | attack signflip |"
    assert lines[4] == "| none | 91.0 ± 1.0 | 25.0 ± 5.0 | 85.0 ± 0.0 |"
    assert lines[5] == "| median | 89.0 ± 1.0 | 88.5 ± 1.5 | 87.0 ± 1.0 |"


def test_target_checks_use_per_seed_differences_and_pick_the_option_with_the_smallest_worst_drop() -> None:
    checks = {c.defence: c for c in option_checks(GRID)}

    assert set(checks) == {"median", "clip"}
    assert checks["median"].drops == pytest.approx({"scale10": 0.5, "signflip": 2.0})
    assert checks["median"].clean_loss == pytest.approx(2.0)
    assert checks["clip"].drops == pytest.approx({"scale10": 1.0, "signflip": 8.0})
    best = best_option(list(checks.values()))
    assert best is not None and best.defence == "median"
    assert best.meets_attack_target and not best.meets_clean_target
    report = markdown_report(GRID)
    assert "| median | +0.5 | +2.0 | +2.0 |" in report
    assert "Best option (smallest worst-case drop): `median`." in report
    assert "under every attack: **met** (worst drop +2.0)" in report
    assert "below plain MMA: **missed** (loss +2.0)" in report
    assert "options meeting both: none." in report


def test_report_shows_exclusions_for_defences_that_exclude() -> None:
    records = [*GRID, *(_record(a, "median+exclude", s, 0.9, excluded_attackers=16.0 if a == "scale10" else 0.0,
                                excluded_honest=1.0) for a in ("none", "scale10", "signflip") for s in (0, 1))]

    report = markdown_report(records)

    assert "| median+exclude | 0.0 / 1.0 | 16.0 / 1.0 | 0.0 / 1.0 |" in report
    assert "options meeting both: `median+exclude`." in report


def test_report_shows_exclusions_and_cosine_separation_for_the_direction_check() -> None:
    def history(attack: str, seed: int) -> list[dict[str, float]]:
        rounds = [{"cosine_min_honest": 0.3 + 0.1 * seed}, {"cosine_min_honest": 0.25}]
        if attack != "none":
            rounds[0]["cosine_max_attacker"] = -0.2 - 0.1 * seed
        return rounds

    records = [*GRID, *(_record(a, "median+cosine", s, 0.9, excluded_attackers=0.0, excluded_honest=0.0,
                                history=history(a, s)) for a in ("none", "scale10", "signflip") for s in (0, 1))]

    report = markdown_report(records)

    assert "| median+cosine | 0.0 / 0.0 | 0.0 / 0.0 | 0.0 / 0.0 |" in report  # it excludes, even if nobody here
    assert "| median+cosine | +0.25 / – | +0.25 / -0.20 | +0.25 / -0.20 |" in report
    assert "| median | " in report and report.count("+0.25 /") == 3  # no cosine row for runs without them


def test_report_without_clean_plain_mma_has_no_target_checks() -> None:
    report = markdown_report([r for r in GRID if r["defence"] != "none"])

    assert "Best option" not in report and "| median |" in report


def test_report_merges_results_files_into_one_table(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([r for r in GRID if r["seed"] == 0]))
    second.write_text(json.dumps([r for r in GRID if r["seed"] == 1]))

    assert poisoning_report.main([str(first), str(second), "--out", str(tmp_path / "merged")]) == 0

    assert len(json.loads((tmp_path / "merged" / "results.json").read_text())) == len(GRID)
    assert (tmp_path / "merged" / "results.md").read_text() == markdown_report(GRID)
    assert (tmp_path / "merged" / "poisoning.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "poisoning.png"

    plot_accuracy(GRID, path)

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


# --- CLI ---------------------------------------------------------------------------------------------------


def test_parser_defaults_are_the_issues_grid(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--out", str(tmp_path)])

    assert args.attacks == ["none", "scale10", "signflip", "weight-inflation", "alie"]
    assert args.defences == list(DEFAULT_DEFENCES)
    assert set(DEFENCES) - set(DEFAULT_DEFENCES) == {"clip+trimmed_mean"}
    assert args.fraction == 0.2 and args.method == "mlecs" and args.setting == "canonical" and args.clients == 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attacks", "none,flood"], "unknown ['flood']"),
        (["--defences", "krum"], "unknown ['krum']"),
        (["--fraction", "0.5"], "--fraction must be in [0.01, 0.5)"),
        (["--fraction", "x"], "--fraction must be a number"),
        (["--p", "1"], "--p must be in [0, 1)"),
        (["--method", "mlecs-exact-lora"], "invalid choice"),
        (["--method", "local"], "invalid choice"),
    ],
)
def test_parser_rejects_bad_values_with_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["--out", str(tmp_path), *argv])

    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--clients", "1"], ["--seeds", "0"], ["--rounds", "0"], ["--first-seed", "-1"]])
def test_main_refuses_too_few_clients_seeds_or_rounds(argv: list[str], tmp_path: Path) -> None:
    assert poisoning_cli.main(["--out", str(tmp_path / "run"), *argv]) == 2
    assert not (tmp_path / "run").exists()


def test_quick_run_writes_a_record_per_attack_defence_and_seed(
    tiny: AVMnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real federation on the tiny fixture (in place of the full data set) and random class anchors
    (in place of MiniLM's)."""
    monkeypatch.setattr("mlecs.data.avmnist.load_avmnist", lambda data_dir=None, setting="canonical": tiny)
    monkeypatch.setattr("mlecs.model.text.class_text_anchors", lambda: TEXT)
    out = tmp_path / "run"

    code = poisoning_cli.main(["--quick", "--out", str(out), "--clients", "5", "--rounds", "1",
                               "--attacks", "none,scale10,weight-inflation", "--defences", "none,median+exclude"])

    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert {(r["attack"], r["defence"], r["seed"]) for r in records} == {
        (a, d, 0) for a in ("none", "scale10", "weight-inflation") for d in ("none", "median+exclude")
    }
    for record in records:
        assert {"attack", "defence", "seed", "global_accuracy"} <= set(record)
        assert 0.0 <= record["global_accuracy"] <= 1.0 and record["rounds"] == 1
        assert len(record["attackers"]) == (0 if record["attack"] == "none" else 1)
    excluded = {(r["attack"], r["defence"]): r["excluded_attackers"] for r in records}
    assert excluded[("scale10", "median+exclude")] == 1.0 and excluded[("scale10", "none")] == 0.0
    report = (out / "results.md").read_text()
    assert "| median+exclude |" in report and "Best option" in report
    assert (out / "poisoning.png").read_bytes()[:8] == PNG_MAGIC
    assert report in capsys.readouterr().out


def _fake_simulate(calls: list[tuple[str, float, int, SimConfig]]) -> Any:
    def fake(data: Any, method: str, p: float, seed: int, config: SimConfig, text: Any) -> SimResult:
        calls.append((method, p, seed, config))
        return SimResult(global_accuracy=0.5, client_accuracy_mean=0.4, upload_bytes_per_client=1.0,
                         unseen_speaker_accuracy=None, cloud_accuracy=None, history=[], seconds=0.01)

    return fake


def test_main_passes_the_grid_and_the_options_to_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, float, int, SimConfig]] = []
    monkeypatch.setattr(poisoning_cli, "simulate", _fake_simulate(calls))
    monkeypatch.setattr("mlecs.data.avmnist.load_avmnist", lambda data_dir=None, setting="canonical": setting)
    monkeypatch.setattr("mlecs.model.text.class_text_anchors", lambda: TEXT)

    code = poisoning_cli.main(["--out", str(tmp_path), "--seeds", "2", "--first-seed", "5", "--rounds", "3",
                               "--clients", "8", "--attacks", "signflip", "--defences", "clip,median",
                               "--fraction", "0.25", "--p", "0.4", "--method", "mlecs-no-mma"])

    assert code == 0
    assert [(c[3].poisoning.attack, c[3].poisoning.defence, c[2]) for c in calls] == [
        ("signflip", "clip", 5), ("signflip", "median", 5), ("signflip", "clip", 6), ("signflip", "median", 6)]
    method, p, _, config = calls[0]
    assert (method, p, config.poisoning.fraction) == ("mlecs-no-mma", 0.4, 0.25)
    assert (config.num_clients, config.rounds, config.model.backbone) == (8, 3, "tiny")


def test_cells_and_drops_with_fewer_seeds_than_the_table_say_how_many_they_have() -> None:
    records = [{"attack": attack, "defence": defence, "seed": seed, "global_accuracy": 0.9}
               for defence in ("none", "median") for seed in (0, 1)
               for attack in (("none", "scale10", "alie") if seed == 0 else ("none", "scale10"))]

    report = markdown_report(records)

    assert "| median | 90.0 ± 0.0 | 90.0 ± 0.0 | 90.0 (1 seed) |" in report
    assert "| median | +0.0 | +0.0 (1 seed) | +0.0 |" in report
