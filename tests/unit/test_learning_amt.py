"""AMT: one device's round on the tiny AV-MNIST fixture (update stage -> upload, personal stage -> personal parts).

Most tests run the prototype's rule (``upload_stage="public"``), whose update stage sees the public shard
only, so that what each stage touches is easy to tell apart; the method's rule has tests of its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from mlecs.data.avmnist import AVMnist, load_avmnist_tiny
from mlecs.learning.amt import AmtData, AmtRecipe, AmtResult, run_amt_round
from mlecs.learning.seccl import Anchors
from mlecs.modality import Modality
from mlecs.model import EdgeModel, ModelConfig, build_edge_model

TINY = ModelConfig(backbone="tiny")
BOTH = frozenset(Modality)
IMAGE = frozenset({Modality.IMAGE})
HEAD_IN = 64 + TINY.fused_dim  # the head reads the pooled backbone output (64) and z
RECIPE = AmtRecipe(upload_stage="public", public_epochs=1, private_epochs=1, batch_size=16, fused_upload_samples=8)
PRIVATE = AmtRecipe(upload_stage="private", private_epochs=1, personal_epochs=1, batch_size=16, fused_upload_samples=8)


@pytest.fixture(scope="module")
def data() -> AVMnist:
    return load_avmnist_tiny()


@pytest.fixture(scope="module")
def global_tensors() -> dict[str, np.ndarray]:
    """The full-modality global adapter (holds audio tensors an image-only device must ignore)."""
    return {name: value.numpy() for name, value in build_edge_model(TINY, BOTH, seed=0).shared_state().items()}


@pytest.fixture(scope="module")
def image_model() -> EdgeModel:
    return build_edge_model(TINY, IMAGE, seed=0)


def _device_data(data: AVMnist, modalities: frozenset[Modality]) -> AmtData:
    train = data.train
    return AmtData(modalities, public=train.subset(np.arange(0, 32)), private_train=train.subset(np.arange(32, 80)),
                   private_heldout=train.subset(np.arange(80, 96)))


def _run(model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray], **kwargs: Any) -> AmtResult:
    options: dict[str, Any] = {"recipe": RECIPE, "seed": 3, **kwargs}
    return run_amt_round(model, _device_data(data, model.modalities), global_tensors, **options)


@pytest.fixture(scope="module")
def image_result(image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]) -> AmtResult:
    return _run(image_model, data, global_tensors)


def test_the_delta_holds_exactly_the_device_models_shared_tensors(
    image_result: AmtResult, image_model: EdgeModel, global_tensors: dict[str, np.ndarray]
) -> None:
    assert set(image_result.delta) == set(image_model.shared_state())
    assert not any("audio" in name for name in image_result.delta)
    assert any("audio" in name for name in global_tensors)
    for name, value in image_result.delta.items():
        assert value.dtype == np.float32 and value.shape == global_tensors[name].shape
    # The public stage trained the image extractor; the delta is what moved.
    assert np.abs(image_result.delta["extractors.image.conv1.weight"]).max() > 0


def test_delta_is_the_trained_model_minus_the_global_tensors(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    # Re-run with no private stage: the model then still holds the public-stage tensors.
    recipe = AmtRecipe(upload_stage="public", public_epochs=1, private_epochs=0, batch_size=16,
                       fused_upload_samples=8)
    result = _run(image_model, data, global_tensors, recipe=recipe)

    trained = image_model.shared_state()
    for name, delta in result.delta.items():
        np.testing.assert_allclose(global_tensors[name] + delta, trained[name].numpy(), atol=1e-6)
        np.testing.assert_array_equal(delta, image_result.delta[name])  # the private stage never changes it
    assert set(result.metrics) == {"update_loss", "update_accuracy", "personal_accuracy"}


def test_fused_upload_is_a_sample_of_public_ids_with_the_fused_width(image_result: AmtResult, data: AVMnist) -> None:
    public_ids = _device_data(data, IMAGE).public.sample_ids

    assert image_result.fused_ids.dtype == np.int64
    assert len(image_result.fused_ids) == 8 == len(np.unique(image_result.fused_ids))
    assert set(image_result.fused_ids.tolist()) <= set(public_ids.tolist())
    assert image_result.fused.shape == (8, TINY.fused_dim) and image_result.fused.dtype == np.float32
    assert np.all(np.isfinite(image_result.fused)) and np.linalg.norm(image_result.fused, axis=1).min() > 0


@pytest.mark.parametrize(("requested", "expected"), [(100, 32), (0, 0)])
def test_fused_upload_size_is_capped_by_the_public_shard(
    requested: int, expected: int, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    recipe = AmtRecipe(upload_stage="public", public_epochs=1, private_epochs=0, batch_size=32,
                       fused_upload_samples=requested)

    result = _run(image_model, data, global_tensors, recipe=recipe)

    assert result.fused.shape == (expected, TINY.fused_dim)
    assert result.fused_ids.shape == (expected,)
    if expected:
        np.testing.assert_array_equal(np.sort(result.fused_ids), np.sort(data.train.sample_ids[:32]))


def test_metrics_and_sample_counts_describe_both_stages(image_result: AmtResult) -> None:
    assert set(image_result.metrics) == {
        "update_loss", "update_accuracy", "personal_loss", "personal_train_accuracy", "personal_accuracy"
    }
    for key in ("update_accuracy", "personal_train_accuracy", "personal_accuracy"):
        assert 0.0 <= image_result.metrics[key] <= 1.0
    assert image_result.metrics["update_loss"] > 0 and image_result.metrics["personal_loss"] > 0
    assert (image_result.public_samples, image_result.private_samples) == (32, 48)
    assert image_result.update_samples == 32  # the prototype's update saw the public shard only


def test_the_round_is_deterministic_given_the_seed(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    again = _run(image_model, data, global_tensors)
    other_seed = _run(image_model, data, global_tensors, seed=4)

    assert set(again.delta) == set(image_result.delta)
    for name in image_result.delta:
        np.testing.assert_array_equal(again.delta[name], image_result.delta[name])
    np.testing.assert_array_equal(again.fused_ids, image_result.fused_ids)
    np.testing.assert_array_equal(again.fused, image_result.fused)
    assert again.metrics == image_result.metrics
    assert any(not np.array_equal(other_seed.delta[n], image_result.delta[n]) for n in image_result.delta)


def test_the_personal_part_is_the_devices_head(image_result: AmtResult) -> None:
    assert set(image_result.personal) == {"head.weight", "head.bias"}
    assert image_result.personal["head.weight"].shape == (TINY.num_classes, HEAD_IN)
    assert image_result.personal["head.bias"].shape == (TINY.num_classes,)


def test_the_personal_stage_trains_the_personal_parts_alone(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    result = run_amt_round(image_model, _device_data(data, IMAGE), global_tensors, recipe=PRIVATE, seed=3)

    after = image_model.shared_state()
    # Everything but the head is still what the update stage trained: the global knowledge is untouched.
    for name, delta in result.delta.items():
        if not name.startswith("head."):
            np.testing.assert_allclose(global_tensors[name] + delta, after[name].numpy(), atol=1e-6)
    head_moved = after["head.weight"].numpy() - (global_tensors["head.weight"] + result.delta["head.weight"])
    assert np.abs(head_moved).max() > 0
    assert all(p.requires_grad for p in image_model.shared_parameters())  # switched back on afterwards


def test_other_personal_parts_can_be_chosen(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    recipe = replace(PRIVATE, personal_prefixes=("extractors.", "head."))

    result = run_amt_round(image_model, _device_data(data, IMAGE), global_tensors, recipe=recipe, seed=3)

    assert {n.split(".")[0] for n in result.personal} == {"extractors", "head"}


def test_personal_parts_from_last_round_replace_the_public_stage_head(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    bias = np.zeros(TINY.num_classes, np.float32)
    bias[3] = 100.0  # a head that always answers "3"
    kept = {"head.weight": np.zeros((TINY.num_classes, HEAD_IN), np.float32), "head.bias": bias}

    result = _run(image_model, data, global_tensors, personal=kept)

    # The update and the fused upload come from the public stage, before the personal parts are loaded.
    for name in image_result.delta:
        np.testing.assert_array_equal(result.delta[name], image_result.delta[name])
    np.testing.assert_array_equal(result.fused, image_result.fused)
    # One private epoch (3 AdamW steps at lr 1e-3) cannot undo a bias of 100: the head came from `personal`.
    assert abs(float(result.personal["head.bias"][3]) - 100.0) < 0.1
    assert abs(float(image_result.personal["head.bias"][3])) < 1.0
    heldout_labels = _device_data(data, IMAGE).private_heldout.labels
    assert result.metrics["personal_accuracy"] == pytest.approx(float(np.mean(heldout_labels == 3)))


def test_personal_tensors_of_the_wrong_shape_or_name_are_ignored(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    stale = {"head.weight": np.full((3, 3), 5.0, np.float32), "not.a.tensor": np.ones(2, np.float32)}

    result = _run(image_model, data, global_tensors, personal=stale)

    for name in image_result.personal:
        np.testing.assert_array_equal(result.personal[name], image_result.personal[name])
    assert result.metrics == image_result.metrics


def _anchors_for(data: AVMnist) -> Anchors:
    rng = np.random.default_rng(5)
    ids = data.train.sample_ids[:20]  # 20 of the 32 public samples have a sample anchor
    return Anchors(sample_ids=ids, fused=rng.standard_normal((20, TINY.fused_dim)).astype(np.float32),
                   text=rng.standard_normal((TINY.num_classes, 384)).astype(np.float32))


def test_anchors_change_the_update(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    result = _run(image_model, data, global_tensors, anchors=_anchors_for(data))

    assert set(result.delta) == set(image_result.delta)
    differing = [n for n in result.delta if not np.array_equal(result.delta[n], image_result.delta[n])]
    assert "connector.core.fuse.weight" in differing
    assert "extractors.image.conv1.weight" in differing


def test_a_zero_seccl_weight_ignores_the_anchors(
    image_result: AmtResult, image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    recipe = replace(RECIPE, seccl_weight=0.0)

    result = _run(image_model, data, global_tensors, recipe=recipe, anchors=_anchors_for(data))

    for name in image_result.delta:
        np.testing.assert_array_equal(result.delta[name], image_result.delta[name])
    assert result.metrics == image_result.metrics


def test_a_two_modality_device_uploads_both_extractors(data: AVMnist, global_tensors: dict[str, np.ndarray]) -> None:
    model = build_edge_model(TINY, BOTH, seed=0)

    recipe = AmtRecipe(upload_stage="public", public_epochs=1, private_epochs=0, batch_size=32, fused_upload_samples=4)
    result = _run(model, data, global_tensors, recipe=recipe, anchors=_anchors_for(data))

    assert set(result.delta) == set(global_tensors)
    assert np.abs(result.delta["extractors.audio.conv1.weight"]).max() > 0
    assert result.fused.shape == (4, TINY.fused_dim)
    assert set(result.metrics) == {"update_loss", "update_accuracy", "personal_accuracy"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upload_stage": "public", "public_epochs": 0}, "public_epochs"),
        ({"private_epochs": 0}, "private_epochs"),
        ({"upload_stage": "both"}, "upload_stage"),
        ({"personal_epochs": -1}, "personal_epochs"),
        ({"private_epochs": -1}, "private_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"public_epochs": True}, "public_epochs"),
        ({"public_epochs": 1.5}, "public_epochs"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"ccl_weight": -0.1}, "ccl_weight"),
        ({"seccl_weight": -1.0}, "seccl_weight"),
        ({"seccl_weight": float("nan")}, "seccl_weight"),
        ({"ccl_temperature": 0.0}, "ccl_temperature"),
        ({"seccl_temperature": 0.0}, "seccl_temperature"),
        ({"seccl_temperature": -0.5}, "seccl_temperature"),
        ({"fused_upload_samples": -1}, "fused_upload_samples"),
    ],
)
def test_recipe_rejects_invalid_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AmtRecipe(**kwargs)


def test_recipe_defaults_are_valid_and_keep_the_head_personal() -> None:
    recipe = AmtRecipe(personal_epochs=0, seccl_weight=0.0, ccl_weight=0.0, fused_upload_samples=0)

    assert recipe.personal_prefixes == ("head.",)
    assert AmtRecipe().upload_stage == "private" and AmtRecipe().private_epochs >= 1


# The method's rule: the uploaded change is learned on the private data (with the public shard).


def _private_data(data: AVMnist, modalities: frozenset[Modality]) -> AmtData:
    return _device_data(data, modalities)


def test_the_private_update_changes_when_only_the_private_data_change(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    device = _private_data(data, IMAGE)
    other_private = replace(device, private_train=data.train.subset(np.arange(96, 144)))

    first = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3)
    second = run_amt_round(image_model, other_private, global_tensors, recipe=PRIVATE, seed=3)
    prototype = run_amt_round(image_model, device, global_tensors, recipe=RECIPE, seed=3)
    prototype_other = run_amt_round(image_model, other_private, global_tensors, recipe=RECIPE, seed=3)

    # With the method's rule the private data reach the upload; with the prototype's they never do.
    assert any(not np.array_equal(first.delta[n], second.delta[n]) for n in first.delta)
    for name in prototype.delta:
        np.testing.assert_array_equal(prototype.delta[name], prototype_other.delta[name])
    assert first.update_samples == 48 + 32 and prototype.update_samples == 32


def test_the_private_update_is_what_the_update_stage_trained(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    recipe = replace(PRIVATE, personal_epochs=0)
    result = run_amt_round(image_model, _private_data(data, IMAGE), global_tensors, recipe=recipe, seed=3)

    trained = image_model.shared_state()
    for name, delta in result.delta.items():
        np.testing.assert_allclose(global_tensors[name] + delta, trained[name].numpy(), atol=1e-6)
    assert np.abs(result.delta["lora.layer0.query.B"]).max() > 0
    assert set(result.metrics) == {"update_loss", "update_accuracy", "personal_accuracy"}


def test_the_personal_stage_never_changes_the_private_update(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    device = _private_data(data, IMAGE)
    plain = run_amt_round(image_model, device, global_tensors, recipe=replace(PRIVATE, personal_epochs=0), seed=3)
    bias = np.zeros(TINY.num_classes, np.float32)
    bias[3] = 100.0
    kept = {"head.weight": np.zeros((TINY.num_classes, HEAD_IN), np.float32), "head.bias": bias}

    tuned = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3, personal=kept)

    for name in plain.delta:
        np.testing.assert_array_equal(plain.delta[name], tuned.delta[name])
    np.testing.assert_array_equal(plain.fused, tuned.fused)
    assert abs(float(tuned.personal["head.bias"][3]) - 100.0) < 0.1
    assert {"personal_loss", "personal_train_accuracy"} <= set(tuned.metrics)


def test_the_sample_anchors_act_on_the_public_shard_in_the_private_update(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    device = _private_data(data, IMAGE)
    anchors = _anchors_for(data)
    text_only = Anchors(np.zeros(0, np.int64), np.zeros((0, TINY.fused_dim), np.float32), anchors.text)

    with_samples = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3, anchors=anchors)
    without = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3, anchors=text_only)
    no_public = run_amt_round(image_model, replace(device, public=data.train.subset(np.arange(0, 0))),
                              global_tensors, recipe=replace(PRIVATE, fused_upload_samples=0), seed=3,
                              anchors=anchors)

    assert any(not np.array_equal(with_samples.delta[n], without.delta[n]) for n in with_samples.delta)
    assert no_public.update_samples == 48 and len(no_public.fused_ids) == 0


def test_kept_tensors_outside_the_personal_parts_are_not_loaded(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    device = _device_data(data, IMAGE)
    plain = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3)
    # A file from an agent that kept its extractor too: the extractor must not come back.
    stale = {"extractors.image.conv1.weight": np.full_like(global_tensors["extractors.image.conv1.weight"], 9.0)}

    result = run_amt_round(image_model, device, global_tensors, recipe=PRIVATE, seed=3, personal=stale)

    assert result.metrics == plain.metrics
    assert float(image_model.shared_state()["extractors.image.conv1.weight"].abs().max()) < 9.0


def test_a_device_without_private_training_data_learns_its_update_on_the_public_shard(
    image_model: EdgeModel, data: AVMnist, global_tensors: dict[str, np.ndarray]
) -> None:
    device = replace(_device_data(data, IMAGE), private_train=data.train.subset(np.arange(0, 0)))
    recipe = replace(PRIVATE, public_epochs=0)

    result = run_amt_round(image_model, device, global_tensors, recipe=recipe, seed=3)

    assert result.update_samples == 32 and np.abs(result.delta["head.bias"]).max() > 0
    assert "personal_loss" not in result.metrics  # nothing private to personalise on
