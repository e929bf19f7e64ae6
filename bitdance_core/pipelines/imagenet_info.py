"""What a class-conditional checkpoint makes, without building the model: its classes.

The class count is the number of rows of the class embedding less one (the unconditional "null"
class), read from the tensor shapes: a `.pt` is memory-mapped (only its pickle is read, with
weights_only=True), a `.safetensors` only its header.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BitDanceError
from .imagenet import checkpoint_source
from .imagenet_classes import class_label, model_class_names


@dataclass(frozen=True)
class ImageNetInfo:
    num_classes: int
    class_names: list[str]

    @property
    def class_labels(self) -> list[str]:
        """How the nodes list the classes: '207: golden retriever', or '7' (see class_label)."""
        return [class_label(i, n) for i, n in enumerate(self.class_names)]


def describe_imagenet(checkpoint: str) -> ImageNetInfo:
    src = checkpoint_source(checkpoint)
    shape = src.shapes.get("cls_embedding.weight")
    src.close()
    if shape is None or len(shape) != 2 or shape[0] < 2:
        raise BitDanceError(f"{checkpoint}: no class embedding (cls_embedding.weight); not a BitDance ImageNet checkpoint")
    n = int(shape[0]) - 1
    return ImageNetInfo(n, model_class_names(n))
