"""The configuration reference is generated from the settings' field docs and must not drift from them."""

from __future__ import annotations

from tools.config_reference import PAGE, render


def test_the_configuration_reference_is_up_to_date() -> None:
    assert PAGE.read_text() == render(), "run: python -m tools.config_reference"


def test_every_setting_is_in_the_reference_with_its_meaning() -> None:
    from server.config import CoordinatorSettings

    text = PAGE.read_text()
    for name, field in CoordinatorSettings.model_fields.items():
        assert f"| `MLECS_{name.upper()}` |" in text, name
        assert field.description and field.description.split()[0] in text, name
