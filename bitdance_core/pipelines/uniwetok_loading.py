"""Reading a UniWeTok checkpoint: the official `.pt` (`{"state_dict": ...}` with EMA twins) and its ddconfig.

- The file is opened with `torch.load(weights_only=True)` (checkpoints.load_pt) and memory-mapped.
- EMA: the official `VQModel.load_from_ckpt` replaces every key `k` that does not contain "model_ema" by
  `state["model_ema." + k.replace(".", "")]` when that key exists (apply_ema), then loads with
  strict=False: keys outside the model (discriminator, loss, EMA bookkeeping) are ignored as there;
  model keys the file lacks are refused by name (the official loader only prints them and runs with
  random weights).
- The ddconfig comes from `<stem>_config.json` or `config.json` beside the checkpoint (an object with a
  "ddconfig", as the official constructor takes it); without one it is read from the tensor shapes,
  except `n_heads`, which no shape shows: it is the official default (16), and a warning says so.
"""
from __future__ import annotations

import json
import os
import pickletools
import warnings
import zipfile
from typing import Mapping

import torch

from ..errors import BitDanceError, require
from ..formats.checkpoints import expected_shapes, load_pt, materialize, read_json, source_from_state_dict
from ..models.uniwetok import DEFAULT_N_HEADS, UniWeTok, UniWeTokConfig

CHECKPOINT_EXTS = (".pt", ".pth", ".ckpt")
# Keys only a UniWeTok model has (both halves carry register tokens, whatever the attention depth).
MARKER_KEYS = ("encoder.register_token.weight", "decoder.register_token.weight")
# The official Encoder / GANDecoder keyword arguments (resolution and double_z are accepted and unused there).
DDCONFIG_KEYS = {"ch", "out_ch", "in_channels", "num_res_blocks", "z_channels", "ch_mult", "resolution", "double_z",
                 "attn_blocks", "n_heads"}
REQUIRED_KEYS = ("ch", "out_ch", "in_channels", "num_res_blocks", "z_channels")
# Defaults of the official signature for the keys it does not require.
OFFICIAL_DEFAULTS = {"ch_mult": (1, 2, 2, 4), "attn_blocks": 2, "n_heads": DEFAULT_N_HEADS}


# ---- which files ----------------------------------------------------------------------------------------

def config_candidates(weights: str) -> list[str]:
    stem = os.path.splitext(weights)[0]
    return [stem + "_config.json", os.path.join(os.path.dirname(weights), "config.json")]


def find_config(weights: str) -> str | None:
    return next((c for c in config_candidates(weights) if os.path.isfile(c)), None)


_KEY_CACHE: dict[tuple, frozenset | None] = {}


def pickled_strings(path: str) -> frozenset | None:
    """The strings in a zip-format torch checkpoint's pickle (its key names among them), read from the
    pickle's opcodes without running it (no object is built, no tensor read); None for other files.
    Cached per (path, size, mtime): the model lists call this for every checkpoint on every refresh."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _KEY_CACHE:
        found = None
        try:
            with zipfile.ZipFile(path) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) == 1:
                    data = zf.read(pkl[0])
                    found = frozenset(arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str))
        except Exception:  # not a zip, or a damaged one: not recognisable this way
            found = None
        _KEY_CACHE[key] = found
    return _KEY_CACHE[key]


def _config_says_uniwetok(weights: str) -> bool:
    cfg = find_config(weights)
    if cfg is None:
        return False
    try:
        dd = read_json(cfg).get("ddconfig")
    except BitDanceError:
        return False
    return isinstance(dd, dict) and ("attn_blocks" in dd or "n_heads" in dd)


def is_uniwetok_checkpoint(path: str, open_if_needed: bool = False) -> bool:
    """Whether `path` is a UniWeTok checkpoint file: its keys (read cheaply from a zip-format file), or a
    UniWeTok ddconfig beside it. open_if_needed: also open a legacy (non-zip) file to look at its keys."""
    if not (path.lower().endswith(CHECKPOINT_EXTS) and os.path.isfile(path)):
        return False
    strings = pickled_strings(path)
    if strings is not None:
        return all(k in strings for k in MARKER_KEYS)
    if _config_says_uniwetok(path):
        return True
    if open_if_needed:
        try:
            return all(k in _state_dict(load_pt(path), path) for k in MARKER_KEYS)
        except BitDanceError:
            return False
    return False


def find_uniwetok_files(path: str) -> tuple[str | None, str]:
    """(config json or None, checkpoint) for a UniWeTok checkpoint; BitDanceError otherwise."""
    if not os.path.isfile(path):
        raise BitDanceError(f"missing file: {path}")
    if not is_uniwetok_checkpoint(path, open_if_needed=True):
        raise BitDanceError(f"{path}: not a UniWeTok checkpoint (a .pt with encoder.* / decoder.* keys including "
                            f"{' and '.join(MARKER_KEYS)})")
    return find_config(path), path


# ---- the state dict ---------------------------------------------------------------------------------------

def _state_dict(obj: Mapping, path: str) -> Mapping:
    """The official files keep the weights under "state_dict"; a bare state dict is taken as it is."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise BitDanceError(f"{path}: 'state_dict' is a {type(sd).__name__}, expected a dict of tensors")
    return sd


def apply_ema(state: Mapping) -> tuple[dict, list[str]]:
    """The official rule: each key k without "model_ema" in it takes state["model_ema." + k without its
    dots] when that key exists. Returns the new dict and the keys that were replaced."""
    out, replaced = dict(state), []
    for k in state:
        if "model_ema" in k:
            continue
        twin = "model_ema." + k.replace(".", "")
        if twin in state:
            out[k] = state[twin]
            replaced.append(k)
    return out, replaced


# ---- the ddconfig ---------------------------------------------------------------------------------------

def _int(dd: dict, key: str, origin: str) -> int:
    v = dd[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BitDanceError(f"{origin}: ddconfig '{key}' must be a non-negative integer, got {v!r}")
    return v


def config_from_json(cfg: dict, origin: str) -> tuple[UniWeTokConfig, bool]:
    """(config, whether n_heads was given) from an object with a "ddconfig" (other top-level keys, such as
    the official constructor's checkpoint / gan_decoder, are not the architecture and are left alone)."""
    dd = cfg.get("ddconfig") if isinstance(cfg, dict) else None
    if not isinstance(dd, dict):
        raise BitDanceError(f"{origin}: no 'ddconfig' object; a UniWeTok config is {{\"ddconfig\": {{\"ch\": ..., "
                            "\"ch_mult\": [...], \"num_res_blocks\": ..., \"z_channels\": ..., \"attn_blocks\": ..., "
                            "\"n_heads\": ...}}")
    unknown = sorted(set(dd) - DDCONFIG_KEYS)
    if unknown:
        raise BitDanceError(f"{origin}: unknown ddconfig key(s) {unknown}; expected some of {sorted(DDCONFIG_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in dd]
    if missing:
        raise BitDanceError(f"{origin}: ddconfig lacks {missing} (the official constructor requires them)")
    dd = {**OFFICIAL_DEFAULTS, **dd}
    mult = dd["ch_mult"]
    if not isinstance(mult, (list, tuple)) or not all(type(m) is int and m > 0 for m in mult):
        raise BitDanceError(f"{origin}: ddconfig 'ch_mult' must be a list of positive integers, got {mult!r}")
    out = UniWeTokConfig(ch=_int(dd, "ch", origin), ch_mult=tuple(mult),
                         num_res_blocks=_int(dd, "num_res_blocks", origin),
                         z_channels=_int(dd, "z_channels", origin), in_channels=_int(dd, "in_channels", origin),
                         out_ch=_int(dd, "out_ch", origin), attn_blocks=_int(dd, "attn_blocks", origin),
                         n_heads=_int(dd, "n_heads", origin))
    return out.check(origin), "n_heads" in cfg["ddconfig"]


def _indices(shapes, prefix: str) -> list[int]:
    """The numbers i of the keys `prefix<i>.*`."""
    n = prefix.count(".")
    return sorted({int(k.split(".")[n]) for k in shapes if k.startswith(prefix) and k.split(".")[n].isdigit()})


def config_from_shapes(shapes: Mapping[str, tuple], origin: str, n_heads: int = DEFAULT_N_HEADS,
                       check: bool = True) -> UniWeTokConfig:
    """The ddconfig a UniWeTok state dict was built with, from its shapes (n_heads given: no shape shows it)."""
    def get(key):
        if key not in shapes:
            raise BitDanceError(f"{origin}: key '{key}' is missing; this is not a complete UniWeTok checkpoint")
        return tuple(shapes[key])

    ch, in_ch = get("encoder.conv_in.weight")[:2]
    levels = _indices(shapes, "encoder.down.")
    require(levels and levels == list(range(len(levels))), f"{origin}: no encoder.down.<level> keys 0..n-1 ({levels})")
    widths = [get(f"encoder.down.{i}.downsample.weight")[1] for i in levels[:-1]] + [get("encoder.norm_out.weight")[0]]
    for i, w in enumerate(widths):
        require(w % ch == 0, f"{origin}: encoder level {i} is {w} channels wide, not a multiple of ch {ch}")
    cfg = UniWeTokConfig(ch=ch, ch_mult=tuple(w // ch for w in widths),
                         num_res_blocks=len(_indices(shapes, "encoder.down.0.block.")),
                         z_channels=get("encoder.conv_out.weight")[0], in_channels=in_ch,
                         out_ch=get("decoder.conv_out.weight")[0],
                         attn_blocks=len(_indices(shapes, "encoder.mid_attn_blocks.")), n_heads=n_heads)
    return cfg.check(origin) if check else cfg


def read_config(weights: str, shapes: Mapping[str, tuple]) -> tuple[UniWeTokConfig, str]:
    """(config, where it came from); warns when n_heads is the official default rather than given."""
    cfg_path = find_config(weights)
    if cfg_path is not None:
        cfg, heads_given = config_from_json(read_json(cfg_path), cfg_path)
        origin = cfg_path
    else:
        cfg, heads_given = config_from_shapes(shapes, weights, check=False), False
        origin = "the tensor shapes"
    if heads_given or cfg.attn_blocks == 0:
        return cfg.check(origin), origin
    config_file = os.path.splitext(weights)[0] + "_config.json"
    advice = (f"n_heads is not given there (no tensor shape shows it), so it is the official default "
              f"{DEFAULT_N_HEADS}; it changes the result. If the model has another head count, put its ddconfig in "
              f"{config_file}: {json.dumps(cfg.to_json())} with n_heads set")
    try:
        cfg.check(weights)
    except BitDanceError as e:
        raise BitDanceError(f"{e}. The architecture comes from {origin}: {advice}") from e
    warnings.warn(f"{weights}: UniWeTok architecture from {origin}; {advice}")
    return cfg, origin


# ---- loading ----------------------------------------------------------------------------------------------

def build_uniwetok(cfg: UniWeTokConfig) -> UniWeTok:
    with torch.device("meta"):
        return UniWeTok(cfg)


def load_uniwetok(path: str, device="cpu", dtype=torch.float32) -> UniWeTok:
    _, weights = find_uniwetok_files(path)
    state, _ = apply_ema(_state_dict(load_pt(weights), weights))
    src = source_from_state_dict(state, weights)
    cfg, origin = read_config(weights, src.shapes)
    model = build_uniwetok(cfg)
    want = expected_shapes(model)
    ignored = [k for k in src.keys() if k not in want]
    stray = [k for k in ignored if k.startswith(("encoder.", "decoder."))]
    if stray:  # ignored by the official strict=False load too, but a sign the config and the file disagree
        warnings.warn(f"{weights}: {len(stray)} encoder/decoder key(s) that the UniWeTok config from {origin} has no "
                      f"place for are ignored, as the official loader does: {stray[:5]}")
    return materialize(model, src, f"UniWeTok (config from {origin})", device, dtype, ignore=ignored)
