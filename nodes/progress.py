"""Progress per AR block, live previews, and ComfyUI's interrupt, as one engine callback; how a preview is made."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args

from .convert import pixels_to_pil

PREVIEWS_PER_RUN = 8
PREVIEW_TILE = 256  # output pixels a side of a preview decoded in tiles (when a whole one would not fit)


def preview_decoder(autoencoder, device, whole_fits: bool = True):
    """bits -> pixels for the live previews, by ComfyUI's --preview-method (read per run: a newer ComfyUI
    sets it per prompt), or None for no previews:
    - latent2rgb: the tokenizer's linear preview (fitted from its decoder on first use; then ~free, on the CPU);
    - auto: a whole decode when one fits next to the sampling (`whole_fits`), else the linear preview, since a
      decode in tiles moves its states through CPU memory (~25 GB over the bus for a 1024x1024 preview);
    - taesd (a small real decoder, in other models): the decoder itself, in tiles when a whole decode would not fit.
    """
    method = args.preview_method
    if method == LatentPreviewMethod.NoPreviews:
        return None
    if method == LatentPreviewMethod.Latent2RGB or (method == LatentPreviewMethod.Auto and not whole_fits):
        # its fit (once per load, seconds on a GPU) stops at a user's interrupt like the sampling
        return lambda bits: autoencoder.linear_preview(device, mm.throw_exception_if_processing_interrupted)(bits)
    tile = None if whole_fits else PREVIEW_TILE
    return lambda bits: autoencoder.decode(bits.to(device), tile=tile)


class BlockProgress:
    """callback(step, total, bits_so_far) for the engine's generate().

    Raises ComfyUI's interrupt exception (from inside the engine's block loop) as soon as the user
    interrupts, so a long sampling stops within one AR block. Every few blocks the partial bits are
    made into a picture by `decode` (preview_decoder; first image of the batch) and sent as the node's
    live preview, and after the last block the whole image, so the sampler does not keep showing a
    partial one. Previews keep the image's own size (ComfyUI scales a preview to --preview-size, up as
    well as down: a 32x32 digit would be sent, and captioned, as 512x512).
    """

    def __init__(self, decode=None, node_id=None):
        self.decode = decode
        self.pbar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.previews = 0

    def __call__(self, step: int, total: int, bits) -> None:
        mm.throw_exception_if_processing_interrupted()
        done = step + 1
        preview = None
        every = max(1, total // PREVIEWS_PER_RUN)
        if self.decode is not None and (done % every == 0 or done == total):
            try:
                image = pixels_to_pil(self.decode(bits[:1]))
            except RuntimeError as e:  # out of GPU memory mid-sampling included: a preview must not cost the image
                print(f"[BitDance] warning: live previews are off for this run: making one failed ({e})", flush=True)
                self.decode = image = None
            if image is not None:
                preview = ("JPEG", image, min(args.preview_size, max(image.size)))
                self.previews += 1
        self.pbar.update_absolute(done, total, preview)
        mm.throw_exception_if_processing_interrupted()
