"""The real MiniLM backbone loads offline, runs, and trains only the parts meant to train."""

from __future__ import annotations

from typing import Any

import torch

from mlecs.modality import Modality
from mlecs.model import ModelConfig, build_edge_model, full_model_fp32_bytes, shared_schema
from mlecs.model.backbone import base_model


def test_minilm_model_loads_offline_runs_and_freezes_the_base_weights() -> None:
    config = ModelConfig()
    model = build_edge_model(config, frozenset(Modality), seed=0).eval()
    batch = {Modality.IMAGE: torch.rand(2, 1, 28, 28), Modality.AUDIO: torch.randn(2, 1, 40, 64)}

    with torch.no_grad():
        output = model(batch)

    assert output.logits.shape == (2, 10) and torch.isfinite(output.logits).all()
    base: Any = base_model(model.backbone)
    assert base.config.hidden_size == 384 and len(base.encoder.layer) == 6
    frozen = [n for n, p in base.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)
    trainable_prefixes = {name.split(".")[0] for name in model.shared_state()}
    assert trainable_prefixes == {"extractors", "connector", "lora", "head"}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.shared_parameters()}
    # Schema and size are computed without weights, and agree with the real model.
    assert shared_schema(config) == {n: tuple(t.shape) for n, t in model.shared_state().items()}
    assert full_model_fp32_bytes(config) == 4 * sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for p in model.shared_parameters())
    assert 150_000 <= shared <= 200_000


def test_the_backbone_holds_the_packaged_pretrained_weights_not_a_random_init() -> None:
    from pathlib import Path

    from safetensors.numpy import load_file

    from mlecs.model.backbone import minilm_path

    stored = load_file(str(Path(minilm_path()) / "model.safetensors"))
    model = build_edge_model(ModelConfig(), frozenset(Modality), seed=0)
    base: Any = base_model(model.backbone)
    for name, param in (("embeddings.word_embeddings.weight", base.embeddings.word_embeddings.weight),
                        ("encoder.layer.5.output.dense.weight", base.encoder.layer[5].output.dense.base_layer.weight
                         if hasattr(base.encoder.layer[5].output.dense, "base_layer")
                         else base.encoder.layer[5].output.dense.weight)):
        key = next(k for k in stored if k.endswith(name))
        assert torch.equal(param.detach(), torch.from_numpy(stored[key])), name
    # Another seed gives the same frozen backbone: it is loaded, not drawn.
    other: Any = base_model(build_edge_model(ModelConfig(), frozenset(Modality), seed=1).backbone)
    assert torch.equal(other.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
