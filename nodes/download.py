"""Optional download of a released model into models/bitdance/<name> (asked for in a loader node)."""
from __future__ import annotations

import os
import shutil

import comfy.utils

from . import paths
from .engine import bd


def download_release(name: str, target: str) -> str:
    """snapshot_download into `target` itself (huggingface_hub keeps only a small .cache/ of metadata
    inside it; nothing goes to the user's hidden cache), with ComfyUI's progress bar per file."""
    repo = paths.RELEASES[name]
    try:
        import huggingface_hub
        from tqdm.auto import tqdm
    except ImportError as e:
        raise bd.BitDanceError(f"downloading {repo} needs the huggingface_hub package (pip install huggingface_hub): {e}")

    pbar = comfy.utils.ProgressBar(1)

    class ComfyTqdm(tqdm):
        def update(self, n=1):
            out = super().update(n)
            if self.total:
                pbar.update_absolute(self.n, self.total)
            return out

    created = not os.path.exists(target)
    os.makedirs(target, exist_ok=True)
    try:
        huggingface_hub.snapshot_download(repo, local_dir=target, tqdm_class=ComfyTqdm)
    except Exception as e:  # network, auth, disk: say what was being fetched and where
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise bd.BitDanceError(f"downloading {repo} into {target} failed: {type(e).__name__}: {e}") from e
    return target
