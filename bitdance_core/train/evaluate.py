"""The quality measure of the demo models: does a digit classifier recognise what they draw?

The classifier is an SVM trained on ALL of scikit-learn's real digits, seen through the same
upscale-then-pool path as the generated images (data.digit_classifier).
"""
from __future__ import annotations

import numpy as np

from . import data


def recognition(pixels_u8: np.ndarray, per_class: int, clf=None) -> dict:
    """pixels uint8 [10*K, H, W, 3], classes 0..9 in order -> overall and per-class accuracy."""
    clf = clf if clf is not None else data.digit_classifier(pixels_u8.shape[1])
    want = np.repeat(np.arange(10), per_class)
    got = clf.predict(data.to_ink8(pixels_u8))
    per = [float((got[want == c] == c).mean()) for c in range(10)]
    return {"overall": float((got == want).mean()), "per_class": per, "worst": min(per), "predicted": got.tolist()}


def describe(r: dict) -> str:
    return (f"overall {100 * r['overall']:.1f}%, worst class {100 * r['worst']:.1f}% "
            f"(per class: {' '.join(f'{100 * p:.0f}' for p in r['per_class'])})")
