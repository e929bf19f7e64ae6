"""The image sizes a text-to-image model can make, from its geometry alone (no weights).

A side of S px is S / downsample latent tokens, and the prompt names it with the res token
<|res_{S/downsample}|>: the tokenizer's highest res token bounds the side. The latent grid is cut
into square blocks of block_side x block_side tokens (block_side = sqrt(tokens per step)), so a side
must be a whole number of blocks: a multiple of block_pixels = block_side * downsample px.

What a model offers (`sizes`, for menus such as the web extension's presets):
- a model that can make every official size (the released 14B models, and models shaped like them)
  offers the official list, in the official order, and nothing else (the sizes it was trained for);
- any other model (the built-in digits demo: 8 px per token, 2x2-token blocks, res tokens up to 64)
  offers squares and 1:2 / 2:1 rectangles whose sides are a power-of-two number of blocks, from two
  blocks a side (one block is a single AR step) up to its largest side, smallest first: 13 entries
  for the demo (32x32 ... 512x512), a short list for any model.
Every offered size passes `check`, which is what the pipeline (CLI, nodes) runs before sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BitDanceError

# The official [height, width] list (modeling/t2i_pipeline.py of the 14B models): their presets.
OFFICIAL_SIZES = [
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024), (896, 1152), (768, 1280),
    (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024),
]
RES_TOKEN = "<|res_{}|>"


def max_res_token(codec) -> int:
    """The highest N such that <|res_1|> .. <|res_N|> are all in the tokenizer (a PromptCodec); a
    tokenizer without them is not BitDance's, and is refused naming its file."""
    n = 0
    while codec.has_token(RES_TOKEN.format(n + 1)):
        n += 1
    if n == 0:
        raise BitDanceError(f"{codec.origin}: the tokenizer has no {RES_TOKEN.format(1)} token, so it is not BitDance's "
                            f"(BitDance adds {RES_TOKEN.format(1)}, {RES_TOKEN.format(2)}, ... and <|query_*|> to Qwen3's "
                            "vocabulary): use the tokenizer files of the BitDance model")
    return n


@dataclass(frozen=True)
class SizeRule:
    """Which height x width a model makes: `downsample` px per latent token, `parallel_num` tokens
    per AR step (a square block), res tokens up to `max_res` latent tokens a side."""

    downsample: int
    parallel_num: int
    max_res: int

    @property
    def block_side(self) -> int:
        return int(round(math.sqrt(self.parallel_num)))

    @property
    def block_pixels(self) -> int:
        return self.block_side * self.downsample

    @property
    def max_side(self) -> int:
        """The largest side in px: the highest res token, rounded down to whole blocks."""
        return (self.max_res // self.block_side) * self.block_pixels

    def fits(self, height: int, width: int) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= self.max_side and v % self.block_pixels == 0
                   for v in (height, width))

    @property
    def has_official_sizes(self) -> bool:
        """Whether the official sizes are this model's presets: it can make every one of them."""
        return all(self.fits(h, w) for h, w in OFFICIAL_SIZES)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The sizes to offer (see the module docstring), each accepted by `check`."""
        if self.has_official_sizes:
            return list(OFFICIAL_SIZES)
        sides, side = [], 2 * self.block_pixels
        while side <= self.max_side:
            sides.append(side)
            side *= 2
        if not sides and self.max_side >= self.block_pixels:
            sides = [self.block_pixels]  # a model whose res tokens reach only one block a side
        out = [(s, s) for s in sides]
        out += [(s, 2 * s) for s in sides if 2 * s <= self.max_side] + [(2 * s, s) for s in sides if 2 * s <= self.max_side]
        return sorted(out, key=lambda hw: (hw[0] * hw[1], hw[0] != hw[1], -hw[0]))

    def _offered(self) -> list[tuple[int, int]]:
        sizes = self.sizes
        if not sizes:
            raise BitDanceError(f"the model makes no image size: its tokenizer's res tokens reach {self.max_res} latent "
                                f"tokens a side, less than one {self.block_side}x{self.block_side}-token block")
        return sizes

    @property
    def reference_size(self) -> tuple[int, int]:
        """The largest square it offers (1024x1024 for models with the official sizes): what a loader
        plans memory for before it knows the size asked for."""
        sizes = self._offered()
        squares = [s for s in sizes if s[0] == s[1]]
        return max(squares) if squares else max(sizes, key=lambda s: s[0] * s[1])

    def summary(self) -> str:
        """e.g. 'the 18 official sizes' or '13 sizes from 32x32 to 512x512' (width x height)."""
        sizes = self._offered()
        if self.has_official_sizes:
            return f"the {len(sizes)} official sizes"
        (h0, w0), (h1, w1) = sizes[0], sizes[-1]
        return f"{len(sizes)} sizes from {w0}x{h0} to {w1}x{h1}"

    def ar_steps(self, height: int, width: int) -> int:
        return (height // self.downsample) * (width // self.downsample) // self.parallel_num

    def describe(self) -> str:
        """e.g. 'sides that are multiples of 16 px from 16 to 512 px'."""
        return f"sides that are multiples of {self.block_pixels} px from {self.block_pixels} to {self.max_side} px"

    def check(self, height, width, model: str = "this model") -> None:
        """Raises BitDanceError naming the size asked for and the sizes `model` makes."""
        if self.max_side < self.block_pixels:
            self._offered()  # raises: no size at all
        for v, what in ((height, "height"), (width, "width")):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                why = "is not a positive whole number of pixels"
            elif v % self.block_pixels:
                why = (f"is not a multiple of {self.block_pixels} px (its {self.parallel_num}-token steps are "
                       f"{self.block_side}x{self.block_side}-token blocks of {self.downsample} px tokens)")
            elif v > self.max_side:
                why = (f"is larger than its largest side, {self.max_side} px (its tokenizer's res tokens go up to "
                       f"<|res_{self.max_res}|>, {self.downsample} px per token)")
            else:
                continue
            offered = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise BitDanceError(f"{what} {v} px (asked for: width {width!r}, height {height!r}) {why}: {model} "
                                f"makes {self.describe()}; its sizes (width x height): {offered}")
