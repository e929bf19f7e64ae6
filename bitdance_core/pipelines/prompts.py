"""Prompt templating and token ids: the chat template, the res and query tokens.

The cond prompt is `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`; the official
unconditional prompt is `<|im_start|>assistant\\n`. A negative prompt replaces the unconditional
prompt and is templated like a user turn. The image prefix is
`<|vision_start|> <|res_{H/16}|> <|res_{W/16}|> <|query_1|> .. <|query_{P-1}|>`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BitDanceError

COND_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
UNCOND_PROMPT = "<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTokens:
    """What the text-encode step produces: the templated ids of both guidance branches."""

    prompt: str
    negative_prompt: str | None
    cond_ids: tuple[int, ...]
    uncond_ids: tuple[int, ...]


class PromptCodec:
    """Wraps a `tokenizers.Tokenizer` (or a transformers tokenizer when only vocab/merges exist)."""

    def __init__(self, encode_fn, token_to_id_fn, origin: str):
        self._encode = encode_fn
        self._token_to_id = token_to_id_fn
        self.origin = origin

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def has_token(self, token: str) -> bool:
        return self._token_to_id(token) is not None

    def token_id(self, token: str, why: str) -> int:
        tid = self._token_to_id(token)
        if tid is None:
            raise BitDanceError(f"{self.origin}: the tokenizer has no {token} token ({why})")
        return int(tid)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> PromptTokens:
        if not isinstance(prompt, str) or not prompt.strip():
            raise BitDanceError("prompt is empty: give the text to draw")
        for marker in ("<|im_start|>", "<|im_end|>"):  # else the template would be split into plain text silently
            self.token_id(marker, "the chat template marks each turn with it; use the BitDance model's tokenizer files")
        neg = negative_prompt if negative_prompt and negative_prompt.strip() else None
        cond = self.encode(COND_TEMPLATE.format(prompt=prompt))
        uncond = self.encode(COND_TEMPLATE.format(prompt=neg) if neg else UNCOND_PROMPT)
        return PromptTokens(prompt, neg, tuple(cond), tuple(uncond))

    def image_prefix(self, lat_h: int, lat_w: int, parallel_num: int) -> list[int]:
        ids = [self.token_id("<|vision_start|>", "it opens the image")]
        for side, what in ((lat_h, "height"), (lat_w, "width")):
            ids.append(self.token_id(f"<|res_{side}|>", f"an image {what} of {side} latent tokens is not supported by this model"))
        ids += [self.token_id(f"<|query_{i}|>", f"query token of a {parallel_num}-token block") for i in range(1, parallel_num)]
        return ids


def from_tokenizers_file(path: str) -> PromptCodec:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise BitDanceError(f"{path}: not a readable tokenizer.json ({e})") from e
    return PromptCodec(lambda s: tok.encode(s, add_special_tokens=False).ids, tok.token_to_id, path)


def load_prompt_codec(folder: str) -> PromptCodec:
    """tokenizer.json when present (fast, exact); else the transformers tokenizer from vocab/merges."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        return from_tokenizers_file(path)
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        unk = tok.unk_token_id

        def tid(t):
            i = tok.convert_tokens_to_ids(t)
            return None if i is None or i == unk else i
        return PromptCodec(lambda s: tok.encode(s, add_special_tokens=False), tid, folder)
    raise BitDanceError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")


def bitdance_tokens(parallel_num: int, max_resolution: int = 4096, patch: int = 16) -> list[str]:
    """The special tokens BitDance adds to Qwen3, in the order that gives the official ids."""
    return [f"<|res_{i}|>" for i in range(1, max_resolution // patch + 1)] + [f"<|query_{i}|>" for i in range(1, parallel_num)]


# Qwen3's vocabulary (doc §1.6, §5.1): 151643 byte-level BPE tokens, then these 26 added tokens
# (ids 151643 .. 151668); BitDance appends bitdance_tokens() after them (res_1 = 151669).
QWEN3_BPE_SIZE = 151643
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>")
QWEN3_SIZE = QWEN3_BPE_SIZE + len(QWEN3_ADDED_TOKENS)  # 151669
# sha256 of Qwen3's vocab.json and merges.txt (line ends as LF), byte-identical to BitDance's (doc §1.6).
# Qwen2.5's files are the same, which is why ComfyUI's own Qwen tokenizer folder serves BitDance.
QWEN_VOCAB_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
QWEN_MERGES_SHA256 = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"
# Qwen2's pre-tokenizer split (the regex of Qwen2/Qwen3 tokenizer.json)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def bitdance_vocab_size(parallel_num: int) -> int:
    """Rows of a Qwen3-based BitDance text encoder's embedding: 151669 + 256 res + (P-1) query tokens."""
    return QWEN3_SIZE + len(bitdance_tokens(parallel_num))


def parallel_num_from_vocab_size(rows: int) -> int | None:
    """The inverse of bitdance_vocab_size (None when `rows` is not a Qwen3-based BitDance vocabulary)."""
    p = rows - bitdance_vocab_size(1) + 1
    return p if p >= 4 and int(round(p ** 0.5)) ** 2 == p else None


def _add_bitdance_tokens(tok, parallel_num: int, origin: str, qwen_added: bool) -> PromptCodec:
    """Append (Qwen3's added tokens, when `qwen_added`, then) BitDance's res and query tokens to a
    `tokenizers.Tokenizer` over Qwen's BPE, checking each lands on its official id."""
    from tokenizers import AddedToken

    if parallel_num < 2:
        raise BitDanceError(f"parallel_num must be at least 2 (16 or 64 for the released models), got {parallel_num}")
    names = (list(QWEN3_ADDED_TOKENS) if qwen_added else []) + bitdance_tokens(parallel_num)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    for i, t in enumerate((*QWEN3_ADDED_TOKENS, *bitdance_tokens(parallel_num))):
        if tok.token_to_id(t) != QWEN3_BPE_SIZE + i:
            raise BitDanceError(f"{origin}: {t} got id {tok.token_to_id(t)}, not BitDance's {QWEN3_BPE_SIZE + i}: "
                                "not Qwen3's vocabulary")
    return PromptCodec(lambda s: tok.encode(s, add_special_tokens=False).ids, tok.token_to_id, origin)


def qwen3_bitdance_codec(qwen_tokenizer_json: str, parallel_num: int = 64) -> PromptCodec:
    """The real BitDance tokenizer rebuilt from a stock Qwen3 tokenizer.json plus the res and query tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(qwen_tokenizer_json)
    return _add_bitdance_tokens(tok, parallel_num, qwen_tokenizer_json, qwen_added=False)


def _sha256_lf(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read().replace(b"\r\n", b"\n")).hexdigest()


def qwen_vocab_bitdance_codec(folder: str, parallel_num: int) -> PromptCodec:
    """BitDance's tokenizer built from a folder holding Qwen's vocab.json and merges.txt (as ComfyUI
    ships them in comfy/text_encoders/qwen25_tokenizer/): Qwen2's byte-level BPE pipeline (NFC, its
    split regex, byte-level), Qwen3's 26 added tokens, then the res and query tokens. Both files
    must be the Qwen3 ones byte for byte (line ends aside); nothing is downloaded."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    paths = {n: os.path.join(folder, n) for n in ("vocab.json", "merges.txt")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise BitDanceError(f"{folder}: no Qwen vocabulary here (missing {', '.join(missing)})")
    for name, want in (("vocab.json", QWEN_VOCAB_SHA256), ("merges.txt", QWEN_MERGES_SHA256)):
        got = _sha256_lf(paths[name])
        if got != want:
            raise BitDanceError(f"{paths[name]}: not Qwen3's {name} (sha256 {got[:12]}..., expected {want[:12]}...): "
                                "BitDance's token ids need Qwen3's vocabulary")
    with open(paths["vocab.json"], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(paths["merges.txt"], encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines() if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return _add_bitdance_tokens(tok, parallel_num, folder, qwen_added=True)
