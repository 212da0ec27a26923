"""Agent configuration, read once from a TOML file (``/etc/mlecs/agent.toml`` when installed)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlecs.modality import parse_modalities


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message says what to fix. Not retryable."""


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Path | None = None
    """AV-MNIST directory; unset uses MLECS_DATA_DIR or the repository's shared data."""
    setting: Literal["canonical", "hard"] = "canonical"
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of the private data kept aside to evaluate the personalised model."""


class PartitionSettings(BaseModel):
    """Which shard of the data set this device holds (recomputed from the seed, never copied)."""

    model_config = ConfigDict(extra="forbid")

    num_clients: int = Field(ge=1)
    client_index: int = Field(ge=0)
    scheme: Literal["speaker", "dirichlet", "speaker-dirichlet"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    public_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coordinator: str = "127.0.0.1:50051"
    """host:port of the coordinator's gRPC endpoint, or several replicas as a gRPC target such as
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (calls are spread over them and fail over when one is down)."""
    federation: str
    device_name: str = Field(min_length=1, max_length=128)
    modalities: list[str]
    """The sensors this device has, e.g. ["image", "audio"]."""
    state_dir: Path = Path("/var/lib/mlecs-agent")
    """Durable state: identity, personalised model, pending uploads."""
    torch_threads: int = Field(1, ge=1)
    max_backoff_s: float = Field(30.0, gt=0)
    data: DataSettings = Field(default_factory=DataSettings)
    partition: PartitionSettings

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, value: list[str]) -> list[str]:
        return sorted(m.value for m in parse_modalities(value))


def load_settings(path: Path) -> AgentSettings:
    """Reads and validates the TOML file; raises ConfigError naming the problem."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        settings = AgentSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc
    if settings.partition.client_index >= settings.partition.num_clients:
        raise ConfigError(f"{path}: partition.client_index must be below partition.num_clients")
    return settings
