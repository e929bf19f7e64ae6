"""A small byte-level BPE tokenizer for the text-to-image demo, built with the `tokenizers` library.

Like the official one it has no BOS and no post-processor, and carries BitDance's special tokens:
<|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|res_1..R|> and <|query_1..P-1|>.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from . import data

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def build_text_tokenizer(parallel_num: int, max_side: int = 64, vocab_size: int = 320) -> Tokenizer:
    """BPE merges learnt from the demo prompts (plus the bytes), then the special tokens.
    max_side: the largest latent side with a <|res_N|> token (64 tokens = 512 px at 8x)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chat = [f"user\n{p}\nassistant\n" for p in data.corpus()]  # the words of the chat template too
    tok.train_from_iterator(chat * 4, trainer=trainer)
    specials = CHAT_TOKENS + [f"<|res_{i}|>" for i in range(1, max_side + 1)] + \
        [f"<|query_{i}|>" for i in range(1, parallel_num)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def save_text_tokenizer(tok: Tokenizer, folder: str) -> None:
    """tokenizer.json plus the tokenizer_config.json a transformers AutoTokenizer reads."""
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
                   "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "unk_token": None}, f, indent=2)
        f.write("\n")
