"""Where BitDance models live: ComfyUI's `models/bitdance/` (plus any extra paths a user configures
for the `bitdance` folder name), listed fresh on every call so the dropdowns follow the disk.

Which files make a model is the engine's knowledge (bitdance_core); this module only walks
folders and asks the engine whether a candidate qualifies.

The demo models shipped inside the engine (bitdance_core/demo_models/) are listed too, without
copying, under the names `demo/<path inside demo_models>` (e.g. `demo/digits-t2i`,
`demo/digits-imagenet/model.pt`), after the models on disk.

The split model loader's files live in ComfyUI's own folders instead (diffusion_models,
text_encoders, vae), listed and resolved through folder_paths as ComfyUI's loaders do; its prompt
tokenizer comes from ComfyUI's Qwen vocabulary folder (comfy_qwen_vocab).
"""
from __future__ import annotations

import os

import folder_paths

from .engine import (DEMO_DIR, DEMO_IMAGENET, DEMO_T2I, UNIWETOK_EXTS, bd, find_autoencoder_files, find_t2i_files,
                     is_uniwetok_checkpoint)

FOLDER = "bitdance"
EXTENSIONS = {".safetensors", ".pt", ".pth", ".json"}

# The released models, by the folder name each gets under models/bitdance/ (see README).
RELEASES = {
    "BitDance-14B-64x": "shallowdream204/BitDance-14B-64x",
    "BitDance-14B-16x": "shallowdream204/BitDance-14B-16x",
    "BitDance-Tokenizer": "shallowdream204/BitDance-Tokenizer",
    "BitDance-ImageNet": "shallowdream204/BitDance-ImageNet",
}
T2I_RELEASES = ("BitDance-14B-64x", "BitDance-14B-16x")
DEMO = "demo"  # the name prefix of the built-in demo models


def download_hint(name: str) -> str | None:
    """For a name inside a released model's folder (e.g. 'BitDance-ImageNet/BitDance_B_1x.pt'): where it
    goes and the command that fetches it; None for other names."""
    release = str(name).replace("\\", "/").split("/", 1)[0]
    if release not in RELEASES:
        return None
    target = os.path.join(default_root(), release)
    return (f"expected in {target}. Download it with `hf download {RELEASES[release]} --local-dir {target}`")


def register() -> None:
    """models/bitdance/ becomes a ComfyUI model folder (created so users see where models go)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.insert(0, default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # a read-only install: the folder may still be given through extra_model_paths
        pass


def roots() -> list[str]:
    return [p for p in folder_paths.get_folder_paths(FOLDER) if os.path.isdir(p)]


def default_root() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _dirs(root: str, depth: int = 2):
    """Sub-folders of root up to `depth` levels (so both name/ and org/name/ work); hidden ones skipped."""
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.is_dir() and not e.name.startswith("."):
                    nxt.append(e.path)
                    yield e.path
        level = nxt


def _files(root: str, suffixes: tuple[str, ...], depth: int = 3):
    for d in [root, *_dirs(root, depth - 1)]:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.is_file() and e.name.lower().endswith(suffixes):
                yield e.path


def _qualifies(finder, path: str) -> bool:
    try:
        finder(path)
        return True
    except bd.BitDanceError:
        return False


def _demo_name(path: str) -> str:
    return f"{DEMO}/{_rel(DEMO_DIR, path)}"


def _with_demos(found: list[str], demos: list[str]) -> list[str]:
    """The names found on disk (sorted), then the built-in demo ones not among them."""
    found = sorted(dict.fromkeys(found))
    return found + [n for n in demos if n not in found]


def list_t2i_models() -> list[str]:
    """Folders holding a text-to-image model (official or diffusers layout), the built-in demo model,
    then the released names not yet on disk (the loader downloads those when asked, or says where
    they go)."""
    found = []
    for root in roots():
        for d in _dirs(root):
            if _qualifies(find_t2i_files, d):
                found.append(_rel(root, d))
    demos = [_demo_name(DEMO_T2I)] if _qualifies(find_t2i_files, DEMO_T2I) else []
    found = _with_demos(found, demos)
    return found + [n for n in T2I_RELEASES if n not in found]


def list_tokenizer_files() -> list[str]:
    """BitDance-Tokenizer files (ae_*.safetensors) in models/bitdance/: what an ImageNet model can take
    as its tokenizer besides an ae_*.pt."""
    return [name for name in list_tokenizers() if name.endswith(".safetensors")]


def list_tokenizers() -> list[str]:
    """Tokenizer sources: folders with a tokenizer config (a T2I model folder counts),
    BitDance-Tokenizer files (ae_*.safetensors with their *_config.json) and UniWeTok checkpoints
    (.pt files recognised by their key names)."""
    found = []
    for root in roots():
        for d in _dirs(root):
            if _qualifies(find_autoencoder_files, d):
                found.append(_rel(root, d))
        for f in _files(root, (".safetensors",)):
            if os.path.basename(f).startswith("ae_") and _qualifies(find_autoencoder_files, f):
                found.append(_rel(root, f))
        for f in _files(root, UNIWETOK_EXTS):
            if is_uniwetok_checkpoint(f):
                found.append(_rel(root, f))
    demos = [_demo_name(DEMO_T2I)] if _qualifies(find_autoencoder_files, DEMO_T2I) else []
    return _with_demos(found, demos)


def list_checkpoints(suffixes=(".pt", ".pth")) -> list[str]:
    """Class-conditional checkpoints and tokenizer .pt files (UniWeTok checkpoints are listed by the
    Tokenizer Loader instead)."""
    found = []
    for root in roots():
        for f in _files(root, suffixes):
            if not is_uniwetok_checkpoint(f):
                found.append(_rel(root, f))
    demos = [_demo_name(DEMO_IMAGENET)] if os.path.isfile(DEMO_IMAGENET) and DEMO_IMAGENET.endswith(suffixes) else []
    return _with_demos(found, demos)


def comfy_qwen_vocab() -> str:
    """ComfyUI's own Qwen tokenizer folder (vocab.json + merges.txt, byte-identical to Qwen3's and
    so to BitDance's): the split loader's prompt tokenizer, without a download."""
    import comfy

    return os.path.join(next(iter(comfy.__path__)), "text_encoders", "qwen25_tokenizer")


SPLIT_SLOT_OF_FOLDER = {"diffusion_models": "main_model", "text_encoders": "text_encoder", "vae": "vae"}


def _split_files_in_bitdance(folder_name: str) -> dict[str, str]:
    """{name: path} of the .safetensors files at the top of models/bitdance/ whose keys make this slot's
    kind of split file: some guides put the three files there. Model folders below are not looked into."""
    slot = SPLIT_SLOT_OF_FOLDER[folder_name]
    found = {}
    for root in folder_paths.get_folder_paths(FOLDER):
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if name not in found and bd.split_file_kind(path) == slot:
                found[name] = path
    return found


def list_split_files(folder_name: str) -> list[str]:
    """A ComfyUI model folder's files (diffusion_models, text_encoders, vae; the legacy names unet and
    clip are the same folders), as its own loaders list them, then the split files of that kind at the
    top of models/bitdance/ that the folder does not already name."""
    own = folder_paths.get_filename_list(folder_name)
    return own + [name for name in _split_files_in_bitdance(folder_name) if name not in own]


def resolve_split_file(folder_name: str, name: str, what: str) -> str:
    """The full path of a file chosen in a split-loader dropdown (its ComfyUI folder first, then the top
    of models/bitdance/); a clear error naming both."""
    if not isinstance(name, str) or not name.strip():
        raise bd.BitDanceError(f"no {what} chosen (a file in models/{folder_name}/)")
    path = folder_paths.get_full_path(folder_name, name)
    if path is None:
        path = _split_files_in_bitdance(folder_name).get(name)
    if path is None:
        where = folder_paths.get_folder_paths(folder_name) + folder_paths.get_folder_paths(FOLDER)
        raise bd.BitDanceError(f"{what} '{name}' not found in models/{folder_name}/ nor at the top of models/{FOLDER}/ "
                               f"({', '.join(where)})")
    return path


def resolve(name: str, what: str) -> str:
    """The full path of a listed name; a clear error naming where it was looked for."""
    if not isinstance(name, str) or not name.strip():
        raise bd.BitDanceError(f"no {what} chosen")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise bd.BitDanceError(f"{what} '{name}': give a name inside models/{FOLDER}/, not a path")
    parts = name.split("/")
    # a built-in demo model first (a folder models/bitdance/demo/ of the user's comes next)
    candidates = [os.path.join(DEMO_DIR, *parts[1:])] if parts[0] == DEMO and len(parts) > 1 else []
    candidates += [os.path.join(root, *parts) for root in folder_paths.get_folder_paths(FOLDER)]
    tried = []
    for p in candidates:
        tried.append(p)
        if os.path.exists(p):
            return p
    hint = download_hint(name)
    raise bd.BitDanceError(f"{what} '{name}' not found: looked for {' and '.join(tried)}" + (f"; {hint}" if hint else ""))
