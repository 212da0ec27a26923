"""Agent configuration, read once from a TOML file (``/etc/mlecs/agent.toml`` when installed)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from mlecs.certs import CertificateError, check_key_pair, common_name
from mlecs.modality import parse_modalities


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message says what to fix. Not retryable."""


class DataSettings(BaseModel):
    """Where the device's data is: its own dataset directory (``dataset`` + ``task``), or a partition of the
    bundled AV-MNIST file (``dir`` + ``[partition]``, for benchmarks and demos)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dataset: Path | None = None
    """This device's dataset directory (``manifest.csv`` and its files, docs/datasets.md). The agent reads
    nothing else; its ``split`` column marks the held-out samples."""
    task: str | None = None
    """The federation's task: a built-in name (``avmnist``) or the path of its task file. Needed with ``dataset``."""
    public: Path | None = None
    """Optional, with ``dataset``: this device's own copy of (part of) the federation's public set, as a dataset
    directory; the coordinator checks each sample (id, label, file bytes) and the ones it does not recognise are
    left out. Unset: the device downloads its public shard from the coordinator and caches it in ``state_dir``."""
    dir: Path | None = None
    """Partition mode: the AV-MNIST directory; unset uses MLECS_DATA_DIR or the repository's shared data."""
    setting: Literal["canonical", "hard"] = "canonical"
    """Partition mode: the AV-MNIST setting."""
    heldout_fraction: float = Field(0.15, gt=0, lt=1)
    """Partition mode: share of the private data kept aside to evaluate the personalised model."""


class PartitionSettings(BaseModel):
    """Which shard of the data set this device holds (recomputed from the seed, never copied)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    num_clients: int = Field(ge=1)
    """How many devices the bundled AV-MNIST is dealt to."""
    client_index: int = Field(ge=0)
    """This device's share, from 0 to num_clients - 1."""
    scheme: Literal["speaker", "dirichlet", "speaker-dirichlet"] = "dirichlet"
    """``dirichlet``: label skew; ``speaker``: one speaker's clips per device; ``speaker-dirichlet``: both."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration: smaller means more label skew."""
    public_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the training pairs that plays the public set (must match the federation's)."""
    seed: int = 0
    """Seed of the partition (must match the federation's)."""


class TlsSettings(BaseModel):
    """Mutual TLS to the coordinator: files from ``mlecs certs`` (or your own CA)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    ca_file: Path
    """CA certificate the coordinator's certificate must chain to (``ca.pem``)."""
    cert_file: Path
    """This device's client certificate (``mlecs certs device NAME``); its CN must equal ``device_name``."""
    key_file: Path
    """The private key of ``cert_file`` (keep it mode 0600)."""
    server_name: str | None = None
    """The name to check the coordinator's certificate against when it is not the host in ``coordinator``
    (e.g. a target listing several replica IPs); default: that host."""


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of a checked ``TlsSettings``, as the gRPC channel needs them."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str | None = None


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    coordinator: str = "127.0.0.1:50051"
    """host:port of the coordinator's gRPC endpoint, or several replicas as a gRPC target such as
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (calls are spread over them and fail over when one is down)."""
    federation: str
    """The federation to enrol in (its name)."""
    device_name: str = Field(min_length=1, max_length=128)
    """This device's stable name; with mutual TLS its certificate's CN."""
    modalities: list[str] | None = None
    """The sensors this device has, e.g. ["image", "audio"]. Partition mode: required. With a dataset:
    default the modalities its samples have; if set, only these are used."""
    state_dir: Path = Path("/var/lib/mlecs-agent")
    """Durable state: identity, personalised model, pending uploads."""
    torch_threads: int = Field(1, ge=1)
    """CPU threads training may use."""
    max_backoff_s: float = Field(30.0, gt=0)
    """Longest wait between retries while the coordinator is unavailable, in seconds."""
    data: DataSettings = Field(default_factory=DataSettings)
    """Where the device's data is (the ``[data]`` table)."""
    partition: PartitionSettings | None = None
    """Partition mode only: which shard of the bundled AV-MNIST this device holds."""
    tls: TlsSettings | None = None
    """Mutual TLS to the coordinator; required unless ``allow_plaintext``."""
    allow_plaintext: bool = False
    """Talk to the coordinator without TLS. For local development only (logged loudly at start)."""
    enrolment_token: SecretStr | None = None
    """The one-time enrolment token from the operator (``mlecs-coordinator enrolment-tokens create``). Needed
    only for the first enrolment; prefer ``enrolment_token_file``, which keeps it out of the config."""
    enrolment_token_file: Path | None = None
    """A file holding the enrolment token (read only when the agent enrols)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines on stderr: ``text`` for a terminal, ``json`` (one object per line) for the journal."""

    def enrolment_token_value(self) -> str:
        """The enrolment token, or "" when none is configured (the coordinator may allow open enrolment).
        Raises ConfigError when the token file cannot be read."""
        if self.enrolment_token is not None:
            return self.enrolment_token.get_secret_value().strip()
        if self.enrolment_token_file is None:
            return ""
        try:
            return self.enrolment_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"enrolment_token_file {self.enrolment_token_file} cannot be read: {exc.strerror}; "
                              "the agent needs it to enrol") from exc

    def tls_material(self) -> TlsMaterial | None:
        """The TLS files, read and checked (the key matches the certificate, whose CN is this device's
        name); None for plaintext. Raises ConfigError naming the file and the problem."""
        if self.tls is None:
            return None
        pems = {}
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self.tls, key)
            try:
                pems[key] = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"tls.{key}: {path} cannot be read: {exc.strerror}") from exc
        try:
            check_key_pair(pems["cert_file"], pems["key_file"], f"tls.cert_file {self.tls.cert_file} with tls.key_file")
            name = common_name(pems["cert_file"])
        except CertificateError as exc:
            raise ConfigError(str(exc)) from exc
        if name != self.device_name:
            raise ConfigError(f"tls.cert_file {self.tls.cert_file} is for device {name!r}, but device_name is "
                              f"{self.device_name!r}: the coordinator accepts a certificate only for the device "
                              "it names")
        if b"-----BEGIN CERTIFICATE-----" not in pems["ca_file"]:
            raise ConfigError(f"tls.ca_file {self.tls.ca_file} holds no PEM certificate")
        return TlsMaterial(pems["ca_file"], pems["cert_file"], pems["key_file"], self.tls.server_name)

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else sorted(parse_modalities(value))


def _check_data_source(path: Path, settings: AgentSettings) -> None:
    data = settings.data
    if data.dataset is not None:
        if settings.partition is not None:
            raise ConfigError(f"{path}: [partition] picks a shard of the bundled AV-MNIST; with data.dataset the "
                              "device reads only its own directory: remove [partition]")
        if data.task is None:
            raise ConfigError(f"{path}: data.task is missing: name the federation's task (a built-in such as "
                              "\"avmnist\", or the path of its task file)")
        return
    if data.task is not None or data.public is not None:
        raise ConfigError(f"{path}: data.task and data.public go with data.dataset (the device's dataset directory)")
    if settings.partition is None:
        raise ConfigError(f"{path}: no data: set data.dataset (this device's dataset directory) and data.task, or "
                          "a [partition] of the bundled AV-MNIST")
    if settings.modalities is None:
        raise ConfigError(f"{path}: modalities is missing: list the modalities this device holds")
    if settings.partition.client_index >= settings.partition.num_clients:
        raise ConfigError(f"{path}: partition.client_index must be below partition.num_clients")


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
    _check_data_source(path, settings)
    if settings.tls is None and not settings.allow_plaintext:
        raise ConfigError(f"{path}: no [tls] section: set tls.ca_file, tls.cert_file and tls.key_file (from `mlecs "
                          "certs`), or allow_plaintext = true for local development only")
    if settings.enrolment_token is not None and settings.enrolment_token_file is not None:
        raise ConfigError(f"{path}: set enrolment_token or enrolment_token_file, not both")
    try:
        settings.tls_material()  # the files are checked now, not at the first connection
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return settings
