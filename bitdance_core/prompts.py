"""Prompt templating and token ids: the chat template, the res and query tokens.

The cond prompt is `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`; the official
unconditional prompt is `<|im_start|>assistant\\n`. A negative prompt replaces the unconditional
prompt and is templated like a user turn. The image prefix is
`<|vision_start|> <|res_{H/16}|> <|res_{W/16}|> <|query_1|> .. <|query_{P-1}|>`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BitDanceError

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


def qwen3_bitdance_codec(qwen_tokenizer_json: str, parallel_num: int = 64) -> PromptCodec:
    """The real BitDance tokenizer rebuilt from a stock Qwen3 tokenizer.json plus the res and query tokens."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(qwen_tokenizer_json)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in bitdance_tokens(parallel_num)])
    return PromptCodec(lambda s: tok.encode(s, add_special_tokens=False).ids, tok.token_to_id, qwen_tokenizer_json)
