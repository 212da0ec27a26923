"""The edge model with the tiny backbone: missing modalities, shared-state naming and loading, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlecs.modality import Modality
from mlecs.model import (
    EdgeModel,
    ModelConfig,
    build_edge_model,
    full_model_fp32_bytes,
    shared_schema,
    tensor_modality,
)
from mlecs.model.backbone import base_model

TINY = ModelConfig(backbone="tiny")
BOTH = frozenset(Modality)
IMAGE = frozenset({Modality.IMAGE})
AUDIO = frozenset({Modality.AUDIO})


def _batch(size: int = 4) -> dict[Modality, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        Modality.IMAGE: torch.rand(size, 1, 28, 28, generator=generator),
        Modality.AUDIO: torch.randn(size, 1, 40, 64, generator=generator),
    }


@pytest.fixture(scope="module")
def both_model() -> EdgeModel:
    return build_edge_model(TINY, BOTH, seed=0).eval()


def test_forward_gives_logits_and_fused_representation(both_model: EdgeModel) -> None:
    output = both_model(_batch())

    assert output.logits.shape == (4, 10)
    assert output.fused.shape == (4, TINY.fused_dim)


def test_a_missing_modality_is_absent_and_changes_the_output(both_model: EdgeModel) -> None:
    batch = _batch()
    with torch.no_grad():
        both = both_model(batch).logits
        image_only = both_model({Modality.IMAGE: batch[Modality.IMAGE]}).logits
        zero_audio = both_model({**batch, Modality.AUDIO: torch.zeros_like(batch[Modality.AUDIO])}).logits

    assert torch.isfinite(image_only).all()
    assert not torch.allclose(image_only, both)
    # Absent is not the same as silence: the presence mask tells the connector the slot is empty.
    assert not torch.allclose(image_only, zero_audio)


def test_single_modality_model_holds_only_its_extractor() -> None:
    model = build_edge_model(TINY, IMAGE, seed=0)

    assert model.modalities == IMAGE
    assert list(model.extractors.keys()) == ["image"]
    with pytest.raises(ValueError, match="no extractor for"):
        model(_batch())


def test_forward_rejects_empty_inputs_and_mismatched_batches(both_model: EdgeModel) -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="at least one modality"):
        both_model({})
    with pytest.raises(ValueError, match="same batch size"):
        both_model({Modality.IMAGE: batch[Modality.IMAGE], Modality.AUDIO: batch[Modality.AUDIO][:2]})


def test_shared_names_agree_across_devices_with_different_modality_sets() -> None:
    states = {m: build_edge_model(TINY, m, seed=0).shared_state() for m in (BOTH, IMAGE, AUDIO)}

    assert set(states[IMAGE]) | set(states[AUDIO]) == set(states[BOTH])
    common = set(states[IMAGE]) & set(states[AUDIO])
    assert common and all(tensor_modality(name) is None for name in common)
    assert all(tensor_modality(name) == Modality.IMAGE for name in set(states[IMAGE]) - common)


def test_same_seed_gives_identical_shared_tensors_on_every_device() -> None:
    full = build_edge_model(TINY, BOTH, seed=3).shared_state()
    audio_only = build_edge_model(TINY, AUDIO, seed=3).shared_state()
    other_seed = build_edge_model(TINY, BOTH, seed=4).shared_state()

    assert all(torch.equal(audio_only[name], full[name]) for name in audio_only)
    assert not torch.equal(other_seed["extractors.image.conv1.weight"], full["extractors.image.conv1.weight"])


def test_building_a_model_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_edge_model(TINY, BOTH, seed=0)

    assert torch.equal(torch.rand(3), expected)


def test_shared_state_uses_normalised_names_and_detached_fp32_copies(both_model: EdgeModel) -> None:
    state = both_model.shared_state()

    assert "lora.layer0.query.A" in state and "lora.layer1.value.B" in state
    assert "extractors.image.conv1.weight" in state and "head.weight" in state
    assert not any("default" in name or "base_model" in name for name in state)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in state.values())
    state["head.bias"].add_(1.0)
    assert not torch.equal(state["head.bias"], both_model.shared_state()["head.bias"])


def test_shared_schema_matches_a_full_modality_model(both_model: EdgeModel) -> None:
    schema = shared_schema(TINY)

    assert schema == {name: tuple(t.shape) for name, t in both_model.shared_state().items()}


def test_load_shared_state_round_trips_between_devices() -> None:
    source = build_edge_model(TINY, BOTH, seed=1)
    target = build_edge_model(TINY, IMAGE, seed=2)

    target.load_shared_state(source.shared_state())

    loaded = target.shared_state()
    expected = source.shared_state()
    assert all(torch.equal(loaded[name], expected[name]) for name in loaded)


def test_load_shared_state_rejects_missing_tensors_shape_mismatches_and_unknown_names() -> None:
    model = build_edge_model(TINY, IMAGE, seed=0)
    state = model.shared_state()

    missing = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"head\.bias"):
        model.load_shared_state(missing)
    with pytest.raises(ValueError, match=r"head\.weight"):
        model.load_shared_state({**state, "head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"lora\.layer9"):
        model.load_shared_state({**state, "lora.layer9.query.A": torch.zeros(1)})
    # Nothing was half-applied by the failed loads.
    assert all(torch.equal(model.shared_state()[k], v) for k, v in state.items())


def test_shared_parameters_are_exactly_the_trainable_tensors(both_model: EdgeModel) -> None:
    trainable = {id(p) for p in both_model.parameters() if p.requires_grad}

    assert {id(p) for p in both_model.shared_parameters()} == trainable
    assert len(both_model.shared_parameters()) == len(both_model.shared_state())


def test_backbone_base_weights_are_frozen(both_model: EdgeModel) -> None:
    base = base_model(both_model.backbone)

    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)


def test_personal_state_round_trips_through_torch_save(tmp_path: Path) -> None:
    source = build_edge_model(TINY, AUDIO, seed=5)
    target = build_edge_model(TINY, AUDIO, seed=6)
    path = tmp_path / "personal.pt"

    torch.save(source.personal_state(), path)
    target.load_personal_state(torch.load(path))

    assert all(torch.equal(target.personal_state()[k], v) for k, v in source.personal_state().items())
    with pytest.raises(ValueError, match="unknown personal tensor"):
        target.load_personal_state({**source.personal_state(), "extractors.image.conv1.weight": torch.zeros(1)})


def test_full_model_fp32_bytes_matches_a_direct_count(both_model: EdgeModel) -> None:
    direct = 4 * sum(p.numel() for p in both_model.parameters())

    assert full_model_fp32_bytes(TINY) == direct


def test_model_config_round_trips_through_a_dict_and_rejects_unknown_keys() -> None:
    config = ModelConfig(feature_dim=32, backbone="tiny", lora_rank=2)

    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": "blue"})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"fused_dim": 250}, "fused_dim"), ({"backbone": "gpt"}, "backbone"), ({"lora_rank": 0}, "lora_rank"),
     # bounded above too: the coordinator builds whatever an admin request asks for
     ({"feature_dim": 10**6}, "feature_dim must be an integer from 1 to 16384"), ({"lora_rank": 257}, "lora_rank"),
     ({"num_classes": 10**9}, "num_classes must be an integer from 2 to 10000")],
)
def test_invalid_model_config_names_the_bad_field(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


# --- the head's skip path, truncated backbones, and adopting another model's tensors ----------------------


def test_the_head_reads_the_pooled_backbone_output_and_z() -> None:
    with_skip = build_edge_model(TINY, BOTH, seed=0)
    without = build_edge_model(ModelConfig(backbone="tiny", fused_skip=False), BOTH, seed=0)

    assert tuple(with_skip.head.weight.shape) == (10, 64 + TINY.fused_dim)
    assert tuple(without.head.weight.shape) == (10, 64)
    assert shared_schema(TINY)["head.weight"] == (10, 64 + TINY.fused_dim)
    # The skip path carries z itself: changing the head's z columns changes the logits.
    batch = _batch()
    before = with_skip(batch).logits
    with torch.no_grad():
        with_skip.head.weight[:, 64:] += 1.0
    assert not torch.allclose(with_skip(batch).logits, before)


def test_backbone_layers_keeps_the_first_layers_and_their_lora_only() -> None:
    one = build_edge_model(ModelConfig(backbone="tiny", backbone_layers=1), BOTH, seed=0)

    assert len(base_model(one.backbone).encoder.layer) == 1
    assert {n for n in one.shared_state() if n.startswith("lora.")} == {
        "lora.layer0.query.A", "lora.layer0.query.B", "lora.layer0.value.A", "lora.layer0.value.B"}
    with pytest.raises(ValueError, match="backbone_layers is 5, but the backbone has only 2 layers"):
        build_edge_model(ModelConfig(backbone="tiny", backbone_layers=5), BOTH, seed=0)


@pytest.mark.parametrize(("field", "value"), [("backbone_layers", -1), ("backbone_layers", 65),
                                              ("backbone_layers", True), ("fused_skip", "yes")])
def test_model_config_refuses_bad_backbone_layers_and_skip_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"backbone": "tiny", field: value})  # type: ignore[arg-type]


def test_a_deeper_model_adopts_the_tensors_it_shares_and_keeps_the_rest() -> None:
    shallow = build_edge_model(ModelConfig(backbone="tiny", backbone_layers=1), BOTH, seed=1)
    deep = build_edge_model(TINY, BOTH, seed=0)
    own = deep.shared_state()

    loaded = deep.load_matching_shared_state(shallow.shared_state(), exclude=("head.",))

    after = deep.shared_state()
    assert "lora.layer0.query.A" in loaded and "extractors.image.conv1.weight" in loaded
    assert not any(n.startswith(("head.", "lora.layer1")) for n in loaded)
    assert torch.equal(after["lora.layer0.query.A"], shallow.shared_state()["lora.layer0.query.A"])
    assert torch.equal(after["lora.layer1.query.A"], own["lora.layer1.query.A"])
    assert torch.equal(after["head.weight"], own["head.weight"])
