"""Sentence embeddings from the packaged all-MiniLM-L6-v2: the text side of SE-CCL anchors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_descriptions() -> list[str]:
    """The AV-MNIST class descriptions, in label order."""
    return [f"the digit {name}" for name in DIGIT_NAMES]


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised MiniLM embeddings, float32 [len(texts), 384]; offline."""
    import torch
    from transformers import AutoTokenizer

    from mlecs.model.backbone import _pretrained_minilm, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = _pretrained_minilm()
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


def class_text_anchors() -> np.ndarray:
    """AV-MNIST's class anchors: :func:`text_anchors_of` its digit descriptions."""
    return text_anchors_of(class_descriptions())


def text_anchors_of(descriptions: Sequence[str]) -> np.ndarray:
    """One anchor per class: embeddings of the descriptions with their mean removed, re-normalised.

    The raw descriptions sit close together (AV-MNIST's: mean cosine ~0.8, as they share "the digit");
    removing the common direction leaves what tells the classes apart.
    """
    raw = embed_texts(descriptions)
    centred = raw - raw.mean(axis=0, keepdims=True)
    return (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)
