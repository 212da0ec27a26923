import numpy as np

from mlecs.model.text import class_descriptions, class_text_anchors, embed_texts


def _mean_off_diagonal_cosine(vectors: np.ndarray) -> float:
    cos = vectors @ vectors.T
    return float(cos[~np.eye(len(cos), dtype=bool)].mean())


def test_raw_digit_descriptions_sit_close_together_in_minilm_space():
    raw = embed_texts(class_descriptions())
    assert raw.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-5)
    assert _mean_off_diagonal_cosine(raw) > 0.6


def test_class_anchors_are_unit_vectors_that_tell_the_digits_apart():
    anchors = class_text_anchors()
    np.testing.assert_allclose(np.linalg.norm(anchors, axis=1), 1, atol=1e-5)
    assert _mean_off_diagonal_cosine(anchors) < 0.0
    # Each anchor is closest to itself: no two classes share an anchor.
    assert (np.argmax(anchors @ anchors.T, axis=1) == np.arange(10)).all()


def test_embeddings_carry_meaning_from_the_pretrained_model():
    # Distinct vectors are not enough: a random encoder makes distinct vectors too. The pretrained one
    # puts paraphrases together and unrelated sentences apart, and a digit's word near its description.
    cat, kitten, markets = embed_texts(["a photo of a cat", "a picture of a kitten", "the stock market fell sharply"])
    assert cat @ kitten > 0.6 > cat @ markets + 0.3
    one, seven, word_one = embed_texts(["the digit one", "the digit seven", "one"])
    assert one @ word_one > seven @ word_one


def test_embeddings_are_deterministic():
    np.testing.assert_array_equal(embed_texts(["the digit one"]), embed_texts(["the digit one"]))
