"""Models built at the released shapes on the meta device accept the official key lists exactly."""
import pytest
import torch

from bitdance_core.models.ae_layers import AutoencoderConfig
from bitdance_core.formats.checkpoints import expected_shapes
from bitdance_core.models.head import HeadConfig
from bitdance_core.models.qwen3 import Qwen3Config
from bitdance_core.pipelines.t2i_loading import build_t2i_modules
from paths import official_keys

KEYS = official_keys()
AE = AutoencoderConfig(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32)


@pytest.mark.parametrize("variant,vocab,llm_section", [(64, 151988, "qwen3_llm_64x"), (16, 151940, "qwen3_llm_16x")])
def test_t2i_14b_keys_and_shapes(variant, vocab, llm_section):
    llm = Qwen3Config(vocab_size=vocab)
    head = HeadConfig(ch_target=32, ch_cond=5120, ch_latent=5120, depth_latent=6, depth_adanln=2, use_swiglu=True,
                      parallel_num=variant)
    backbone, dh, proj, ae = build_t2i_modules(llm, head, AE)
    assert all(p.device.type == "meta" for m in (backbone, dh, proj, ae) for p in m.parameters())  # no memory
    ours = expected_shapes(backbone)
    want = {k: v for k, v in KEYS[llm_section].items() if k != "lm_head.weight"}
    assert ours == want
    assert "lm_head.weight" in KEYS[llm_section]  # present in the files, accepted and never loaded
    assert expected_shapes(dh) == KEYS[f"vision_head_{variant}x"]
    assert expected_shapes(proj) == KEYS["projector"]
    assert expected_shapes(ae) == KEYS["t2i_ae"]
    assert sum(p.numel() for p in backbone.parameters()) + vocab * 5120 == \
        sum(torch.Size(s).numel() for s in KEYS[llm_section].values())


@pytest.mark.parametrize("name,z", [("ae_d32c128", 128), ("ae_d32c256", 256)])
def test_gan_tokenizer_keys(name, z):
    from bitdance_core.models.autoencoder import build_autoencoder

    cfg = AutoencoderConfig(ch=128, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=4, z_channels=z, gan_decoder=True)
    assert expected_shapes(build_autoencoder(cfg)) == KEYS[name]
