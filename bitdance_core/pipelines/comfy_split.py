"""The ComfyUI split files of a text-to-image model (doc §3.2): the main model (diffusion head +
projector), the text encoder (Qwen3, fp8 linears with scale siblings) and the VAE, each one
safetensors file in ComfyUI's own folders (models/diffusion_models, text_encoders, vae).

Configs come from the tensor shapes (a `<stem>_config.json` beside a file wins); parallel_num from
the text encoder's vocabulary rows (or the tokenizer's query tokens, or the caller); the prompt
tokenizer from Qwen's vocabulary files plus BitDance's res and query tokens (no download: ComfyUI
ships them), or a `<stem>_tokenizer.json` beside the text encoder. `read_split_configs` reads the
headers once (what the memory planner plans with); `load_split` loads with the weights formats of
model folders (t2i_loading.materialize_parts); `save_comfy_split` writes a pipeline in this layout.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import BitDanceError, require
from ..formats.checkpoints import check_keys, open_safetensors, read_json
from ..formats.fp8 import Fp8Linear, Fp8Source, quantize_fp8
from ..models.ae_layers import AutoencoderConfig
from ..models.head import HeadConfig
from ..models.qwen3 import Qwen3Backbone, Qwen3Config
from .prompts import (PromptCodec, bitdance_vocab_size, from_tokenizers_file, load_prompt_codec,
                      parallel_num_from_vocab_size, qwen_vocab_bitdance_codec)
from .sizes import SizeRule, max_res_token
from .t2i import T2IPipeline
from .t2i_loading import T2IInfo, build_t2i_modules, materialize_parts
from .t2i_q4 import check_q4_gguf, write_q4_gguf

# The prefixes each part may carry inside its file.
HEAD_PREFIXES = ("diffusion_head.", "model.diffusion_head.", "main_model.diffusion_head.", "vision_head.")
PROJECTOR_PREFIXES = ("projector.", "model.projector.", "main_model.projector.")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "model.text_encoder.")
VAE_PREFIXES = ("autoencoder.", "vae.", "model.autoencoder.")


def _pick_prefix(src: Fp8Source, prefixes: Iterable[str], probe: str) -> str:
    for p in prefixes:
        if p + probe in src.shapes:
            return p
    return ""


def _warn_unused(origin: str, keys: list[str], what: str) -> None:
    """Keys of a split file that no part of the model reads. The loader of the pack these files were
    made for drops them, so they load here too; the console names them in case the file is wrong."""
    if keys:
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        warnings.warn(f"{origin}: {len(keys)} key(s) that the BitDance {what} does not use are left unread: "
                      f"{keys[:5]}{more}")


def split_main_model(src: Fp8Source) -> tuple[Fp8Source, Fp8Source]:
    """(head, projector) sources from the ComfyUI main-model file; other keys are left unread, aloud."""
    hp = _pick_prefix(src, HEAD_PREFIXES, "net.input_proj.weight")
    pp = _pick_prefix(src, PROJECTOR_PREFIXES, "fc1.weight")
    head = src.subset(lambda k: k.startswith(hp + "net.")).with_prefix_stripped(hp)
    proj = src.subset(lambda k: k.startswith(pp + "fc1.") or k.startswith(pp + "fc2.")).with_prefix_stripped(pp)
    hint = f"; not a BitDance main model (e.g. {COMMUNITY_FILES['main_model']})"
    require("net.input_proj.weight" in head.shapes,
            f"{src.origin}: no diffusion-head keys (expected net.* under one of {list(HEAD_PREFIXES)} or bare){hint}")
    require("fc1.weight" in proj.shapes,
            f"{src.origin}: no projector keys (expected fc1.*/fc2.* under one of {list(PROJECTOR_PREFIXES)} or bare){hint}")
    claimed = {hp + k for k in head.shapes} | {pp + k for k in proj.shapes}
    _warn_unused(src.origin, sorted(set(src.shapes) - claimed), "main model (diffusion head + projector)")
    return head, proj


def _under_prefix(src: Fp8Source, prefixes: Iterable[str], probe: str, what: str, quiet: Iterable[str] = ()) -> Fp8Source:
    """The keys under the prefix that `probe` (a key only this part has) carries, stripped of it; keys
    outside it (other than `quiet` ones, which no loader reads) are left unread, aloud."""
    p = _pick_prefix(src, prefixes, probe)
    if not p:
        return src
    quiet = set(quiet)
    outside = sorted(k for k in src.shapes if not k.startswith(p) and k not in quiet)
    _warn_unused(src.origin, outside, what)
    return src.with_prefix_stripped(p)


def _unused_keys(module: nn.Module, src, what: str, ignore: Iterable[str] = ()) -> tuple[str, ...]:
    """`ignore` plus the file's keys that `module` has no place for, named on the console: what a split
    file carries beyond the model (the pack that made them loads the text encoder non-strictly).
    Missing keys and wrong shapes are still refused by the strict check."""
    known = set(module.state_dict()) | set(ignore)
    extra = sorted(k for k in src.shapes if k not in known)
    _warn_unused(src.origin, extra, what)
    return tuple(ignore) + tuple(extra)


def infer_qwen3_config(src: Fp8Source, origin: str):
    s = src.shapes
    need = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight"]
    miss = [k for k in need if k not in s]
    require(not miss, f"{origin}: not a Qwen3 text encoder (e.g. {COMMUNITY_FILES['text_encoder']}): missing {miss}")
    layers = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    vocab, hidden = s["model.embed_tokens.weight"]
    hd = s["model.layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=s["model.layers.0.mlp.gate_proj.weight"][0],
                       num_hidden_layers=layers, num_attention_heads=s["model.layers.0.self_attn.q_proj.weight"][0] // hd,
                       num_key_value_heads=s["model.layers.0.self_attn.k_proj.weight"][0] // hd, head_dim=hd)


def infer_head_config(src: Fp8Source, parallel_num: int, origin: str):
    s = src.shapes
    depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.res_blocks\.(\d+)\.", k)))
    ada = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"net\.ada_ln_blocks\.(\d+)\.", k)))
    c_lat, c_tgt = s["net.input_proj.weight"]
    cfg = HeadConfig(ch_target=c_tgt, ch_cond=s["net.cond_embed.weight"][1], ch_latent=c_lat, depth_latent=depth,
                     depth_adanln=ada, use_swiglu="net.res_blocks.0.w1.weight" in s, parallel_num=parallel_num)
    cfg.validate(origin)
    return cfg


def infer_ae_config(src: Fp8Source, origin: str):
    s = src.shapes
    require("encoder.conv_in.weight" in s and "decoder.conv_in.weight" in s,
            f"{origin}: not a BitDance VAE (e.g. {COMMUNITY_FILES['vae']}): no encoder.conv_in / decoder.conv_in "
            f"(keys may carry {list(VAE_PREFIXES)})")
    ch = s["encoder.conv_in.weight"][0]
    levels = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    mult = tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    nrb = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    z = s["encoder.conv_out.weight"][0]
    return AutoencoderConfig(ch=ch, ch_mult=mult, num_res_blocks=nrb, z_channels=z, in_channels=s["encoder.conv_in.weight"][1],
                             out_ch=s["decoder.conv_out.weight"][0], gan_decoder=s["decoder.conv_in.weight"][1] == 2 * z)


def parallel_num_from_codec(codec) -> int:
    """P = 1 + the number of <|query_i|> tokens the tokenizer has (64x: 63, 16x: 15)."""
    n = 0
    while n < 1024:
        try:
            codec.token_id(f"<|query_{n + 1}|>", "probe")
        except BitDanceError:
            break
        n += 1
    require(n > 0, f"{codec.origin}: the tokenizer has no <|query_i|> tokens; give parallel_num")
    return n + 1


def _config_beside(path: str) -> str | None:
    """`<stem>_config.json` or `<stem>.json` next to a weights file (a shared folder such as
    models/vae may hold other models' config.json, so a bare config.json is not taken)."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    for cand in (stem + "_config.json", stem + ".json"):
        if os.path.isfile(cand):
            return cand
    return None


def tokenizer_beside(text_encoder: str) -> str | None:
    """`<stem>_tokenizer.json` next to the text-encoder file: a tokenizer that overrides Qwen's
    vocabulary (a model with its own tokenizer; the tests' tiny models)."""
    stem = text_encoder[: -len(".safetensors")] if text_encoder.endswith(".safetensors") else text_encoder
    cand = stem + "_tokenizer.json"
    return cand if os.path.isfile(cand) else None


# ---- which file is which ----------------------------------------------------------------------

SLOTS = {"main_model": "main model", "text_encoder": "text encoder", "vae": "VAE"}
# ComfyUI's folder for each slot, and the community file that goes there (doc §3.2)
SLOT_FOLDERS = {"main_model": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
COMMUNITY_FILES = {"main_model": "BitDance_14B_MainModel_FP8.safetensors",
                   "text_encoder": "BitDance_TextEncoder_FP8.safetensors", "vae": "BitDance_VAE_FP16.safetensors"}
# a key (under any prefix) that only this kind of file has
_KIND_PROBES = {"main_model": "net.input_proj.weight", "text_encoder": "model.embed_tokens.weight",
                "vae": "encoder.conv_in.weight"}


def file_kind(keys: Iterable[str]) -> str | None:
    """Which of the three split files these keys make ("main_model", "text_encoder", "vae"), or None."""
    keys = list(keys)
    for slot, probe in _KIND_PROBES.items():
        if any(k == probe or k.endswith("." + probe) for k in keys):
            return slot
    return None


def split_file_kind(path: str) -> str | None:
    """file_kind of a .safetensors file, from its header alone; None for anything else or a file that
    cannot be read (it is then simply not offered as a split file). Remembered per file version (the
    dropdowns ask again on every listing)."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return _header_kind(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _header_kind(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        return file_kind(open_safetensors([path]).shapes)
    except (BitDanceError, OSError):  # a damaged or foreign file: not a choice, and nothing to report here
        return None


def _open_slot(path: str, slot: str) -> Fp8Source:
    """The file chosen for `slot`, refused with a clear message when it is some other file."""
    what = SLOTS[slot]
    require(not (slot == "text_encoder" and path.endswith("-Q4_0.gguf")),
            f"{path}: a 4-bit text encoder file (from `convert --text-encoder`): choose the .safetensors text "
            f"encoder it was made from; with weights=4bit the loader reads this file beside it")
    require(path.endswith(".safetensors"),
            f"{path}: chosen as the BitDance {what}, but it is not a .safetensors file "
            f"(the split files are safetensors, e.g. {COMMUNITY_FILES[slot]})")
    src = Fp8Source(open_safetensors([path]))
    kind = file_kind(src.src.shapes)
    if kind is not None and kind != slot:
        raise BitDanceError(f"{path}: chosen as the BitDance {what}, but it is a BitDance {SLOTS[kind]} file: choose it as "
                            f"the {SLOTS[kind]} (models/{SLOT_FOLDERS[kind]}/) and a file like {COMMUNITY_FILES[slot]} "
                            f"(models/{SLOT_FOLDERS[slot]}/) as the {what}")
    return src  # a file of no BitDance kind is named by the slot's own key checks (what it lacks)


def _open_text_encoder(text_encoder: str) -> Fp8Source:
    return _under_prefix(_open_slot(text_encoder, "text_encoder"), TEXT_ENCODER_PREFIXES, _KIND_PROBES["text_encoder"],
                         "text encoder", quiet=Qwen3Backbone.IGNORED_KEYS)


def _open_parts(main_model: str, text_encoder: str, vae: str):
    """(head, projector, text encoder, VAE) sources, prefixes stripped."""
    head, proj = split_main_model(_open_slot(main_model, "main_model"))
    ae = _under_prefix(_open_slot(vae, "vae"), VAE_PREFIXES, _KIND_PROBES["vae"], "VAE")
    return head, proj, _open_text_encoder(text_encoder), ae


def _llm_config(text_encoder: str, te_src: Fp8Source, llm_config: dict | str | None) -> Qwen3Config:
    """The text encoder's config: `llm_config` (a dict or a json path), else `<stem>_config.json` beside
    it, else from its tensor shapes."""
    if llm_config is None:
        llm_config = _config_beside(text_encoder)
    if isinstance(llm_config, str):
        return Qwen3Config.from_json(read_json(llm_config), llm_config)
    if isinstance(llm_config, dict):
        return Qwen3Config.from_json(llm_config, "llm_config")
    return infer_qwen3_config(te_src, text_encoder)


# ---- the configs, from the tensor shapes ------------------------------------------------------

@dataclass(frozen=True)
class SplitConfigs:
    """The three ComfyUI split files, their configs (from the tensor shapes: headers only), the
    prompt tokenizer and parallel_num, with where each came from. What `fitting.plan_for` plans
    with and `load_split` (or `fitting.load_planned`) loads."""

    main_model: str
    text_encoder: str
    vae: str
    llm: Qwen3Config
    head: HeadConfig
    ae: AutoencoderConfig
    codec: PromptCodec
    tokenizer_from: str  # what the prompt tokenizer was built from
    parallel_from: str  # how parallel_num was decided

    @property
    def parts(self) -> tuple[Qwen3Config, HeadConfig, AutoencoderConfig]:
        return self.llm, self.head, self.ae

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def name(self) -> str:
        return os.path.basename(self.main_model)

    def summary(self) -> str:
        """One line for the console: what was read and how P and the tokenizer were decided."""
        return (f"{self.parallel_num} tokens per step ({self.parallel_from}); tokenizer: {self.tokenizer_from}; "
                f"backbone {self.llm.num_hidden_layers} layers x {self.llm.hidden_size}")


def read_split_configs(main_model: str, text_encoder: str, vae: str, tokenizer: str | None = None,
                       qwen_vocab: str | None = None, parallel_num: int | None = None,
                       llm_config: dict | str | None = None) -> SplitConfigs:
    """Read the split files' headers (no weights) and decide the configs, tokenizer and parallel_num.

    tokenizer: a tokenizer folder or tokenizer.json; else `<stem>_tokenizer.json` beside the text
    encoder; else `qwen_vocab`, a folder with Qwen's vocab.json and merges.txt (ComfyUI ships one)
    to which BitDance's res and query tokens are added (prompts.qwen_vocab_bitdance_codec).
    parallel_num (tokens per AR step: 64 or 16): given, or from the text encoder's vocabulary
    (151669 + 256 + P-1 rows, the released models), or from the tokenizer's query tokens.
    A `<stem>_config.json` beside the text-encoder or VAE file, or `llm_config`, overrides the
    shapes' configs."""
    head_src, _, te_src, vae_src = _open_parts(main_model, text_encoder, vae)
    llm = _llm_config(text_encoder, te_src, llm_config)
    ae_json = _config_beside(vae)
    ae = AutoencoderConfig.from_json(read_json(ae_json), ae_json) if ae_json else infer_ae_config(vae_src, vae)

    rows = llm.vocab_size
    p_rows = parallel_num_from_vocab_size(rows)
    if parallel_num is not None:
        require(isinstance(parallel_num, int) and parallel_num >= 4 and int(round(parallel_num ** 0.5)) ** 2 == parallel_num,
                f"parallel_num {parallel_num!r} is not a tokens-per-step count (64 or 16 for the released models)")
        require(p_rows is None or p_rows == parallel_num,
                f"{text_encoder}: its vocabulary of {rows} rows is that of a {p_rows}x model "
                f"(151669 + 256 + {p_rows - 1 if p_rows else 0}), not {parallel_num}x: set parallel_num to {p_rows} or auto")
    tok_file = tokenizer or tokenizer_beside(text_encoder)
    if tok_file is not None:
        codec = load_prompt_codec(tok_file) if os.path.isdir(tok_file) else from_tokenizers_file(tok_file)
        tokenizer_from = tok_file
        if parallel_num is not None:
            P, parallel_from = parallel_num, "as chosen"
        elif p_rows is not None:
            P, parallel_from = p_rows, f"from the text encoder's {rows} vocabulary rows"
        else:
            P = parallel_num_from_codec(codec)
            parallel_from = f"from the tokenizer's {P - 1} query tokens"
    else:
        require(qwen_vocab is not None,
                f"{text_encoder}: no tokenizer: give a folder with Qwen's vocab.json and merges.txt (ComfyUI's "
                f"comfy/text_encoders/qwen25_tokenizer), or put a tokenizer.json beside it as {os.path.basename(text_encoder)[:-12]}_tokenizer.json")
        if parallel_num is not None:
            P, parallel_from = parallel_num, "as chosen"
        else:
            require(p_rows is not None,
                    f"{text_encoder}: its embedding has {rows} rows, not a Qwen3-based BitDance vocabulary "
                    f"(151669 + 256 res + P-1 query tokens: {bitdance_vocab_size(64)} for 64x, {bitdance_vocab_size(16)} "
                    "for 16x), so parallel_num cannot be read from it: set parallel_num")
            P, parallel_from = p_rows, f"from the text encoder's {rows} vocabulary rows"
        codec = qwen_vocab_bitdance_codec(qwen_vocab, P)
        tokenizer_from = f"Qwen3's vocabulary in {qwen_vocab} + BitDance's res and query tokens"
    top = codec.token_id(f"<|query_{P - 1}|>", f"a {P}-token step needs {P - 1} query tokens")
    require(top < rows, f"{text_encoder}: the tokenizer ({tokenizer_from}) gives <|query_{P - 1}|> the id {top}, but the "
                        f"text encoder's embedding has only {rows} rows: the tokenizer and the text encoder do not match")

    head = infer_head_config(head_src, P, main_model)
    require(head.ch_cond == llm.hidden_size,
            f"{main_model}: the head's cond width {head.ch_cond} must equal the text encoder's hidden size {llm.hidden_size} "
            f"({text_encoder}): the two files are from different models")
    require(head.ch_target == ae.z_channels,
            f"{main_model}: the head's ch_target {head.ch_target} must equal the VAE's z_channels {ae.z_channels} ({vae})")
    return SplitConfigs(main_model, text_encoder, vae, llm, head, ae, codec, tokenizer_from, parallel_from)


# ---- loading ----------------------------------------------------------------------------------

def load_split(configs: SplitConfigs, device="cpu", dtype=torch.bfloat16, weights: str = "fp8", attention: str = "sdpa",
               matmul: str = "auto", include: Callable[[str, nn.Linear], bool] | None = None) -> T2IPipeline:
    """A T2IPipeline from the split files as `read_split_configs` found them.

    weights: "fp8" keeps the files' fp8 linears as fp8 (their bytes and scales as stored; any
    other big linear of the backbone or head is quantised on load); "as-is" (alias "dequant")
    widens every tensor to `dtype`; other formats as `t2i_loading.materialize_parts` offers them."""
    require(attention in ("sdpa", "flash"), f"attention '{attention}' unknown; use 'sdpa' or 'flash'")
    weights = "as-is" if weights == "dequant" else weights
    head_src, proj_src, te_src, vae_src = _open_parts(configs.main_model, configs.text_encoder, configs.vae)
    backbone, head, projector, ae = build_t2i_modules(*configs.parts)
    q4 = open_split_q4(configs.text_encoder, configs.llm, te_src) if weights == "4bit" else None
    backbone_part = ((backbone, q4, "4-bit text encoder", (), "backbone") if q4 is not None else
                     (backbone, te_src, "Qwen3 text encoder",
                      _unused_keys(backbone, te_src, "text encoder", Qwen3Backbone.IGNORED_KEYS), "backbone"))
    materialize_parts([backbone_part,
                       (head, head_src, "diffusion head", (), "head"), (projector, proj_src, "projector", (), None),
                       (ae, vae_src, "VAE", _unused_keys(ae, vae_src, "VAE"), None)],
                      weights, device, dtype, include, matmul)
    backbone.set_attention(attention)
    head.set_attention(attention)
    return T2IPipeline(backbone, head, projector, ae, configs.codec, device, name=configs.name)


# ---- the text encoder in 4 bits, written once ------------------------------------------------

def split_q4_file(text_encoder: str) -> str:
    """Where the split loader looks for a text encoder's 4-bit backbone: beside it, `<stem>-Q4_0.gguf`
    (ComfyUI's models/text_encoders/, where the GGUF files of other models go)."""
    return os.path.splitext(text_encoder)[0] + "-Q4_0.gguf"


def split_convert_command(text_encoder: str) -> str:
    return f"python -m bitdance_core convert --text-encoder {text_encoder} --weights 4bit"


def write_split_q4(text_encoder: str, out: str | None = None, progress: Callable[[int, int], None] | None = None,
                   llm_config: dict | str | None = None) -> str:
    """Write a split text encoder's backbone as a 4-bit GGUF file (default: `split_q4_file`), so that a
    4-bit load reads 4-bit bytes instead of quantising the fp8 file each time: the same bytes as that
    quantising (t2i_q4.write_q4_gguf). Returns the path."""
    te_src = _open_text_encoder(text_encoder)
    llm = _llm_config(text_encoder, te_src, llm_config)
    with torch.device("meta"):
        backbone = Qwen3Backbone(llm)
    check_keys(backbone, te_src, "Qwen3 text encoder", _unused_keys(backbone, te_src, "text encoder",
                                                                    Qwen3Backbone.IGNORED_KEYS))
    return write_q4_gguf(te_src, llm, os.path.basename(text_encoder), out or split_q4_file(text_encoder), progress)


def open_split_q4(text_encoder: str, llm: Qwen3Config, te_src: Fp8Source | None = None):
    """The text encoder's 4-bit file beside it (a GGUFSource), checked against it (format, config, the
    weights it was made from); None when there is none."""
    path = split_q4_file(text_encoder)
    if not os.path.isfile(path):
        return None
    return check_q4_gguf(path, llm, te_src, "this text encoder", text_encoder, split_convert_command(text_encoder))


def split_q4_status(text_encoder: str) -> str:
    """Where a 4-bit split load takes its backbone from, for the loader's decision line."""
    if os.path.isfile(split_q4_file(text_encoder)):
        return f"4-bit text encoder from {os.path.basename(split_q4_file(text_encoder))}"
    return (f"the text encoder is quantised on load (minutes at 14B); `{split_convert_command(text_encoder)}` "
            "writes it once")


def load_comfy_split(main_model: str, text_encoder: str, vae: str, tokenizer: str | None = None, device="cpu",
                     dtype=torch.bfloat16, weights: str = "fp8", parallel_num: int | None = None,
                     llm_config: dict | str | None = None, attention: str = "sdpa", matmul: str = "auto",
                     include: Callable[[str, nn.Linear], bool] | None = None, qwen_vocab: str | None = None):
    """read_split_configs + load_split in one call (see both)."""
    cfg = read_split_configs(main_model, text_encoder, vae, tokenizer=tokenizer, qwen_vocab=qwen_vocab,
                             parallel_num=parallel_num, llm_config=llm_config)
    return load_split(cfg, device=device, dtype=dtype, weights=weights, attention=attention, matmul=matmul,
                      include=include)


def save_comfy_split(pipe, folder: str, head_prefix: str = "diffusion_head.", projector_prefix: str = "projector.",
                     te_prefix: str = "", vae_prefix: str = "", vae_dtype=torch.float16,
                     scale_suffix: str = ".weight_scale", fp8: bool = True, dtype=torch.bfloat16,
                     names: dict[str, str] | None = None) -> dict[str, str]:
    """Write a pipeline as the three ComfyUI split files: the main model and the text encoder with
    their big linears in fp8 e4m3 + scale siblings (fp8=False: every tensor in `dtype`), the other
    tensors in `dtype`; the VAE in `vae_dtype`. names: file names per slot (default the community
    names without "14B"). Used by the tests and to convert a folder once."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)

    def tensors(module, prefix):
        out = {}
        sd = module.state_dict()
        lin_names = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, Fp8Linear)) and n}
        for k, v in sd.items():
            owner, _, leaf = k.rpartition(".")
            if owner in lin_names and leaf == "weight_scale":
                continue
            m = module.get_submodule(owner) if owner in lin_names else None
            if fp8 and m is not None and leaf == "weight" and min(v.shape) >= 64:
                if isinstance(m, Fp8Linear):
                    q, s = m.weight.detach().cpu(), m.weight_scale.detach().cpu()
                else:
                    q, s = quantize_fp8(v.detach().cpu())
                out[prefix + k] = q.contiguous()
                out[prefix + owner + scale_suffix] = s.contiguous()
            elif isinstance(m, Fp8Linear) and leaf == "weight":
                out[prefix + k] = m.dequantized_weight(dtype).contiguous()
            else:
                t = v.detach().cpu()
                out[prefix + k] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        return out

    main = tensors(pipe.head, head_prefix)
    main.update(tensors(pipe.projector, projector_prefix))
    te = tensors(pipe.backbone, te_prefix)
    ae = {vae_prefix + k: v.detach().cpu().to(vae_dtype).contiguous() for k, v in pipe.autoencoder.state_dict().items()}
    names = dict({"main_model": "BitDance_MainModel_FP8.safetensors", "text_encoder": "BitDance_TextEncoder_FP8.safetensors",
                  "vae": "BitDance_VAE_FP16.safetensors"}, **(names or {}))
    paths = {slot: os.path.join(folder, names[slot]) for slot in ("main_model", "text_encoder", "vae")}
    save_file(main, paths["main_model"])
    save_file(te, paths["text_encoder"])
    save_file(ae, paths["vae"])
    return paths


def describe_split(configs: SplitConfigs) -> T2IInfo:
    """What the split files make (sizes from the tokenizer's res tokens), like describe_t2i for a folder."""
    rule = SizeRule(configs.ae.downsample, configs.parallel_num, max_res_token(configs.codec))
    return T2IInfo("split", configs.parallel_num, configs.ae.downsample, configs.ae.z_channels, configs.llm.hidden_size,
                   rule, configs.name)
