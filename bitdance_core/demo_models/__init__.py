"""The demo models shipped with the engine: BitDance trained on scikit-learn's handwritten digits.

Both draw 32x32 px digits on a CPU in about a second and are in the official layouts:
  digits-imagenet/  model.pt ({'ema': state dict incl. vae.*}) + config.json  -> load_imagenet
  digits-t2i/       the official text-to-image folder                          -> load_t2i
How they were trained, and how to retrain them: docs/demo-models.md.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET = os.path.join(HERE, "digits-imagenet", "model.pt")
T2I = os.path.join(HERE, "digits-t2i")

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIZE = 32  # pixels a side (a 4x4 grid of 32-bit tokens, 4 tokens per step)
# Sampling defaults of the demos (what the quality test checks).
IMAGENET_DEFAULTS = dict(steps=50, cfg=None, cfg_schedule="linear")  # cfg None: the pipeline's default guidance
T2I_DEFAULTS = dict(steps=50, cfg=4.0)


def prompt(digit: int) -> str:
    """The canonical prompt of the text-to-image demo, e.g. "a handwritten digit seven"."""
    return f"a handwritten digit {NAMES[digit]}"
