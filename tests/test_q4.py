"""4-bit weights: GGUF Q4_0 linears (the arithmetic against the `gguf` package's own), the folder's
backbone-Q4_0.gguf (convert, then load = quantise on load, bit for bit), the files' checks, and
4-bit pipelines through the offload modes."""
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gguf

from paths import assert_sampled_tokens, fixture_dirs, run_cli

from bitdance_core.errors import BitDanceError
from bitdance_core.formats.checkpoints import open_sharded
from bitdance_core.formats.fp8 import Fp8Linear
from bitdance_core.formats.gguf_file import GGUFSource, write_gguf
from bitdance_core.formats.q4 import BLOCK, Q4Linear, dequantize_q4_0, quantize_linears, quantize_q4_0
from bitdance_core.pipelines.t2i_loading import load_t2i, read_t2i_configs
from bitdance_core.pipelines.t2i_q4 import Q4_FILE, q4_file, write_q4_backbone
from bitdance_core.runtime.fitting import plan_for
from bitdance_core.runtime.offload import apply_offload

warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
Q4_0 = gguf.GGMLQuantizationType.Q4_0
T2I_FIXTURES = [os.path.join(d, "model") for d in fixture_dirs("t2i-")]
GEN = dict(height=128, width=128, steps=3, cfg=4.0, seed=11)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _weights(out, inp, seed=0):
    """Heavy-tailed weights (Student t, 5 degrees of freedom), rows of different scales, one row zero."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(5.0).sample((out, inp)) * 0.02
    w *= torch.logspace(-1, 1, out)[:, None]
    w[3] = 0
    return w


def _gguf_dequant(blocks: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q4_0))


# ---- the arithmetic --------------------------------------------------------------------------

def test_blocks_are_the_gguf_packages_and_the_error_is_bounded():
    w = _weights(48, 256)
    blocks = quantize_q4_0(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (48, 256 // 32 * 18)  # 4.5 bits per weight
    back = _gguf_dequant(blocks)
    assert torch.equal(dequantize_q4_0(blocks, 256), back)  # float32: the package's own values, bit for bit
    # every weight within one step of its block's scale (Q4_0 maps the block's largest magnitude to -8 d,
    # so the other sign reaches only 7 d: at most d off there, at most d/2 elsewhere)
    d = blocks.reshape(-1, 18)[:, :2].contiguous().view(torch.float16).float().abs().reshape(48, -1)
    step = d.repeat_interleave(BLOCK, dim=1)
    assert torch.all((back - w).abs() <= step * 1.001 + 1e-12)
    assert torch.all(back[3] == 0)
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.15, rel  # 16 levels per block of 32 (fp8 e4m3: ~0.03, bf16: ~0.002)


def test_quantising_in_chunks_on_threads_gives_the_packages_bytes(monkeypatch):
    """quantize_q4_0 hands the gguf quantiser chunks of rows on several threads (a 14B backbone is
    quantised on load): the bytes are those of one call on the whole weight, a last short chunk included."""
    from bitdance_core.formats import q4

    monkeypatch.setattr(q4, "QUANTIZE_CHUNK", 5 * 256)  # 5 rows a chunk: 48 rows make 10 chunks, the last of 3
    w = _weights(48, 256, seed=1)
    whole = torch.from_numpy(gguf.quants.quantize(w.numpy(), Q4_0))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert torch.equal(q4.quantize_q4_0(w), whole)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(q4.quantize_q4_0(w[:, :64]), torch.from_numpy(gguf.quants.quantize(w[:, :64].numpy(), Q4_0)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantisation_in_half_precision_rounds_only_the_scale(dtype):
    w = _weights(32, 128, seed=1)
    blocks = quantize_q4_0(w)
    got = dequantize_q4_0(blocks, 128, dtype)
    b = blocks.reshape(-1, 18)
    d = b[:, :2].contiguous().view(torch.float16).to(dtype).float()
    q = torch.cat([b[:, 2:] & 15, b[:, 2:] >> 4], dim=1).float() - 8
    assert got.dtype == dtype and torch.equal(got, (q * d).to(dtype).reshape(32, 128))
    ref = _gguf_dequant(blocks)
    assert torch.all((got.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_q4_linear_equals_the_dequantised_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    q = Q4Linear.from_linear(lin)
    ref_w = _gguf_dequant(q.weight.data)
    x = torch.randn(3, 5, 96)
    assert torch.equal(q(x), F.linear(x, ref_w, lin.bias))  # float32: bit for bit
    xb = x.to(torch.bfloat16)
    assert torch.equal(q(xb), F.linear(xb, q.dequantized_weight(torch.bfloat16),
                                       None if lin.bias is None else lin.bias.to(torch.bfloat16)))
    assert q.weight.numel() == 40 * 96 * 18 // 32 and not q.weight.requires_grad


def test_quantize_linears_selects_the_big_ones():
    m = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 96), nn.Linear(80, 64), nn.Linear(64, 16))
    swapped = quantize_linears(m)
    assert swapped == ["0", "1"]  # 80 inputs do not split into blocks of 32; 16 outputs: too narrow
    assert isinstance(m[0], Q4Linear) and type(m[2]) is nn.Linear and type(m[3]) is nn.Linear
    with pytest.raises(BitDanceError, match="in_features divisible by 32"):
        Q4Linear(40, 64)
    with pytest.raises(BitDanceError, match="multiple of 32"):
        quantize_q4_0(torch.zeros(4, 40))


def test_a_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(BitDanceError, match="pip install gguf"):
        quantize_q4_0(torch.zeros(2, 32))


# ---- GGUF files ----------------------------------------------------------------------------

def test_gguf_file_roundtrip(tmp_path):
    w = _weights(64, 96, seed=2)
    tensors = {"lin.weight": quantize_q4_0(w), "norm.weight": torch.randn(96).to(torch.bfloat16),
               "bias": torch.randn(64), "half": torch.randn(2, 3).half()}
    kinds = {"lin.weight": "Q4_0", "norm.weight": "BF16", "bias": "F32", "half": "F16"}
    shapes = {"lin.weight": (64, 96), "norm.weight": (96,), "bias": (64,), "half": (2, 3)}
    path = write_gguf(str(tmp_path / "t.gguf"), "bitdance", {"bitdance.note": "x", "bitdance.n": 7},
                      [(k, shapes[k], kinds[k]) for k in tensors], tensors.__getitem__)
    assert not os.path.exists(path + ".partial")
    src = GGUFSource(path)
    assert src.shapes == shapes and src.metadata("bitdance.note") == "x" and src.metadata("bitdance.n") == 7
    assert torch.equal(src.read_q4_0("lin.weight"), tensors["lin.weight"])
    # a rename that fails at the very end (the target is a folder) leaves no .partial behind
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(OSError):
        write_gguf(str(tmp_path / "folder.gguf"), "bitdance", {}, [("bias", (64,), "F32")], tensors.__getitem__)
    assert not os.path.exists(str(tmp_path / "folder.gguf") + ".partial")
    assert torch.equal(src.read("lin.weight", "cpu", None), _gguf_dequant(tensors["lin.weight"]))
    for k in ("norm.weight", "bias", "half"):
        got = src.read(k, "cpu", None)
        assert got.dtype == tensors[k].dtype and torch.equal(got, tensors[k]), k
        assert src.read_q4_0(k) is None  # a float tensor: quantised on load when a Q4_0 linear wants it
    # the gguf package reads it as any GGUF file
    r = gguf.GGUFReader(path)
    assert {t.name: t.tensor_type.name for t in r.tensors} == kinds


def test_a_damaged_gguf_file_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(BitDanceError, match=r"bad.gguf: not a readable GGUF file"):
        GGUFSource(str(bad))
    with pytest.raises(BitDanceError, match="missing file"):
        GGUFSource(str(tmp_path / "none.gguf"))


# ---- the model folder's 4-bit backbone ------------------------------------------------------------

@pytest.fixture(params=T2I_FIXTURES, ids=[os.path.basename(os.path.dirname(p)) for p in T2I_FIXTURES])
def folder(request, tmp_path):
    """A writable copy of a text-to-image fixture model folder."""
    dst = tmp_path / "model"
    shutil.copytree(request.param, dst)
    os.chmod(dst, 0o755)
    return str(dst)


def test_convert_then_load_is_quantise_on_load(folder):
    on_load = load_t2i(folder, weights="4bit")
    assert not os.path.exists(q4_file(folder))
    assert "quantised on load" in plan_for(folder, None, device="cpu", weights="4bit").reason
    r = run_cli("convert", "--model", folder, "--weights", "4bit")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == q4_file(folder) and os.path.isfile(q4_file(folder))
    assert f"4-bit backbone from {Q4_FILE}" in plan_for(folder, None, device="cpu", weights="4bit").reason
    from_file = load_t2i(folder, weights="4bit")
    a, b = on_load.backbone.state_dict(), from_file.backbone.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(on_load.generate("a red fox", **GEN), from_file.generate("a red fox", **GEN))
    # what is 4-bit: the backbone's big linears (Q4_0), the head's (fp8); the rest as stored
    q4 = [n for n, m in from_file.backbone.named_modules() if isinstance(m, Q4Linear)]
    assert q4 and all(n.startswith("model.layers.") for n in q4)
    assert any(isinstance(m, Fp8Linear) for m in from_file.head.modules())
    assert from_file.backbone.model.embed_tokens.weight.dtype == torch.float32
    # the file holds the backbone: Q4_0 linears, the rest as stored
    src = GGUFSource(q4_file(folder))
    released = open_sharded(read_t2i_configs(folder).files.llm_folder)
    kinds = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    assert {k: src.kind(k) for k in src.shapes} == {
        k: "Q4_0" if k[: -len(".weight")] in q4 else kinds[released.read(k, "cpu", None).dtype] for k in a}
    assert src.metadata("general.architecture") == "bitdance"


def test_4bit_draws_close_to_the_stored_weights(folder):
    """A 4-bit model is another model (16 levels per block), but a close one: most bits agree."""
    ref = load_t2i(folder).generate("a red fox", **GEN)
    got = load_t2i(folder, weights="4bit").generate("a red fox", **GEN)
    assert got.shape == ref.shape
    assert_sampled_tokens(got)
    agree = (got == ref).float().mean().item()
    print(f"\n4-bit vs stored weights: {agree:.1%} of the bits agree")
    assert agree > 0.6


def test_a_4bit_file_of_another_model_is_refused(folder, tmp_path):
    write_q4_backbone(read_t2i_configs(folder))
    # another folder with a different backbone config (one more layer's worth of width)
    other = str(tmp_path / "other")
    shutil.copytree(folder, other)
    import json

    cfg_path = os.path.join(other, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(BitDanceError, match=rf"{Q4_FILE}: made for another model: intermediate_size "
                                            rf"{cfg['intermediate_size'] // 2} \(this folder: {cfg['intermediate_size']}\)"
                                            r".*convert --model"):
        load_t2i(other, weights="4bit")
    # the same shapes, other weights: the fingerprint of the source says so
    same = str(tmp_path / "same")
    shutil.copytree(folder, same)
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(same, "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.5
    save_file(sd, os.path.join(same, "model.safetensors"))
    with pytest.raises(BitDanceError, match="made from other weights than this folder's backbone"):
        load_t2i(same, weights="4bit")
    # without the released backbone, the file alone is used (nothing to compare with)
    os.remove(os.path.join(same, "model.safetensors"))
    pipe = load_t2i(same, weights="4bit")
    assert any(isinstance(m, Q4Linear) for m in pipe.backbone.modules())


def test_a_4bit_file_with_wrong_shapes_or_types_is_refused(folder):
    configs = read_t2i_configs(folder)
    write_q4_backbone(configs)
    src = GGUFSource(q4_file(folder))
    meta = {k: src.metadata(k) for k in ("general.name", "bitdance.format", "bitdance.format_version",
                                         "bitdance.qwen3_config", "bitdance.source_fingerprint")}
    keys = list(src.shapes)
    lin = next(k for k in keys if src.kind(k) == "Q4_0")
    data = {k: (src.read_q4_0(k) if src.kind(k) == "Q4_0" else src.read(k, "cpu", None)) for k in keys}
    entries = [(k, src.shapes[k], src.kind(k)) for k in keys]
    del src
    # one linear with 32 rows fewer
    out, inp = entries[keys.index(lin)][1]
    entries[keys.index(lin)] = (lin, (out - 32, inp), "Q4_0")
    data[lin] = data[lin][:out - 32]
    write_gguf(q4_file(folder), "bitdance", meta, entries, data.__getitem__)
    with pytest.raises(BitDanceError, match=rf"{Q4_FILE}: does not match the Qwen3 backbone config: key '{lin}' has "
                                            rf"shape \[{out - 32}, {inp}\], expected \[{out}, {inp}\]"):
        load_t2i(folder, weights="4bit")
    # a linear in another quantised type (Q8_0, written with the gguf package itself)
    w = gguf.GGUFWriter(q4_file(folder), "bitdance")
    for k, v in meta.items():
        (w.add_uint64 if isinstance(v, int) else w.add_string)(k, v)
    raw = {torch.uint8: Q4_0, torch.bfloat16: gguf.GGMLQuantizationType.BF16, torch.float32: gguf.GGMLQuantizationType.F32,
           torch.float16: gguf.GGMLQuantizationType.F16}
    for k in keys:
        if k == lin:
            w.add_tensor(k, gguf.quants.quantize(torch.randn(out, inp).numpy(), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            t = data[k].contiguous()
            w.add_tensor(k, t.view(torch.uint8).numpy(), raw_dtype=raw[t.dtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BitDanceError, match=rf"tensor '{lin}' is stored as Q8_0; the 4-bit weights are GGUF Q4_0"):
        load_t2i(folder, weights="4bit")
    # not a BitDance file at all
    w = gguf.GGUFWriter(q4_file(folder), "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BitDanceError, match="not a BitDance 4-bit backbone file"):
        load_t2i(folder, weights="4bit")


def test_convert_needs_a_model_folder(tmp_path):
    r = run_cli("convert", "--model", str(tmp_path / "nothing"), "--weights", "4bit")
    assert r.returncode == 2 and "model folder not found" in r.stderr
    r = run_cli("convert", "--model", str(tmp_path), "--weights", "fp8")
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr


def test_convert_into_a_folder_writes_the_file_the_loader_reads_there(tmp_path):
    """--out an existing folder (or one ending in '/'): the file goes in it under the loader's name, and no
    .partial file is left anywhere."""
    from bitdance_core import demo_models as dm

    for out, folder in ((str(tmp_path), tmp_path), (f"{tmp_path / 'new'}{os.sep}", tmp_path / "new")):
        r = run_cli("convert", "--model", dm.T2I, "--weights", "4bit", "--out", out)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == str(folder / Q4_FILE) and f"the loader reads {q4_file(dm.T2I)}" in r.stderr
        assert GGUFSource(str(folder / Q4_FILE)).metadata("general.architecture") == "bitdance"
    assert sorted(os.listdir(tmp_path)) == [Q4_FILE, "new"] and os.listdir(tmp_path / "new") == [Q4_FILE]
    assert not os.path.exists(q4_file(dm.T2I))


# ---- 4-bit pipelines through the offload modes ------------------------------------------------------

@pytest.mark.parametrize("mode,kw", [("stage", {}), ("stream", {"resident_layers": 1}), ("stream", {"resident_layers": 2})])
def test_offload_modes_carry_4bit_weights(mode, kw):
    path = T2I_FIXTURES[0]
    ref = load_t2i(path, weights="4bit").generate("a red fox", **GEN)
    pipe = load_t2i(path, weights="4bit")
    off = apply_offload(pipe, mode, "cpu", **kw)
    assert torch.equal(pipe.generate("a red fox", **GEN), ref), (mode, kw)
    assert off.stats.bytes_moved > 0
    off.remove()


def test_q4_linear_under_torch_compile_is_the_same():
    """`--compile` (inductor) traces the per-call dequantisation into fused kernels: same values."""
    torch.manual_seed(3)
    q = Q4Linear.from_linear(nn.Linear(256, 96))
    x = torch.randn(4, 256)
    compiled = torch.compile(q)
    assert torch.equal(compiled(x), q(x))
    xb = x.to(torch.bfloat16)
    got, ref = compiled(xb).float(), q(xb).float()
    assert torch.allclose(got, ref, rtol=2 ** -7, atol=1e-2), (got - ref).abs().max()
