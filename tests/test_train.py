"""The demo trainers: what they optimise is what the engine samples, and what they save loads strictly.

1. The class-conditional training pass (whole sequence, block-causal mask) gives the hidden states the
   ImageNet pipeline computes block by block with its KV cache.
2. The text-to-image training pass (left-padded prompts, per-row positions) gives the hidden states of
   the T2I pipeline's prefill and block steps.
3. A few real optimisation steps of each trainer write files that load_tokenizer, load_imagenet and
   load_t2i read strictly, and that generate.
"""
import os

import torch

import bitdance_core as bd
from bitdance_core.models.imagenet import KVCache, first_step_mask
from bitdance_core.models.positions import sincos_2d_blocks
from bitdance_core.models.head import HeadConfig
from bitdance_core.pipelines.prompts import COND_TEMPLATE, UNCOND_PROMPT, load_prompt_codec
from bitdance_core.models.qwen3 import Qwen3Config
from bitdance_core.pipelines.t2i import BackboneRun
from bitdance_core.train import classcond, text2image
from bitdance_core.train.text_tokenizer import build_text_tokenizer
from bitdance_core.models.autoencoder import BinaryAutoencoder
from bitdance_core.train.diffusion import init_head, init_linear_embed
from bitdance_core.train.tokenizer import DEMO_AE, init_autoencoder, train_tokenizer


def perturbed(module):
    """Random weights away from the zero-initialised adaLN/output layers, so every path matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def test_class_training_pass_matches_cached_sampling_pass():
    torch.manual_seed(0)
    ae = init_autoencoder(BinaryAutoencoder(DEMO_AE))
    cfg = classcond.model_config(classcond.DEMO_KWARGS, ae)
    model = perturbed(classcond.new_model(cfg, ae)).eval()
    B, N, P, K = 3, cfg.grid ** 2, cfg.parallel_num, cfg.cls_token_num
    tokens = torch.sign(torch.randn(B, N, cfg.token_dim))
    y = torch.tensor([1, 7, cfg.num_classes])
    seq = torch.cat([model.cls_embedding(y).view(B, K, cfg.dim), model.query_token.expand(B, -1, -1),
                     model.proj_in(tokens[:, :-P])], dim=1)
    with torch.no_grad():
        full = classcond.backbone_forward(model, seq, classcond.block_causal_mask(cfg))[:, -N:]
        cache = KVCache(cfg, B, N + K, torch.float32, "cpu")
        x, start, mask = seq[:, :K + P - 1], 0, first_step_mask(cfg, "cpu")
        for i in range(N // P):
            if i > 0:
                x = model.proj_in(tokens[:, (i - 1) * P:i * P])
                start, mask = P * (i - 1) + K + P - 1, None
            step = model.forward_tokens(x, cache, start, mask)[:, -P:]
            torch.testing.assert_close(full[:, i * P:(i + 1) * P], step, atol=2e-5, rtol=1e-4)


def test_t2i_training_pass_matches_pipeline_prefill_and_steps(tmp_path):
    torch.manual_seed(0)
    tok = build_text_tokenizer(4)
    text2image.save_text_tokenizer(tok, str(tmp_path))
    codec = load_prompt_codec(str(tmp_path))
    llm = Qwen3Config(vocab_size=tok.get_vocab_size(), **text2image.DEMO_LLM)
    head = HeadConfig(ch_cond=llm.hidden_size, **text2image.DEMO_HEAD)
    model = text2image.T2IModel(llm, head, 32)
    # initialised as train_t2i does: until then the backbone's Embedding holds uninitialised memory
    # (torch.empty), which made this comparison NaN now and then
    init_linear_embed(model.backbone)
    init_linear_embed(model.projector)
    init_head(model.head.net)
    model = perturbed(model).eval()
    P, lat, ps = 4, 4, 2
    prefix = codec.image_prefix(lat, lat, P)
    rows = [codec.encode(COND_TEMPLATE.format(prompt="a handwritten digit seven")) + prefix,
            codec.encode(UNCOND_PROMPT) + prefix]
    tokens = torch.sign(torch.randn(2, lat * lat, 32))
    pos = sincos_2d_blocks(llm.hidden_size, lat, lat, ps)
    with torch.no_grad():
        ids, positions, mask, L = text2image.sequence_inputs(rows, lat * lat - P, P)
        img = model.projector(tokens[:, :-P]) + pos[:-P]
        full = model.backbone(torch.cat([model.backbone.embed(ids), img], 1), positions, None, 0, mask)[:, L - P:]
        run = BackboneRun(model.backbone, rows, P, lat * lat // P, "cpu")
        steps = [run.prefill()]
        for s in range(lat * lat // P - 1):
            steps.append(run.step(model.projector(tokens[:, s * P:(s + 1) * P]).float() + pos[s * P:(s + 1) * P]))
    torch.testing.assert_close(full, torch.cat(steps, dim=1), atol=2e-5, rtol=1e-4)


def test_a_few_training_steps_write_loadable_models(tmp_path):
    t2i_dir, cc_dir = str(tmp_path / "t2i"), str(tmp_path / "cc")
    ae = train_tokenizer(t2i_dir, seed=1, steps=3, batch=8).eval()
    assert bd.load_tokenizer(t2i_dir).encode(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    classcond.train_classcond(cc_dir, ae, seed=1, steps=2, batch=8, shifts=0)
    text2image.train_t2i(t2i_dir, ae, seed=1, steps=2, batch=8, shifts=0)
    pipe = bd.load_imagenet(os.path.join(cc_dir, "model.pt"))
    assert pipe.generate([0, 9], steps=2, seed=0).shape == (2, 32, 4, 4)
    pipe = bd.load_t2i(t2i_dir)
    assert pipe.generate("a handwritten digit two", 32, 32, steps=2, cfg=2.0, num_images=1, seed=0).shape == (1, 32, 4, 4)
