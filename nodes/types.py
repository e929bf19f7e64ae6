"""Graph types between the BitDance nodes, and the payloads they carry."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from .engine import bd
from .memory import Managed

# Custom socket types: the UI only lets matching sockets connect, and a prompt sent over the API
# that wires one into a node expecting another is refused at validation (400, node_errors).
ModelType = io.Custom("BITDANCE_MODEL")
ConditioningType = io.Custom("BITDANCE_CONDITIONING")
TokenizerType = io.Custom("BITDANCE_TOKENIZER")
ImageNetModelType = io.Custom("BITDANCE_IMAGENET_MODEL")

# LATENT dicts made by BitDance nodes carry this key: the tokenizer family that decodes them.
FAMILY_KEY = "bitdance_family"


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Text-encode output: the templated token ids, and which model's tokenizer made them."""

    tokens: "bd.PromptTokens"
    model_key: str
    model_name: str


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A binary tokenizer, and the managed model that holds it (its own, or the T2I / ImageNet model's)."""

    ae: "bd.BinaryAutoencoder"
    owner: Managed

    @property
    def family(self) -> str:
        return self.ae.family

    def _counted_here(self) -> bool:
        """A tokenizer loaded alone is its own model's only output; one that came with a T2I or ImageNet
        model is counted in that model's output, not twice."""
        return self.owner.obj is self.ae

    def get_ram_usage(self) -> int:  # ComfyUI's RAM caches: see Managed
        return self.owner.get_ram_usage() if self._counted_here() else 0

    def _comfy_cache_tensors(self) -> list:
        return self.owner.host_tensors() if self._counted_here() else []


def expect(value, cls, what: str, hint: str):
    """A clear error when a node receives something other than the BitDance payload it needs."""
    if not isinstance(value, cls):
        raise bd.BitDanceError(f"{what}: expected the output of {hint}, got {type(value).__name__}")
    return value


def bits_latent(bits, family: str) -> dict:
    return {"samples": bits, FAMILY_KEY: family}


def latent_bits(latent, tokenizer: Tokenizer, what: str = "latent"):
    """The ±1 bits of a BitDance LATENT, refused when another tokenizer family made them."""
    return family_bits(latent, tokenizer.family, what)


def family_bits(latent, family: str, what: str):
    """The ±1 bits of a BitDance LATENT made for the tokenizer family `family`."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise bd.BitDanceError(f"{what}: expected a LATENT (a dict with 'samples')")
    tag = latent.get(FAMILY_KEY)
    if tag is None:
        raise bd.BitDanceError(f"{what}: this LATENT was not made by a BitDance node (it has no tokenizer tag); "
                               f"BitDance nodes take only bits from the BitDance samplers or BitDance Encode")
    if tag != family:
        raise bd.BitDanceError(f"{what}: these bits were made for tokenizer '{tag}', but the tokenizer here is "
                               f"'{family}'; use the tokenizer of the model that sampled them")
    return latent["samples"]
