from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_settings

GOOD = """
coordinator = "127.0.0.1:50051"
federation = "demo"
device_name = "cam-1"
modalities = ["image"]
allow_plaintext = true
[partition]
num_clients = 3
client_index = 1
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_minimal_config_loads_with_documented_defaults(tmp_path):
    settings = load_settings(_write(tmp_path, GOOD))
    assert settings.modalities == ["image"]
    assert settings.partition.scheme == "dirichlet" and settings.data.setting == "canonical"


def test_a_missing_file_says_which_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_a_badly_spelled_modality_is_refused_while_the_federation_decides_which_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"modalities.*'Li Dar'.*lower-case letters"):
        load_settings(_write(tmp_path, GOOD.replace('["image"]', '["Li Dar"]')))
    # Which modalities exist is the federation's task's to say: the coordinator refuses at enrolment.
    assert load_settings(_write(tmp_path, GOOD.replace('["image"]', '["lidar"]'))).modalities == ["lidar"]


def test_a_client_index_outside_the_partition_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="client_index must be below"):
        load_settings(_write(tmp_path, GOOD.replace("client_index = 1", "client_index = 3")))


def test_misspelt_keys_are_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match="federaton"):
        load_settings(_write(tmp_path, GOOD + 'federaton = "x"\n'))


def test_invalid_toml_is_reported_as_such(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(_write(tmp_path, "coordinator = \n"))

