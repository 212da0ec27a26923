"""The learning benchmark: an in-process federation on the tiny fixture, its table and plot, and its CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import benchmarks.learning as learning_cli
from benchmarks.federation_sim import DEFAULT_METHODS, METHODS, SimConfig, SimResult, simulate
from benchmarks.learning import build_parser
from benchmarks.learning_report import markdown_table, plot_accuracy
from mlecs.data.avmnist import AVMnist, load_avmnist_tiny
from mlecs.learning.amt import AmtRecipe
from mlecs.model import ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two clients: the tiny fixture has too few samples per speaker for the default ten (see the report).
CONFIG = SimConfig(num_clients=2, rounds=1, unseen_speaker=0, model=ModelConfig(backbone="tiny"),
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

    assert again.history == results["fedavg"].history
    assert again.unseen_speaker_accuracy == results["fedavg"].unseen_speaker_accuracy
    assert no_unseen.unseen_speaker_accuracy is None
    assert 0.0 <= no_unseen.global_accuracy <= 1.0


def test_methods_are_the_baselines_and_the_ablations() -> None:
    assert DEFAULT_METHODS == ("local", "fedavg", "mlecs", "mlecs-no-ccl", "mlecs-no-seccl", "mlecs-no-mma")
    assert set(METHODS) == {*DEFAULT_METHODS, "mlecs-exact-lora"} and METHODS["mlecs-exact-lora"].exact_lora
    assert not METHODS["local"].federated and METHODS["fedavg"].zero_fill
    assert METHODS["mlecs-no-mma"].aggregation == "fedavg" and METHODS["mlecs-no-seccl"].seccl is False


# --- report ------------------------------------------------------------------------------------------------


def _record(method: str, p: float, seed: int, global_accuracy: float, **extra: Any) -> dict[str, Any]:
    return {"setting": "hard", "method": method, "p": p, "seed": seed, "global_accuracy": global_accuracy,
            "client_accuracy_mean": 0.5, "unseen_speaker_accuracy": None, **extra}


RECORDS = [
    _record("mlecs", 0.0, 0, 0.4), _record("mlecs", 0.0, 1, 0.6),
    _record("local", 0.0, 0, 0.25), _record("local", 0.0, 1, 0.25),
    _record("mlecs", 0.4, 0, 0.3), _record("mlecs", 0.4, 1, 0.3),
]


def test_markdown_table_shows_mean_and_std_in_percent() -> None:
    table = markdown_table(RECORDS)

    lines = table.splitlines()
    assert lines[0] == "### hard (accuracy %, mean ± std over 2 seed(s))"
    assert lines[2] == "global model, test split:"
    assert lines[4] == "| method | p=0 | p=0.4 |"
    assert lines[6] == "| mlecs | 50.0 ± 10.0 | 30.0 ± 0.0 |"
    assert lines[7] == "| local | 25.0 ± 0.0 | – |"
    client = lines.index("personalised clients, local held-out (mean):")
    assert lines[client + 4] == "| mlecs | 50.0 ± 0.0 | 50.0 ± 0.0 |"
    assert "unseen speaker" not in table  # no record measured it: no empty table


def test_markdown_table_makes_one_table_per_setting() -> None:
    records = [*RECORDS, {**_record("fedavg", 0.2, 0, 0.1), "setting": "canonical"}]

    table = markdown_table(records)

    assert table.index("### canonical") < table.index("### hard")
    assert "| fedavg | 10.0 ± 0.0 |" in table
    assert "over 1 seed(s)" in table


def test_plot_accuracy_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "accuracy.png"

    plot_accuracy(RECORDS, path)

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


# --- CLI ---------------------------------------------------------------------------------------------------


def test_parser_reads_lists_of_p_methods_and_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--out", str(tmp_path), "--p", "0,0.4", "--methods", "mlecs,local",
                                      "--setting", "hard"])

    assert args.p == [0.0, 0.4] and args.methods == ["mlecs", "local"] and args.setting == ["hard"]
    assert args.out == tmp_path and args.backbone == "tiny" and args.clients == 10
    assert build_parser().parse_args(["--out", "x"]).methods == [m for m in METHODS if m != "mlecs-exact-lora"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p", "1.5"], "every p must be in [0, 1]"),
        (["--p", "0,x"], "comma-separated numbers"),
        (["--methods", "mlecs,nope"], "unknown ['nope']"),
        (["--setting", "easy"], "unknown ['easy']"),
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


def _fake_simulate(calls: list[tuple[Any, ...]]) -> Any:
    def fake(data: Any, method: str, p: float, seed: int, config: SimConfig, text: Any) -> SimResult:
        calls.append((data, method, p, seed, config))
        accuracy = 0.5 + 0.1 * seed
        return SimResult(global_accuracy=accuracy, client_accuracy_mean=0.4, upload_bytes_per_client=10.0,
                         unseen_speaker_accuracy=0.3, cloud_accuracy=None,
                         history=[{"round": 1.0, "global_accuracy": accuracy}], seconds=0.01)

    return fake


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replaces the federation, the data set and MiniLM so that ``main`` runs in milliseconds."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(learning_cli, "simulate", _fake_simulate(calls))
    monkeypatch.setattr("mlecs.data.avmnist.load_avmnist", lambda data_dir=None, setting="canonical": setting)
    monkeypatch.setattr("mlecs.model.text.class_text_anchors", lambda: TEXT)
    return calls


def test_main_runs_the_grid_and_writes_results_table_and_plot(tmp_path: Path, fake_runs: list[tuple[Any, ...]]) -> None:
    out = tmp_path / "run"

    code = learning_cli.main(["--out", str(out), "--setting", "hard", "--methods", "mlecs,local", "--p", "0,0.4",
                              "--seeds", "2", "--rounds", "3", "--clients", "4"])

    assert code == 0
    assert len(fake_runs) == 8
    assert {(method, p, seed) for _, method, p, seed, _ in fake_runs} == {
        (m, p, s) for m in ("mlecs", "local") for p in (0.0, 0.4) for s in (0, 1)
    }
    config = fake_runs[0][4]
    assert (config.num_clients, config.rounds, config.model.backbone) == (4, 3, "tiny")
    assert all(call[0] == "hard" for call in fake_runs)
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 8 and {r["rounds"] for r in records} == {3}
    assert "| mlecs | 55.0 ± 5.0 | 55.0 ± 5.0 |" in (out / "results.md").read_text()  # global, both p
    assert (out / "accuracy_vs_p.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv", [["--clients", "1"], ["--seeds", "-1"], ["--rounds", "-2"]])
def test_main_refuses_too_few_clients_seeds_or_rounds(
    argv: list[str], tmp_path: Path, fake_runs: list[tuple[Any, ...]]
) -> None:
    assert learning_cli.main(["--out", str(tmp_path / "run"), *argv]) == 2
    assert fake_runs == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--rounds", "0"]])
def test_main_refuses_zero_seeds_or_rounds(argv: list[str], tmp_path: Path, fake_runs: list[tuple[Any, ...]]) -> None:
    code = learning_cli.main(["--out", str(tmp_path / "run"), "--methods", "local", "--p", "0", "--setting", "hard",
                              *argv])

    assert code == 2 and fake_runs == []
