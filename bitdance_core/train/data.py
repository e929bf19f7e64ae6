"""The training data: scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn, never downloaded).

Images are upscaled to `size` px (bicubic), drawn as dark ink on white paper, RGB in [-1, 1].
The last HOLDOUT images (other writers) are kept out of every training run: the tokenizer's
round-trip PSNR is measured on them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HOLDOUT = 297  # digits 1500..1796
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 8, 8] in 0..16 ink, labels int64 [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def to_pixels(ink8: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[N, 8, 8] ink in 0..16 -> [N, 3, size, size] paper-white/ink-dark image in [-1, 1]."""
    x = ink8.float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (1.0 - 2.0 * x).repeat(1, 3, 1, 1)


def to_ink8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Generated or real images back to the 8x8 ink scale the classifier reads: uint8 [N, H, W, 3]
    or float [N, 3, H, W] in [-1, 1] -> float [N, 64] in 0..16 (4x4 average pooling for 32 px)."""
    if isinstance(pixels, np.ndarray):
        x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    else:
        x = pixels.float()
    ink = (1.0 - x.mean(dim=1, keepdim=True)) / 2.0  # 1 = ink
    ink = F.adaptive_avg_pool2d(ink, 8).clamp(0, 1) * 16.0
    return ink.flatten(1).numpy()


def split(images: np.ndarray, labels: np.ndarray):
    """(train images, train labels), (held-out images, held-out labels)."""
    n = len(images) - HOLDOUT
    return (images[:n], labels[:n]), (images[n:], labels[n:])


def augment(pixels: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer shifts of up to max_shift px (paper colour fills the border)."""
    n, _, h, w = pixels.shape
    pad = F.pad(pixels, (max_shift,) * 4, value=1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(pixels)
    for i in range(n):
        out[i] = pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def digit_classifier(size: int = 32):
    """An SVM trained on ALL real digits, seen through the same upscale + pooling as generated ones."""
    from sklearn.svm import SVC

    images, labels = load_digits_8x8()
    feats = to_ink8(to_pixels(torch.from_numpy(images), size))
    return SVC(gamma=0.001, C=10.0).fit(feats, labels)


# ---- prompts of the text-to-image demo --------------------------------------------------------------

TEMPLATES = [
    "a handwritten digit {name}",
    "the digit {name}",
    "a handwritten {name}",
    "handwritten number {d}",
    "the number {name}",
    "the number {d}",
    "digit {d}",
    "{name}",
    "a hand-drawn {name}",
    "a picture of the handwritten digit {d}",
]


def prompt(label: int, template: int = 0) -> str:
    """The prompt of a digit; template 0 is the canonical "a handwritten digit seven"."""
    return TEMPLATES[template].format(name=NAMES[label], d=label)


def corpus() -> list[str]:
    """Every training prompt (what the text tokenizer is trained on)."""
    return [prompt(d, t) for t in range(len(TEMPLATES)) for d in range(10)]
