"""An agent whose update the coordinator refuses waits for the next round instead of retraining the same one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.errors import RequestRefused
from edge_agent.state import PendingUpload
from edge_agent.tasks import Stop, TrainTask
from edge_agent.trainer import LocalData

TASK = TrainTask(round_id="r1", round_number=1, version_id="v0", public_epochs=1, private_epochs=1, batch_size=8,
                 learning_rate=1e-3, upload_codec="fp32", max_chunk_bytes=1024, seed=0, model={})


class ScriptedCoordinator:
    """Offers round r1 until told to stop; refuses every upload as the coordinator does an invalid header."""

    def __init__(self) -> None:
        self.tasks_served = 0
        self.stop_after = 6

    def authenticate(self, device_id: str, secret: str) -> None: ...
    def enrol(self, *args: object) -> tuple[str, str, int]: return "dev-1", "secret", 0  # 0: keep the agent's
    def heartbeat(self, device_id: str) -> int: return 0
    def report_metrics(self, *args: object) -> None: ...
    def close(self) -> None: ...
    def upload_status(self, *args: object) -> tuple[str, int]: return "unknown", 0

    def get_task(self, device_id: str) -> TrainTask | Stop:
        self.tasks_served += 1
        return Stop("done") if self.tasks_served > self.stop_after else TASK

    def upload(self, *args: object) -> tuple[str, int]:
        raise RequestRefused("INVALID_ARGUMENT: invalid upload header")


class RecordingAgent(Agent):
    trained = 0

    def _train(self, task: TrainTask) -> None:  # the upload path of a real round, without the training
        self.trained += 1
        pending = PendingUpload(round_id=task.round_id, upload_id="u", base_version_id="v0", codec="fp32",
                                sha256="0" * 64, size=3, public_samples=0, private_samples=5, metrics={})
        self._upload(pending, b"abc")


def test_a_refused_round_is_not_trained_again(tmp_path: Path) -> None:
    settings = AgentSettings(federation="f", device_name="d", state_dir=tmp_path, allow_plaintext=True,
                             data={"dataset": tmp_path, "task": "avmnist"})  # type: ignore[arg-type]
    coordinator = ScriptedCoordinator()
    empty = np.zeros(0)
    data = LocalData(modalities=frozenset({"image"}), public=empty, private_train=empty,  # type: ignore[arg-type]
                     private_heldout=empty)
    agent = RecordingAgent(settings, coordinator, data)  # type: ignore[arg-type]
    agent._heartbeat_s = 0.01  # the wait between offers: the test counts trainings, not time
    runner = threading.Thread(target=agent.run)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive()
    assert coordinator.tasks_served == coordinator.stop_after + 1
    assert agent.trained == 1


def test_a_public_stage_federation_without_public_data_is_a_configuration_error(tmp_path: Path) -> None:
    import pytest

    from edge_agent.trainer import AmtTrainer, TaskMismatch
    from mlecs.datasets.dataset import MultimodalData

    empty = MultimodalData(ids=np.zeros(0, dtype=object), labels=np.zeros(0, dtype=np.int64),
                           splits=np.zeros(0, dtype=object), inputs={"image": np.zeros((0, 1, 28, 28), np.float32)},
                           present={"image": np.zeros(0, dtype=bool)})
    data = LocalData(modalities=frozenset({"image"}), public=empty, private_train=empty, private_heldout=empty)
    task = TrainTask(**{**TASK.__dict__, "upload_stage": "public", "model": {"backbone": "tiny"}})
    with pytest.raises(TaskMismatch, match=r"set data\.public"):
        AmtTrainer(data, tmp_path / "personal.pt").run(task, {}, {}, lambda: False)
