"""Our Qwen3 against transformers' Qwen3Model on random weights: prefill and cached block steps."""
import warnings

import torch

from bitdance_core.formats.checkpoints import source_from_state_dict, materialize
from bitdance_core.models.qwen3 import KVCache, Qwen3Backbone, Qwen3Config, rope_tables

from comfy_launcher import _define_torchvision_schemas

# transformers imports torchvision when present; the CPU test env has PyPI's CUDA torchvision
# beside CPU torch (see comfy_launcher.py), which needs its op schemas defined first.
_define_torchvision_schemas()
import transformers  # noqa: E402


def make_pair(seed=0):
    hf_cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                      rope_theta=1e6, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(seed)
    ref = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms away from 1, so a missing norm would show
            p.add_(torch.randn_like(p) * 0.1)
    ours = Qwen3Backbone(Qwen3Config.from_json(hf_cfg.to_dict() | {"architectures": ["Qwen3ForCausalLM"]}))
    with torch.device("meta"):
        ours = Qwen3Backbone(ours.config)
    materialize(ours, source_from_state_dict(ref.state_dict(), "hf"), "backbone", "cpu", torch.float32,
                ignore=Qwen3Backbone.IGNORED_KEYS)
    return ref.model, ours


@torch.no_grad()
def test_prefill_and_cached_block_steps_match_transformers():
    ref, ours = make_pair()
    B, T, P = 2, 11, 4
    x = torch.randn(B, T, 64)
    out_ref = ref(inputs_embeds=x, use_cache=True)
    cache_ref = out_ref.past_key_values
    cache = KVCache(ours.config, B, T + 2 * P, torch.float32, "cpu")
    pos = torch.arange(T)[None].expand(B, T)
    out = ours(x, pos, cache, 0, None)
    torch.testing.assert_close(out, out_ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    start = T
    for _ in range(2):  # block steps: bidirectional within the block, full view of the cache
        blk = torch.randn(B, P, 64)
        mask = torch.ones(B, 1, P, start + P, dtype=torch.bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o_ref = ref(inputs_embeds=blk, past_key_values=cache_ref, use_cache=True, attention_mask=mask)
        cache_ref = o_ref.past_key_values
        o = ours(blk, start + torch.arange(P)[None].expand(B, P), cache, start, True)
        torch.testing.assert_close(o, o_ref.last_hidden_state, rtol=1e-5, atol=1e-5)
        start += P


@torch.no_grad()
def test_bf16_block_steps_keep_the_official_float32_residual():
    """The official pipeline runs HF Qwen3 with bf16 weights under bf16 autocast; its image steps feed
    float32 inputs (projected bits + the float32 position table), so the residual stream, the RoPE
    rotation and the final norm stay float32 while the linears and attention run in bf16 (keys rounded
    once into the cache). Ours with bf16 weights follows that: seen from inside (every layer's input
    float32 in a block step and bf16 in the prefill, every linear's input bf16, the cached keys the
    float32 rotation rounded once), and from outside (float32 hidden states close to transformers'
    under bf16 autocast)."""
    ref, ours = make_pair(seed=3)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    seen = {"layer": [], "linear": []}
    hooks = [m.register_forward_pre_hook(lambda _m, a, k=k: seen[k].append(a[0].dtype))
             for k, mods in (("layer", ours.model.layers),
                             ("linear", [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]))
             for m in mods]
    B, T, P = 2, 11, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, 64, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache_ref = ref(inputs_embeds=x, use_cache=True).past_key_values
    cache = KVCache(ours.config, B, T + 2 * P, torch.bfloat16, "cpu")
    ours(x, torch.arange(T)[None].expand(B, T), cache, 0, None)
    assert set(seen["layer"]) == {torch.bfloat16} and set(seen["linear"]) == {torch.bfloat16}
    start = T
    for _ in range(2):
        seen["layer"].clear(), seen["linear"].clear()
        blk = torch.randn(B, P, 64, generator=g)  # float32, as an image step's input is
        mask = torch.ones(B, 1, P, start + P, dtype=torch.bool)
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
            warnings.simplefilter("ignore")
            o_ref = ref(inputs_embeds=blk, past_key_values=cache_ref, use_cache=True, attention_mask=mask)
        cache_ref = o_ref.past_key_values
        pos = start + torch.arange(P)[None].expand(B, P)
        o = ours(blk, pos, cache, start, True)
        assert set(seen["layer"]) == {torch.float32} and set(seen["linear"]) == {torch.bfloat16}
        assert o.dtype == torch.float32
        want = o_ref.last_hidden_state
        assert ((o - want).norm() / want.norm()).item() < 1e-2
        # layer 0's new keys: projected in bf16, normalised, rotated with float32 tables, rounded once
        attn = ours.model.layers[0].self_attn
        cos, sin = rope_tables(ours.config, pos, torch.float32)
        k = attn.k_norm(attn.k_proj(ours.model.layers[0].input_layernorm(blk).to(torch.bfloat16)).view(B, P, -1, 16))
        k = k.transpose(1, 2)
        c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
        rotated = k * c + torch.cat([-k[..., 8:], k[..., :8]], dim=-1) * s_
        assert rotated.dtype == torch.float32
        assert torch.equal(cache.k[0, :, :, start:start + P], rotated.to(torch.bfloat16))
        start += P
    for h in hooks:
        h.remove()


@torch.no_grad()
def test_left_padded_rows_equal_unpadded_rows():
    """Rows of one batch with different prompt lengths (left padding + per-row positions) give the
    same hidden states as each row run alone: what batched guidance relies on."""
    _, ours = make_pair(1)
    short, long_ = torch.randn(1, 5, 64), torch.randn(1, 9, 64)
    alone = [ours(s, torch.arange(s.shape[1])[None], None, 0, None)[:, -1] for s in (short, long_)]
    L = 9
    x = torch.cat([torch.cat([torch.zeros(1, 4, 64), short], 1), long_])
    pads = torch.tensor([4, 0])
    ar = torch.arange(L)
    pos = (ar[None] - pads[:, None]).clamp_min(0)
    valid = ar[None] >= pads[:, None]
    mask = (ar[:, None] >= ar[None])[None] & valid[:, None] | torch.eye(L, dtype=torch.bool)[None]
    both = ours(x, pos, None, 0, mask[:, None])[:, -1]
    torch.testing.assert_close(both[0:1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1:2], alone[1], rtol=1e-5, atol=1e-5)
