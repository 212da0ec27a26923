"""FederationConfig scheduling fields: defaults, refusals naming the field, eligibility, and the admin schema."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from server.domain.errors import InvalidRequestError
from server.domain.federation_config import FederationConfig
from server.transport.admin_schemas import FederationConfigBody

AUDIO_IMAGE = frozenset({"audio", "image"})


def test_the_scheduling_fields_default_to_synchronous_rounds_without_restrictions() -> None:
    config = FederationConfig()
    assert (config.mode, config.overselect, config.async_buffer, config.max_staleness, config.staleness_exponent,
            config.eligible_modality_sets, config.target_rounds, config.server_learning) == (
        "sync", 0.0, 4, 4, 0.5, [], 0, True)


def test_default_eligible_modality_sets_are_not_shared_between_configs() -> None:
    first, second = FederationConfig(), FederationConfig()
    first.eligible_modality_sets.append(["image"])
    assert second.eligible_modality_sets == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "fast", "mode must be 'sync' or 'async', not 'fast'"),
    ("overselect", -1, r"overselect must be in \[0, 10\], not -1"),
    ("overselect", 10.5, r"overselect must be in \[0, 10\], not 10.5"),
    ("async_buffer", 0, r"async_buffer must be in \[1, 100000\], not 0"),
    ("max_staleness", -1, "max_staleness"),
    ("staleness_exponent", -0.1, "staleness_exponent"),
    ("target_rounds", -1, r"target_rounds must be in \[0, 1000000\], not -1"),
    ("eligible_modality_sets", [["smell"]], "eligible_modality_sets: \\['smell'\\].*unknown modality 'smell'"),
    ("eligible_modality_sets", [[]], "eligible_modality_sets: \\[\\] is not a set of modality names"),
    ("eligible_modality_sets", [["image", "image"]], "eligible_modality_sets: \\['image', 'image'\\]"),
    ("eligible_modality_sets", [["image"], ["audio", "smell"]], "eligible_modality_sets: \\['audio', 'smell'\\]"),
])
def test_an_invalid_scheduling_value_is_refused_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FederationConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("mode", "async"), ("overselect", 0.0), ("overselect", 10.0), ("async_buffer", 1), ("max_staleness", 0),
    ("staleness_exponent", 0.0), ("target_rounds", 0), ("eligible_modality_sets", [["image"], ["audio", "image"]]),
    ("server_learning", False),
])
def test_boundary_scheduling_values_are_accepted(field: str, value: Any) -> None:
    assert getattr(FederationConfig(**{field: value}), field) == value


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ValueError, match=r"async_buffer must be in \[1, 100000\], not 0; "
                                         r"target_rounds must be in \[0, 1000000\], not -1"):
        FederationConfig(async_buffer=0, target_rounds=-1)


@pytest.mark.parametrize("modalities", [frozenset({"image"}), frozenset({"audio"}), AUDIO_IMAGE])
def test_without_eligible_sets_every_device_is_eligible(modalities: frozenset[str]) -> None:
    assert FederationConfig().eligible(modalities)


def test_an_eligible_set_admits_only_devices_with_exactly_that_modality_set() -> None:
    config = FederationConfig(eligible_modality_sets=[["audio", "image"]])
    assert config.eligible(AUDIO_IMAGE)
    assert not config.eligible(frozenset({"image"}))
    assert not config.eligible(frozenset({"audio"}))


def test_any_of_several_eligible_sets_admits_a_device() -> None:
    config = FederationConfig(eligible_modality_sets=[["image"], ["audio"]])
    assert config.eligible(frozenset({"image"}))
    assert config.eligible(frozenset({"audio"}))
    assert not config.eligible(AUDIO_IMAGE)


def test_eligible_set_names_are_case_and_space_insensitive() -> None:
    config = FederationConfig(eligible_modality_sets=[["Audio", " IMAGE "]])
    assert config.eligible(AUDIO_IMAGE)
    assert not config.eligible(frozenset({"audio"}))


# ---------------------------------------------------------------------------------------------------
# The admin API schema


def test_the_admin_schema_maps_every_scheduling_field_to_the_domain_config() -> None:
    config = FederationConfigBody(**{
        "mode": "async", "overselect": 0.5, "async_buffer": 8, "max_staleness": 2, "staleness_exponent": 1.0,
        "eligible_modality_sets": [["audio", "image"]], "target_rounds": 5, "server_learning": False,
    }).to_domain()
    assert isinstance(config, FederationConfig)
    assert (config.mode, config.overselect, config.async_buffer, config.max_staleness, config.staleness_exponent,
            config.eligible_modality_sets, config.target_rounds, config.server_learning) == (
        "async", 0.5, 8, 2, 1.0, [["audio", "image"]], 5, False)


def test_the_admin_schema_defaults_equal_the_domain_defaults() -> None:
    assert FederationConfigBody().to_domain() == FederationConfig()


@pytest.mark.parametrize("sets", [[["smell"]], [[]], [["audio", "audio"]]])
def test_an_invalid_eligible_set_from_the_admin_api_is_an_invalid_request(sets: list[list[str]]) -> None:
    body = FederationConfigBody(eligible_modality_sets=sets)
    with pytest.raises(InvalidRequestError, match="invalid federation config: eligible_modality_sets"):
        body.to_domain()


@pytest.mark.parametrize(("field", "value"), [
    ("mode", "fast"), ("overselect", -1), ("overselect", 11), ("async_buffer", 0), ("max_staleness", -1),
    ("staleness_exponent", -0.5), ("target_rounds", -1),
])
def test_the_admin_schema_refuses_out_of_range_scheduling_values_itself(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        FederationConfigBody(**{field: value})
