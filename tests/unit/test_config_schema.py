"""A federation's config is declared once, in ``FederationConfig``: the admin API's schema takes every field's
type, default, description, bounds and section from it."""

from __future__ import annotations

import dataclasses

from server.domain.federation_config import CONFIG_BOUNDS, CONFIG_SECTIONS, FederationConfig
from server.transport.admin_schemas import FederationConfigBody
from server.transport.config_schema import attribute_docs


def test_every_field_is_in_one_section_and_documented_where_it_is_declared() -> None:
    names = [f.name for f in dataclasses.fields(FederationConfig)]
    sectioned = [name for section in CONFIG_SECTIONS.values() for name in section]
    assert sorted(sectioned) == sorted(names), "each field in exactly one section"
    docs = attribute_docs(FederationConfig)
    assert [name for name in names if not docs.get(name)] == []


def test_the_api_schema_is_the_domain_declaration() -> None:
    schema = FederationConfigBody.model_json_schema()["properties"]
    docs = attribute_docs(FederationConfig)
    defaults = FederationConfig()
    assert list(schema) == [f.name for f in dataclasses.fields(FederationConfig)]
    for name, spec in schema.items():
        assert spec["description"] == docs[name]
        assert spec["x-section"] in CONFIG_SECTIONS and name in CONFIG_SECTIONS[spec["x-section"]]
        if name in CONFIG_BOUNDS:
            bounds = CONFIG_BOUNDS[name]
            assert spec.get("exclusiveMinimum" if bounds.low_open else "minimum") == bounds.low, name
            assert spec.get("exclusiveMaximum" if bounds.high_open else "maximum") == bounds.high, name
    assert FederationConfigBody().to_domain() == defaults


def test_attribute_docs_reads_the_literal_under_each_annotated_attribute() -> None:
    @dataclasses.dataclass
    class Example:
        documented: int = 1
        """Spread over
        two lines, with ``code``."""
        bare: int = 2
        other: str = ""
        """Only this."""

    assert attribute_docs(Example) == {"documented": "Spread over two lines, with `code`.", "other": "Only this."}


def test_the_device_task_is_the_training_section_every_field_the_wire_carries() -> None:
    from mlecs.proto.v1 import fleet_pb2 as pb
    from server.transport.grpc_convert import train_config

    config = FederationConfig(batch_size=7, learning_rate=0.02, seed=11, personal_epochs=3, private_epochs=2,
                              fused_upload_samples=5, upload_codec="int8", upload_stage="public",
                              model={"backbone": "tiny"})
    sent = train_config(config)
    wire = {field.name for field in pb.TrainConfig.DESCRIPTOR.fields}
    carried = (set(CONFIG_SECTIONS["training"]) & wire) | {"model_config_json"}
    assert carried == wire, "every TrainConfig field comes from the training section"
    assert (sent.batch_size, sent.seed, sent.personal_epochs, sent.fused_upload_samples) == (7, 11, 3, 5)
    assert abs(sent.learning_rate - 0.02) < 1e-9 and sent.model_config_json == '{"backbone": "tiny"}'
    assert (sent.upload_codec, sent.upload_stage) == (pb.CODEC_INT8_ZSTD, pb.UPLOAD_STAGE_PUBLIC)
