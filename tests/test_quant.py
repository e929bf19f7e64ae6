"""fp8 weights: the arithmetic, the layer, quantise-on-load, and the ComfyUI split files
(written here, in the conventions of doc §3.2, as real safetensors files)."""
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitdance_core.errors import BitDanceError
from bitdance_core.formats import fp8_matmul
from bitdance_core.formats.checkpoints import open_safetensors
from bitdance_core.formats.fp8 import FP8, Fp8Linear, Fp8Source, dequantize_fp8, quantize_fp8, quantize_linears, set_matmul
from bitdance_core.pipelines.comfy_split import load_comfy_split, parallel_num_from_codec, save_comfy_split
from bitdance_core.pipelines.t2i_loading import load_t2i
from bitdance_core.cli.synthetic import SHAPES, SyntheticCodec, build_random_t2i, save_official_folder, write_tokenizer_json
from paths import assert_sampled_tokens, cpu_fp8_path

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def ref_pipe():
    return build_random_t2i("tiny", seed=5)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_json(str(d / "tokenizer.json"), SHAPES["tiny"].head.parallel_num)
    return str(d)


def _rel_err(a, b):
    """Relative error in norm (fp8 rounds each weight by up to 1/16 of its row's largest)."""
    return ((a - b).norm() / b.norm()).item()


def test_quantize_roundtrip_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    w[7] = 0
    q, s = quantize_fp8(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (48,) and s.dtype == torch.float32
    assert s[7] == 1.0 and torch.all(q[7].float() == 0)
    back = dequantize_fp8(q, s)
    # e4m3 has 3 mantissa bits: every element within 1/16 of its row's largest magnitude
    row_amax = w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert torch.all((back - w).abs() <= row_amax / 16 + 1e-30)
    # the largest element of each row maps exactly to 448
    assert torch.allclose(q.float().abs().amax(1)[s != 1], torch.full_like(s[s != 1], 448.0))


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_dequantised_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 64, bias=bias)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(3, 5, 96)
    ref = nn.functional.linear(x, f8.dequantized_weight(torch.float32), lin.bias)
    assert torch.allclose(f8(x), ref, rtol=1e-5, atol=1e-5)
    assert _rel_err(f8(x), lin(x)) < 0.05  # and close to the unquantised layer
    y16 = f8(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and _rel_err(y16.float(), ref) < 0.02
    assert set(f8.state_dict()) == ({"weight", "weight_scale", "bias"} if bias else {"weight", "weight_scale"})


def test_scaled_mm_path_on_the_cpu():
    """matmul="scaled_mm" runs fp8 x fp8 through torch._scaled_mm on any device that has the kernel
    (the GPU path's arithmetic, checked here where this PyTorch's CPU takes row-wise scales; elsewhere the
    stated fallback); "auto" keeps the CPU on the dequantising path."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    x = (torch.randn(3, 5, 96) * torch.logspace(-2, 1, 5)[None, :, None]).to(torch.bfloat16)  # rows of very different size
    f8 = Fp8Linear.from_linear(lin, matmul="scaled_mm")
    y = f8(x)
    assert f8.last_path == cpu_fp8_path("scaled_mm") and y.dtype == torch.bfloat16 and y.shape == (3, 5, 64)
    dequant = Fp8Linear.from_linear(lin, matmul="dequant")(x)
    if fp8_matmul.cpu_scaled_mm_takes_row_scales():
        # what scaled-mm computes: activations rounded to e4m3 with one scale per row, times the fp8 weight
        x2 = x.reshape(-1, 96).float()
        xs = x2.abs().amax(1, keepdim=True) / 448
        xq = (x2 / xs).to(FP8).float() * xs
        expect = (xq @ f8.dequantized_weight(torch.float32).t() + lin.bias).reshape(3, 5, 64)
        assert _rel_err(y.float(), expect) < 0.01
        assert not torch.equal(y, dequant)  # activations are quantised too: a different computation
    else:
        assert torch.equal(y, dequant)  # the stated fallback is the dequantising path
    assert _rel_err(y.float(), lin(x.float())) < 0.08
    auto = Fp8Linear.from_linear(lin, matmul="auto")
    assert torch.equal(auto(x), dequant)  # the CPU is not a scaled-mm device by default
    assert torch.equal(f8(x.float()), Fp8Linear.from_linear(lin)(x.float()))  # fp32 activations: never scaled-mm
    assert f8.last_path == "dequant (float32 input)"  # and the layer says so
    odd = Fp8Linear.from_linear(nn.Linear(90, 64), matmul="scaled_mm")  # 90 is no multiple of 16: dequantises
    assert odd.path_for(torch.zeros(1, 90, dtype=torch.bfloat16)) == ("dequant", "90x64 is not a multiple of 16")


def test_scaled_mm_pipeline_on_the_cpu(ref_pipe, tok_dir, tmp_path):
    folder = save_official_folder(ref_pipe, str(tmp_path / "model"), os.path.join(tok_dir, "tokenizer.json"))
    pipe = load_t2i(folder, dtype=torch.bfloat16, weights="fp8", matmul="scaled_mm")
    lin = pipe.backbone.model.layers[0].mlp.down_proj
    assert isinstance(lin, Fp8Linear) and lin.matmul == "scaled_mm"
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 20, 64, generator=g)
    pos = torch.arange(20)[None].expand(2, 20)
    out = pipe.backbone(emb.to(torch.bfloat16), pos).float()
    assert lin.last_path == cpu_fp8_path("scaled_mm")  # it did go through torch._scaled_mm (where the CPU can)
    assert _rel_err(out, ref_pipe.backbone(emb, pos)) < 0.1
    c, x, t = torch.randn(2, 16, 64, generator=g), torch.rand(2, 16, 32, generator=g) * 2 - 1, torch.full((2,), 0.3)
    ref = ref_pipe.head.net(x, t, c)
    head_out = pipe.head.net(x.to(torch.bfloat16), t, c.to(torch.bfloat16)).float()
    assert pipe.head.net.res_blocks[0].attn.wqkv.last_path == cpu_fp8_path("scaled_mm")
    set_matmul(pipe.head, "dequant")  # weight-only fp8: the error scaled-mm adds by rounding activations is small
    dequant_err = _rel_err(pipe.head.net(x.to(torch.bfloat16), t, c.to(torch.bfloat16)).float(), ref)
    assert _rel_err(head_out, ref) < 2 * dequant_err < 0.3, (_rel_err(head_out, ref), dequant_err)
    assert_sampled_tokens(pipe.generate(PROMPT, 128, 128, steps=2, cfg=4.0, seed=0), (1, 32, 8, 8), max_zero=0.05)


def test_quantize_linears_keeps_the_narrow_ends_and_dtype_probes(ref_pipe):
    import copy

    head = copy.deepcopy(ref_pipe.head)
    names = quantize_linears(head)
    assert "net.res_blocks.0.attn.wqkv" in names and "net.cond_embed" in names
    for keep in ("net.input_proj", "net.final_layer.linear", "net.time_embed.mlp.0"):
        assert keep not in names and type(head.get_submodule(keep)) is nn.Linear
    c = torch.randn(2, 16, 64)
    x = torch.randn(2, 16, 32)
    t = torch.full((2,), 0.3)
    assert _rel_err(head.net(x, t, c), ref_pipe.head.net(x, t, c)) < 0.15  # random weights, 2 modulated blocks


def test_fp8_source_reads_every_scale_spelling(tmp_path):
    g = torch.Generator().manual_seed(1)
    ws = {f"l{i}": torch.randn(32, 64, generator=g) for i in range(5)}
    sd = {}
    for i, suffix in enumerate([".weight_scale", ".weight.scale", ".scale_weight", ".weight_scales"]):
        q, s = quantize_fp8(ws[f"l{i}"])
        sd[f"l{i}.weight"], sd[f"l{i}{suffix}"] = q, s[:, None] if i == 1 else s  # [out, 1] works too
    q4 = (ws["l4"] / 0.01).clamp(-448, 448).to(FP8)  # one per-tensor scale
    sd["l4.weight"], sd["l4.weight_scale"] = q4, torch.tensor(0.01)
    sd["l4.input_scale"] = torch.tensor(2.0)
    sd["l4.comfy_quant"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    sd["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    sd["norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    path = str(tmp_path / "f.safetensors")
    save_file(sd, path)
    src = Fp8Source(open_safetensors([path]))
    assert set(src.shapes) == {f"l{i}.weight" for i in range(5)} | {"norm.weight"}
    for i in range(4):
        w = src.read(f"l{i}.weight", "cpu", torch.float32)
        assert (w - ws[f"l{i}"]).abs().max() <= ws[f"l{i}"].abs().max() / 16
        q, s = src.read_fp8(f"l{i}.weight", "cpu")
        assert torch.equal(q.view(torch.uint8), sd[f"l{i}.weight"].view(torch.uint8))  # bytes kept as they are
        assert s.shape == (32,)
    q, s = src.read_fp8("l4.weight", "cpu")
    assert torch.equal(q.view(torch.uint8), q4.view(torch.uint8)) and torch.allclose(s, torch.full((32,), 0.01))
    assert src.read("norm.weight", "cpu", torch.float32).dtype == torch.float32


def test_quantise_on_load_from_an_official_folder(ref_pipe, tok_dir, tmp_path):
    folder = save_official_folder(ref_pipe, str(tmp_path / "model"), os.path.join(tok_dir, "tokenizer.json"))
    pipe = load_t2i(folder, dtype=torch.float32, weights="fp8")
    lin = pipe.backbone.model.layers[1].mlp.down_proj
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8
    q, s = quantize_fp8(ref_pipe.backbone.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(lin.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(lin.weight_scale, s)
    assert not isinstance(pipe.projector.fc2, Fp8Linear)  # projector and AE stay in the compute dtype
    emb = torch.randn(2, 20, 64)
    pos = torch.arange(20)[None].expand(2, 20)
    assert _rel_err(pipe.backbone(emb, pos), ref_pipe.backbone(emb, pos)) < 0.08
    bits = pipe.generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=0)
    assert bits.shape == (1, 32, 8, 8)
    assert_sampled_tokens(bits)


@pytest.mark.parametrize("prefixes", [("diffusion_head.", "projector.", "", ""),
                                      ("model.diffusion_head.", "model.projector.", "text_encoder.", "vae."),
                                      ("", "", "model.text_encoder.", "autoencoder.")])
def test_comfy_split_files_load(ref_pipe, tok_dir, tmp_path, prefixes):
    hp, pp, tp, vp = prefixes
    paths = save_comfy_split(ref_pipe, str(tmp_path), head_prefix=hp, projector_prefix=pp, te_prefix=tp, vae_prefix=vp)
    written = load_file(paths["text_encoder"])
    assert written[tp + "model.layers.0.mlp.up_proj.weight"].dtype == FP8
    assert (tp + "model.layers.0.mlp.up_proj.weight_scale") in written
    assert load_file(paths["vae"])[vp + "decoder.conv_out.weight"].dtype == torch.float16

    pipe = load_comfy_split(paths["main_model"], paths["text_encoder"], paths["vae"], tok_dir, dtype=torch.float32)
    assert pipe.parallel_num == 16 and pipe.backbone.config.num_hidden_layers == 2
    assert pipe.head.config.depth_latent == 2 and pipe.autoencoder.config.ch_mult == (1, 1, 1, 1, 1)
    up = pipe.backbone.model.layers[0].mlp.up_proj
    assert isinstance(up, Fp8Linear)
    assert torch.equal(up.weight.view(torch.uint8), written[tp + "model.layers.0.mlp.up_proj.weight"].view(torch.uint8))
    wq = pipe.head.net.res_blocks[1].w1
    assert isinstance(wq, Fp8Linear)

    deq = load_comfy_split(paths["main_model"], paths["text_encoder"], paths["vae"], tok_dir, dtype=torch.float32,
                           weights="dequant")
    assert type(deq.backbone.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.allclose(deq.backbone.model.layers[0].mlp.up_proj.weight, up.dequantized_weight(), rtol=0, atol=0)
    emb = torch.randn(1, 12, 64)
    pos = torch.arange(12)[None]
    assert torch.allclose(pipe.backbone(emb, pos), deq.backbone(emb, pos), rtol=1e-4, atol=1e-4)
    assert _rel_err(pipe.backbone(emb, pos), ref_pipe.backbone(emb, pos)) < 0.08
    bits = pipe.generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=0)
    assert bits.shape == (1, 32, 8, 8)


def test_comfy_split_errors(ref_pipe, tok_dir, tmp_path):
    paths = save_comfy_split(ref_pipe, str(tmp_path))
    main = load_file(paths["main_model"])
    bad = dict(main, **{"something.else": torch.zeros(3)})
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning, match=r"extra.safetensors: 1 key\(s\) .* left unread: \['something.else'\]"):
        load_comfy_split(str(tmp_path / "extra.safetensors"), paths["text_encoder"], paths["vae"], tok_dir)
    no_head = {k: v for k, v in main.items() if not k.startswith("diffusion_head.")}
    save_file(no_head, str(tmp_path / "nohead.safetensors"))
    with pytest.raises(BitDanceError, match="no diffusion-head keys"):
        load_comfy_split(str(tmp_path / "nohead.safetensors"), paths["text_encoder"], paths["vae"], tok_dir)
    te = load_file(paths["text_encoder"])
    te.pop("model.layers.1.input_layernorm.weight")
    save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(BitDanceError, match="missing keys.*input_layernorm"):
        load_comfy_split(paths["main_model"], str(tmp_path / "te.safetensors"), paths["vae"], tok_dir)


def test_parallel_num_from_tokenizer():
    assert parallel_num_from_codec(SyntheticCodec(1024, 16)) == 16
    assert parallel_num_from_codec(SyntheticCodec(4096, 64)) == 64


def test_config_beside_the_vae_file_wins(ref_pipe, tok_dir, tmp_path):
    import json

    paths = save_comfy_split(ref_pipe, str(tmp_path))
    cfg = ref_pipe.autoencoder.config.to_json()
    cfg["ddconfig"]["ch"] = 64  # not what the file holds: the strict shape check must say so
    with open(paths["vae"][: -len(".safetensors")] + "_config.json", "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
        f.write("{\"unrelated\": true}")  # another model's config.json in the same folder is not read
    with pytest.raises(BitDanceError, match="VAE config.*shape"):
        load_comfy_split(paths["main_model"], paths["text_encoder"], paths["vae"], tok_dir)
