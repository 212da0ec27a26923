"""The learning benchmark: an in-process federation on the tiny fixture, its table and plot, and its CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import benchmarks.learning as learning_cli
from benchmarks.federation_sim import (
    ABLATIONS,
    DEFAULT_METHODS,
    METHODS,
    SimConfig,
    SimResult,
    client_data,
    has_flattened,
    simulate,
)
from benchmarks.learning import BACKBONES, build_parser
from benchmarks.learning_report import TARGETS, Comparison, interval, markdown_report, paired, write_report
from benchmarks.learning_report import main as report_main
from benchmarks.references import REFERENCES, pooled_groups, run_reference
from mlecs.data.avmnist import AVMnist, load_avmnist_tiny
from mlecs.learning.amt import AmtRecipe
from mlecs.modality import Modality
from mlecs.model import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two clients: the tiny fixture has too few samples per speaker for the default ten (see the report).
TINY_MODEL = ModelConfig(backbone="tiny")
CONFIG = SimConfig(num_clients=2, rounds=1, unseen_speaker=0, model=TINY_MODEL,
                   recipe=AmtRecipe(public_epochs=1, private_epochs=1, batch_size=16))
TEXT = np.random.default_rng(0).standard_normal((10, 384)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny() -> AVMnist:
    return load_avmnist_tiny()


@pytest.fixture(scope="module")
def results(tiny: AVMnist) -> dict[str, SimResult]:
    """One round of each kind of method, with one of the two clients missing a modality (p = 0.5)."""
    names = ("mlecs", "fedavg", "local", "mlecs-exact-lora")
    return {name: simulate(tiny, name, 0.5, 0, CONFIG, TEXT) for name in names}


@pytest.mark.parametrize("method", ["mlecs", "fedavg", "local", "mlecs-exact-lora"])
def test_simulate_reports_accuracies_and_one_history_record_per_round(
    results: dict[str, SimResult], method: str
) -> None:
    result = results[method]

    for accuracy in (result.global_accuracy, result.client_accuracy_mean, result.unseen_speaker_accuracy):
        assert accuracy is not None and 0.0 <= accuracy <= 1.0
    assert len(result.history) == 1
    record = result.history[0]
    assert record["round"] == 1.0
    assert record["global_accuracy"] == result.global_accuracy
    assert record["client_accuracy_mean"] == result.client_accuracy_mean
    assert result.seconds > 0


def test_only_federated_methods_upload_and_only_seccl_tunes_the_cloud(results: dict[str, SimResult]) -> None:
    assert results["local"].upload_bytes_per_client == 0.0
    assert results["fedavg"].upload_bytes_per_client > 0
    assert results["mlecs"].upload_bytes_per_client > 0
    assert results["local"].cloud_accuracy is None and results["fedavg"].cloud_accuracy is None
    cloud_accuracy = results["mlecs"].cloud_accuracy
    assert cloud_accuracy is not None and 0.0 <= cloud_accuracy <= 1.0
    assert results["mlecs"].history[0]["cloud_accuracy"] == cloud_accuracy
    assert "cloud_accuracy" not in results["fedavg"].history[0]


def test_simulate_is_deterministic_and_skips_the_unseen_speaker_when_there_is_none(
    tiny: AVMnist, results: dict[str, SimResult]
) -> None:
    again = simulate(tiny, "fedavg", 0.5, 0, CONFIG, TEXT)
    no_unseen = simulate(tiny, "fedavg", 0.5, 0, replace(CONFIG, unseen_speaker=None), TEXT)

    def learned(result: SimResult) -> list[dict[str, float]]:  # the history without its wall-clock times
        return [{k: v for k, v in r.items() if not k.endswith(("seconds", "_s"))} for r in result.history]

    assert learned(again) == learned(results["fedavg"])
    assert again.unseen_speaker_accuracy == results["fedavg"].unseen_speaker_accuracy
    assert no_unseen.unseen_speaker_accuracy is None
    assert 0.0 <= no_unseen.global_accuracy <= 1.0


def test_methods_are_the_baselines_and_the_ablations() -> None:
    assert DEFAULT_METHODS == ("local", "fedavg", "mlecs")
    assert ABLATIONS == ("mlecs-no-ccl", "mlecs-no-seccl", "mlecs-no-mma", "mlecs-no-slm", "mlecs-public-upload")
    assert set(METHODS) == {*DEFAULT_METHODS, *ABLATIONS, "mlecs-exact-lora"} and METHODS["mlecs-exact-lora"].exact_lora
    assert not METHODS["local"].federated and METHODS["fedavg"].zero_fill
    assert METHODS["mlecs-no-mma"].aggregation == "fedavg" and METHODS["mlecs-no-seccl"].seccl is False
    assert METHODS["mlecs-public-upload"].upload_stage == "public" and METHODS["mlecs"].upload_stage == "private"
    assert METHODS["fedavg"].upload_stage == "private"  # FedAvg's clients train on their own data too
    assert METHODS["mlecs-no-slm"].small_language_model is False


def test_the_public_upload_ablation_learns_a_different_global_model(
    tiny: AVMnist, results: dict[str, SimResult]
) -> None:
    public = simulate(tiny, "mlecs-public-upload", 0.5, 0, CONFIG, TEXT)

    assert public.history[0]["global_accuracy"] != results["mlecs"].history[0]["global_accuracy"]


def test_a_cloud_with_a_larger_backbone_keeps_its_own_head_and_reports_its_accuracy(tiny: AVMnist) -> None:
    deeper = replace(TINY_MODEL, backbone_layers=0)
    shallow = replace(TINY_MODEL, backbone_layers=1)
    result = simulate(tiny, "mlecs", 0.5, 0, replace(CONFIG, model=shallow, cloud_model=deeper), TEXT)

    assert result.cloud_accuracy is not None and 0.0 <= result.cloud_accuracy <= 1.0
    assert 0.0 <= result.global_accuracy <= 1.0


# --- flattening, the last-rounds mean and time to 95% ------------------------------------------------------------


@pytest.mark.parametrize(
    ("curve", "flat"),
    [
        ([0.1, 0.3, 0.5, 0.6, 0.7, 0.75], False),  # still rising
        ([0.1, 0.3, 0.5, 0.70, 0.71, 0.70, 0.71, 0.70, 0.71], True),
        ([0.5, 0.5, 0.5, 0.5, 0.5], False),  # too short to tell
        ([0.2, 0.5, 0.80, 0.81, 0.80, 0.79, 0.78, 0.77], True),  # falling counts as flat: more rounds will not help
    ],
)
def test_a_curve_has_flattened_when_its_last_rounds_stop_gaining(curve: list[float], flat: bool) -> None:
    assert has_flattened(curve) is flat


def test_a_run_stops_once_flat_and_reports_the_mean_of_its_last_rounds(tiny: AVMnist) -> None:
    flat_config = replace(CONFIG, rounds=12, stop_when_flat=True, final_window=3)

    result = simulate(tiny, "fedavg", 0.5, 0, flat_config, TEXT)

    curve = [r["global_accuracy"] for r in result.history]
    assert (result.rounds == len(curve) and result.rounds < 12) or not has_flattened(curve[:-1])
    assert result.global_accuracy == pytest.approx(float(np.mean(curve[-3:])))
    assert [r["round"] for r in result.history] == list(range(1, result.rounds + 1))
    seconds = [r["seconds"] for r in result.history]
    assert all(r["devices_s"] > 0 and r["evaluation_s"] > 0 for r in result.history)
    assert seconds == sorted(seconds) and seconds[-1] <= result.seconds


def test_time_to_95_is_the_first_round_within_5_percent_of_the_final_accuracy() -> None:
    history = [{"round": float(i + 1), "global_accuracy": a, "seconds": 10.0 * (i + 1)}
               for i, a in enumerate([0.2, 0.5, 0.77, 0.8, 0.8])]
    result = SimResult(global_accuracy=0.8, client_accuracy_mean=0.5, upload_bytes_per_client=1.0,
                       unseen_speaker_accuracy=None, cloud_accuracy=None, history=history, seconds=55.0)

    assert result.to_95() == (3, 30.0)
    assert result.rounds == 5


# --- references --------------------------------------------------------------------------------------------------


def test_pooled_groups_feed_each_clients_data_with_its_own_modalities(tiny: AVMnist) -> None:
    config = replace(CONFIG, missing="audio")
    clients = client_data(tiny, config, 0.5, 0)

    groups = pooled_groups(tiny, config, 0.5, 0, full=False)
    full = pooled_groups(tiny, config, 0.5, 0, full=True)

    assert sorted(sorted(str(m) for m in mods) for _, mods in groups) == [["audio", "image"], ["image"]]
    total = sum(len(c.public) + len(c.private_train) for c in clients)
    assert sum(len(split) for split, _ in groups) == total
    assert len(full) == 1 and len(full[0][0]) == total and full[0][1] == frozenset(Modality)
    # Held-out data stays out: the references train on what the federation's clients train on.
    held_out = {int(i) for c in clients for i in c.private_heldout.sample_ids}
    assert not held_out & {int(i) for split, _ in groups for i in split.sample_ids}


@pytest.mark.parametrize("name", REFERENCES)
def test_every_reference_trains_and_reports_a_curve(tiny: AVMnist, name: str) -> None:
    result = run_reference(tiny, name, 0.5, 0, replace(CONFIG, rounds=2), TEXT)

    assert [r["round"] for r in result.history] == [1.0, 2.0]
    assert result.global_accuracy == pytest.approx(np.mean([r["global_accuracy"] for r in result.history]))
    assert (result.cloud_accuracy is not None) is (name == "cloud-alone")
    assert result.upload_bytes_per_client == 0.0


def test_an_unknown_reference_is_refused(tiny: AVMnist) -> None:
    with pytest.raises(ValueError, match="unknown reference 'oracle'"):
        run_reference(tiny, "oracle", 0.0, 0, CONFIG, TEXT)


# --- report ------------------------------------------------------------------------------------------------


def _record(method: str, p: float | None, seed: int, global_accuracy: float, **extra: Any) -> dict[str, Any]:
    return {"setting": "hard", "missing": "audio" if p is not None else "any", "backbone": "minilm",
            "method": method, "p": p, "seed": seed, "global_accuracy": global_accuracy,
            "client_accuracy_mean": 0.5, "cloud_accuracy": None, "rounds": 4, "rounds_to_95": 3, "seconds": 60.0,
            "history": [{"round": 1.0, "global_accuracy": global_accuracy}], **extra}


RECORDS = [
    _record("mlecs", 0.0, 0, 0.40), _record("mlecs", 0.0, 1, 0.60), _record("mlecs", 0.0, 2, 0.50),
    _record("fedavg", 0.0, 0, 0.35), _record("fedavg", 0.0, 1, 0.56), _record("fedavg", 0.0, 2, 0.44),
    _record("centralised-full", None, 0, 0.70), _record("centralised-full", None, 1, 0.80),
    _record("centralised-full", None, 2, 0.90),
    _record("mlecs", 0.4, 0, 0.30), _record("mlecs", 0.4, 1, 0.30),
]


def test_interval_is_the_students_t_interval_of_the_mean() -> None:
    mean, lower, upper = interval([1.0, 2.0, 3.0])

    assert mean == 2.0
    assert upper - mean == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-6)  # t(0.975, 2) * s / sqrt(n)
    assert lower == pytest.approx(2 * mean - upper)
    assert np.isnan(interval([5.0])[1])


def test_paired_comparisons_take_differences_seed_by_seed() -> None:
    comparison = paired(RECORDS, "global_accuracy", {"setting": "hard", "missing": "audio", "method": "mlecs",
                                                     "p": 0.0},
                        {"setting": "hard", "missing": "audio", "method": "fedavg", "p": 0.0}, "x")

    # Per seed +5, +4, +6 points: the seeds' spread (40..60) cancels, the interval is narrow.
    assert comparison.seeds == 3 and comparison.mean == pytest.approx(5.0)
    assert comparison.lower > 2.0 and comparison.upper < 8.0


def test_a_p_independent_reference_is_compared_at_every_p() -> None:
    comparison = paired(RECORDS, "global_accuracy", {"setting": "hard", "missing": "audio", "method": "mlecs",
                                                     "p": 0.4},
                        {"setting": "hard", "missing": "audio", "method": "centralised-full", "p": 0.4}, "x")

    assert comparison.seeds == 2 and comparison.mean == pytest.approx(-45.0)


def test_targets_are_met_only_where_the_interval_clears_them() -> None:
    within = next(t for t in TARGETS if t.name.startswith("centralised-full"))
    narrow = Comparison("x", 85.0, 81.0, 89.0, 5)
    wide = Comparison("x", 85.0, 75.0, 95.0, 5)
    gain = next(t for t in TARGETS if t.name == "ML-ECS ≥ FedAvg + 3 at p = 0.4")

    assert within.verdict(narrow) == "met" and within.verdict(wide) == "**not met**"
    assert gain.verdict(Comparison("x", 3.5, 0.5, 6.5, 5)) == "met"
    assert gain.verdict(Comparison("x", 2.5, 0.5, 4.5, 5)) == "**not met**"  # real, but smaller than +3
    assert gain.verdict(Comparison("x", 3.5, -0.5, 7.5, 5)) == "**not met**"  # the interval reaches 0
    assert gain.verdict(Comparison("x", 9.0, float("nan"), float("nan"), 1)) == "not enough seeds"


def test_markdown_report_shows_intervals_references_and_targets() -> None:
    table = markdown_report(RECORDS)

    lines = table.splitlines()
    assert "### hard, missing audio (3 seed(s))" in lines
    header = lines.index("| method | p=0 | p=0.4 |")
    assert lines[header + 2].startswith("| centralised-full | 80.0 ± 24.8 | 80.0 ± 24.8 |")
    assert "| mlecs | 50.0 ± 24.8 | 30.0 ± 0.0 |" in lines
    assert "| centralised-full ≥ 80% (hard) | +80.0 [+55.2, +104.8] | 3 | interval above +80 | **not met** |" in lines
    assert any(line.startswith("| ML-ECS loses at most 2 points") and "| 2 |" in line for line in lines)
    assert "canonical" not in table  # no canonical record: no canonical table or target row


def test_plots_are_written_as_pngs(tmp_path: Path) -> None:
    table = write_report(RECORDS, tmp_path)

    assert (tmp_path / "results.md").read_text() == table
    for name in ("accuracy_vs_p.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_the_report_tool_merges_chunks_and_a_later_record_replaces_an_earlier_one(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(RECORDS[:6]))
    second.write_text(json.dumps([*RECORDS[6:], _record("mlecs", 0.0, 0, 0.45)]))

    assert report_main([str(first), str(second), "--out", str(tmp_path / "merged")]) == 0

    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert len(merged) == len(RECORDS)
    replaced = [r for r in merged if r["method"] == "mlecs" and r["p"] == 0.0 and r["seed"] == 0]
    assert [r["global_accuracy"] for r in replaced] == [0.45]


# --- CLI ---------------------------------------------------------------------------------------------------


def test_parser_reads_lists_and_defaults_to_the_headline_backbone(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--out", str(tmp_path), "--p", "0,0.4", "--methods", "mlecs,centralised",
                                      "--setting", "hard", "--missing", "audio,alternate", "--first-seed", "3"])

    assert args.p == [0.0, 0.4] and args.methods == ["mlecs", "centralised"] and args.setting == ["hard"]
    assert args.missing == ["audio", "alternate"] and args.first_seed == 3
    assert args.out == tmp_path and args.backbone == "minilm" and args.clients == 10
    edge, cloud = BACKBONES["minilm"]
    assert (edge.backbone, edge.backbone_layers) == ("minilm", 2) and cloud is not None and cloud.backbone_layers == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p", "1.5"], "every p must be in [0, 1]"),
        (["--p", "0,x"], "comma-separated numbers"),
        (["--methods", "mlecs,nope"], "unknown ['nope']"),
        (["--setting", "easy"], "unknown ['easy']"),
        (["--missing", "video"], "unknown ['video']"),
        (["--backbone", "huge"], "invalid choice"),
    ],
)
def test_parser_rejects_bad_values_with_exit_code_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["--out", str(tmp_path), *argv])

    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_requires_an_output_directory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["--quick"])

    assert raised.value.code == 2 and "--out" in capsys.readouterr().err


def _fake_run(calls: list[tuple[Any, ...]]) -> Any:
    def fake(data: Any, method: str, p: float, seed: int, config: SimConfig, text: Any, say: Any = None) -> SimResult:
        calls.append((data, method, p, seed, config))
        accuracy = 0.5 + 0.1 * seed
        return SimResult(global_accuracy=accuracy, client_accuracy_mean=0.4, upload_bytes_per_client=10.0,
                         unseen_speaker_accuracy=0.3, cloud_accuracy=None,
                         history=[{"round": 1.0, "global_accuracy": accuracy, "seconds": 0.01}], seconds=0.01)

    return fake


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replaces the federations, references, the data set and MiniLM so that ``main`` runs in milliseconds."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(learning_cli, "simulate", _fake_run(calls))
    monkeypatch.setattr(learning_cli, "run_reference", _fake_run(calls))
    monkeypatch.setattr("mlecs.data.avmnist.load_avmnist",
                        lambda data_dir=None, setting="canonical", test_images_per_clip=1: setting)
    monkeypatch.setattr("mlecs.model.text.class_text_anchors", lambda: TEXT)
    return calls


def test_main_runs_the_grid_and_writes_results_table_and_plots(
    tmp_path: Path, fake_runs: list[tuple[Any, ...]]
) -> None:
    out = tmp_path / "run"

    code = learning_cli.main(["--out", str(out), "--setting", "hard", "--methods", "mlecs,centralised-full",
                              "--p", "0,0.4", "--seeds", "2", "--first-seed", "4", "--rounds", "3", "--clients", "4",
                              "--backbone", "tiny"])

    assert code == 0
    # The p-independent reference runs once per seed; the federation at every p.
    assert sorted((method, p, seed) for _, method, p, seed, _ in fake_runs) == sorted(
        [("centralised-full", 0.0, s) for s in (4, 5)] + [("mlecs", p, s) for p in (0.0, 0.4) for s in (4, 5)])
    config = fake_runs[0][4]
    assert (config.num_clients, config.rounds, config.model.backbone, config.stop_when_flat) == (4, 3, "tiny", True)
    assert config.missing == "audio"
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 6 and {r["rounds"] for r in records} == {1}
    assert {r["p"] for r in records if r["method"] == "centralised-full"} == {None}
    assert {r["backbone"] for r in records} == {"tiny"}
    assert set(records[0]) >= {"setting", "missing", "backbone", "method", "p", "seed", "global_accuracy",
                               "client_accuracy_mean", "cloud_accuracy", "rounds", "upload_bytes_per_client"}
    assert "| mlecs | 95.0 ± 63.5 | 95.0 ± 63.5 |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_p.png").read_bytes()[:8] == PNG_MAGIC


def test_quick_is_the_small_headline_grid(tmp_path: Path, fake_runs: list[tuple[Any, ...]]) -> None:
    assert learning_cli.main(["--out", str(tmp_path / "q"), "--quick"]) == 0

    assert sorted({m for _, m, _, _, _ in fake_runs}) == ["centralised", "fedavg", "mlecs"]
    assert {(p, seed) for _, _, p, seed, _ in fake_runs} == {(p, s) for p in (0.0, 0.4) for s in (0, 1)}
    config = fake_runs[0][4]
    assert config.model.backbone == "minilm" and config.missing == "audio" and config.rounds == 12
    assert {data for data, *_ in fake_runs} == {"hard"}


@pytest.mark.parametrize("argv", [["--clients", "1"], ["--seeds", "-1"], ["--rounds", "-2"], ["--seeds", "0"],
                                  ["--rounds", "0"], ["--first-seed", "-1"]])
def test_main_refuses_too_few_clients_seeds_or_rounds(
    argv: list[str], tmp_path: Path, fake_runs: list[tuple[Any, ...]]
) -> None:
    assert learning_cli.main(["--out", str(tmp_path / "run"), *argv]) == 2
    assert fake_runs == [] and not (tmp_path / "run").exists()
