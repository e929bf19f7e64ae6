"""Live previews follow ComfyUI's --preview-method, in ComfyUI 0.3.75's own process (on the CPU).

- none: progress only; latent2rgb: the tokenizer's linear preview, and the decoder is never run while
  sampling; auto and taesd: the decoder, whole, where a whole decode fits.
- Where the sampler's memory check says one would not fit next to the sampling (an offload plan, a
  tight card): auto shows the linear preview, taesd decodes in tiles.
- Cancelling while the linear preview is fitted stops the run there; a preview that fails (out of GPU
  memory mid-sampling) turns the run's previews off, not its image.
The probe watches the previews ComfyUI's progress bar is given and every decode of the sampled grid.
"""
from helpers import PROBE_PREAMBLE, run_probe

PREVIEW_PROBE = PROBE_PREAMBLE + """
import numpy as np
import comfy.utils
from comfy.cli_args import args, LatentPreviewMethod as M
from bitdance_pack.bitdance_core import to_uint8
from bitdance_pack.nodes import progress, t2i

sent = []
comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: sent.append(preview))
managed = t2i.BitDanceModelLoader.execute("demo/digits-t2i").result[0]
cond = t2i.BitDanceTextEncode.execute(managed, "a handwritten digit three").result[0]
ae = managed.obj.autoencoder
decode, tiles, fit_decodes, interrupt_at = ae.decode, [], [0], [None]
def watched(bits, generator=None, chunk=None, tile=None):
    if tuple(bits.shape[-2:]) == (4, 4):  # the sampled 4x4 token grid (a fit decodes 16x16 random grids)
        tiles.append(tile)
    else:
        fit_decodes[0] += 1
        if fit_decodes[0] == interrupt_at[0]:
            mm.interrupt_current_processing(True)  # the user presses cancel while the preview is being fitted
    return decode(bits, generator=generator, chunk=chunk, tile=tile)
ae.decode = watched

def same(image, pixels):
    return int(np.array_equal(np.asarray(image), to_uint8(pixels)[0].numpy()))

for method in (M.NoPreviews, M.Latent2RGB, M.Auto, M.TAESD):
    args.preview_method = method
    sent.clear(); tiles.clear()
    bits = t2i.BitDanceARSampler.execute(managed, cond, width=32, height=32, steps=4, cfg=4.0, seed=1,
                                         batch_size=1).result[0]["samples"][:1]
    images = [p[1] for p in sent if p is not None]
    fitted = ae._linear_preview is not None
    last_linear = same(images[-1], ae.linear_preview()(bits)) if images else -1
    last_whole = same(images[-1], decode(bits)) if images else -1
    print(method.name.upper(), len(sent), len(images), int(fitted), len(tiles), int(all(t is None for t in tiles)),
          last_linear, last_whole)

def sample(seed):
    return t2i.BitDanceARSampler.execute(managed, cond, width=32, height=32, steps=4, cfg=4.0, seed=seed,
                                         batch_size=1).result[0]["samples"][:1]

# the sampler's fit check says a whole decode would not fit beside the sampling (a tight card, an offload plan)
from bitdance_pack.bitdance_core.runtime.fitting import GenerationCheck
asked = []
def tight(self, ae_config, height, width, dtype):
    asked.append((height, width))
    return False
GenerationCheck.whole_preview_fits = tight
for method in (M.Auto, M.TAESD):
    args.preview_method = method
    sent.clear(); tiles.clear()
    bits = sample(2)
    images = [p[1] for p in sent if p is not None]
    print("TIGHT_" + method.name.upper(), *asked[-1], len(images), ",".join(map(str, tiles)) or "-",
          same(images[-1], ae.linear_preview()(bits)))

# cancel while the linear preview is fitted: the run stops there (as within a block), nothing half-fitted is kept
args.preview_method = M.Latent2RGB
ae._linear_preview, fit_decodes[0], interrupt_at[0] = None, 0, 3
try:
    sample(4)
    print("CANCELLED", 0)
except mm.InterruptProcessingException:
    print("CANCELLED", 1, fit_decodes[0], int(ae._linear_preview is None))
mm.interrupt_current_processing(False)

# a preview that fails (out of memory in the middle of sampling) turns previews off, not the image
def failing(device=None, between=None):
    raise RuntimeError("CUDA out of memory (simulated)")
ae.linear_preview = failing
args.preview_method = M.Latent2RGB
sent.clear()
failed = sample(3)
previews = len([p for p in sent if p is not None])
args.preview_method = M.NoPreviews
print("FAILED_PREVIEW", previews, int(bool((failed == sample(3)).all())))
"""


def test_previews_follow_the_preview_method(tmp_path):
    res, lines = run_probe(tmp_path, PREVIEW_PROBE)
    rows = {k: [int(v) for v in lines[k].split()] for k in ("NOPREVIEWS", "LATENT2RGB", "AUTO", "TAESD")}
    # columns: progress updates, previews, linear preview fitted, decodes of the sampled grid, all whole,
    # last preview == linear preview of the result, last preview == decode of the result
    blocks = 4  # 32x32 px: a 4x4 grid, 4 tokens a block
    # without previews: progress only (a newer ComfyUI drops an update within 100 ms of the last one
    # unless it is the first, the last or carries a preview, so the count depends on the machine's speed)
    assert 2 <= rows["NOPREVIEWS"][0] <= blocks and rows["NOPREVIEWS"][1:4] == [0, 0, 0], rows
    updates, previews, fitted, decodes, _, linear, whole = rows["LATENT2RGB"]
    assert updates == blocks and previews == blocks and fitted == 1 and decodes == 0 and linear == 1, rows
    assert whole == 0, rows  # it is not the decode (so the comparisons above tell the two apart)
    for method in ("AUTO", "TAESD"):
        updates, previews, _, decodes, all_whole, linear, whole = rows[method]
        assert updates == previews == decodes == blocks and all_whole == 1 and whole == 1 and linear == 0, rows
    # where the sampler's check says a whole decode would not fit (asked for the image's own size)
    assert lines["TIGHT_AUTO"] == "32 32 4 - 1", res.stdout[-2000:]  # the linear preview, no decode
    assert lines["TIGHT_TAESD"] == "32 32 4 256,256,256,256 0", res.stdout[-2000:]  # the decoder, in 256 px tiles
    assert lines["CANCELLED"] == "1 3 1", res.stdout[-2000:]  # stopped at the fit's 3rd decode, no map kept
    assert lines["FAILED_PREVIEW"] == "0 1", res.stdout[-2000:]  # no preview, the same image
    assert "live previews are off for this run: making one failed (CUDA out of memory (simulated))" in res.stdout
