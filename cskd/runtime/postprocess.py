"""From logits to answers: softmax and the top-k labels of each row."""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, k: int, classes: List[str]) -> List[List[Dict[str, object]]]:
    """Per row: the k best classes as ``{"label", "index", "score"}`` (softmax probabilities)."""
    probs = softmax(logits.astype(np.float64))
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"label": classes[i], "index": int(i), "score": float(row[i])} for i in idx] for idx, row in zip(order, probs)]
