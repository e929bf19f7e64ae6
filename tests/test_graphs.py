"""CUDA-graph helpers on the CPU: the static backbone step (the form a graph captures) against the
engine's step, and the switches being no-ops where there is no GPU. The captures themselves need CUDA."""
import warnings

import torch

from bitdance_core.runtime.graphs import GraphedBackbone, GraphedModule, enable_compile, enable_graphs, graphed_sampler
from bitdance_core.models.sampler import SAMPLERS
from bitdance_core.cli.synthetic import build_random_t2i, custom_shape

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not one of the official BitDance sizes.*")
PROMPT = "a red fox in the snow"


def test_static_step_matches_the_engine_step():
    shape = custom_shape("tiny", layers=2, hidden=64, heads=4, kv_heads=2)
    ref = build_random_t2i(shape, seed=4)
    outs = {}

    def record(name):
        def hook(_m, args, out):
            if len(args) > 3 and args[3] > 0:
                outs.setdefault(name, []).append(out.clone())
        return hook
    h = ref.backbone.register_forward_hook(record("eager"))
    # a negative prompt of another length: the two guidance rows are left-padded differently
    bits_ref = ref.generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=2, negative_prompt="snow")
    h.remove()
    acc = enable_graphs(ref, static_step_on_cpu=True)
    assert isinstance(ref.backbone, GraphedBackbone)
    h = ref.backbone.register_forward_hook(record("static"))
    bits = ref.generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=2, negative_prompt="snow")
    h.remove()
    acc.remove()
    assert not isinstance(ref.backbone, GraphedBackbone)
    assert len(outs["eager"]) == len(outs["static"]) == 3
    for a, b in zip(outs["eager"], outs["static"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert (bits != bits_ref).float().mean() < 0.01


def test_switches_are_noops_on_the_cpu():
    pipe = build_random_t2i("tiny", seed=1)
    net, bb = pipe.head.net, pipe.backbone
    acc = enable_graphs(pipe)
    assert pipe.head.net is net and pipe.backbone is bb and not acc.sampler_patched
    assert enable_compile(pipe) is False
    wrapped = GraphedModule(net)
    x, t, c = torch.randn(2, 16, 32), torch.full((2,), 0.2), torch.randn(2, 16, 64)
    assert torch.equal(wrapped(x, t, c), net(x, t, c)) and wrapped.stats.eager_calls == 1
    sampler = graphed_sampler(SAMPLERS["euler_maruyama"])  # unregistered nets run the sampler as it is
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    cond = torch.randn(2, 16, 64)
    assert torch.equal(sampler(net, cond, 4.0, 2, g1), SAMPLERS["euler_maruyama"](net, cond, 4.0, 2, g2))


def test_predrawn_noise_is_the_samplers_own_draws():
    """The loop graph's noise is drawn before the loop (predraw_noise): the same numbers, so the
    same bits, as the sampler drawing them itself, for both samplers, with and without guidance."""
    from bitdance_core.models.sampler import noise_draws, predraw_noise

    net = build_random_t2i("tiny", seed=3).head.net
    for name, kw in (("euler_maruyama", {"time_shift": 1.0}), ("euler", {})):
        for cfg, rows in ((4.0, 4), (1.0, 2)):
            cond = torch.randn(rows, 16, 64, generator=torch.Generator().manual_seed(1))
            own = SAMPLERS[name](net, cond, cfg, 3, torch.Generator().manual_seed(7), **kw)
            noise = predraw_noise(name, cond, cfg, 3, torch.Generator().manual_seed(7))
            assert noise.shape == (noise_draws(name, 3), 2, 16, 32)
            given = SAMPLERS[name](net, cond, cfg, 3, None, noise=noise, **kw)
            assert torch.equal(own, given), (name, cfg)
    # what a generator-drawn run continues with is the same after either
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    SAMPLERS["euler_maruyama"](net, cond, 4.0, 2, g1)
    predraw_noise("euler_maruyama", cond, 4.0, 2, g2)
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))


def test_streamed_backbone_keeps_its_layer_hooks():
    """Streaming offload brings each streamed layer in from the layer's own pre-hook; the static
    step bypasses layer calls, so a backbone with such hooks must stay on the eager step."""
    from bitdance_core.runtime.offload import apply_offload

    shape = custom_shape("tiny", layers=3, hidden=64, heads=4, kv_heads=2)
    ref = build_random_t2i(shape, seed=4).generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=2)
    pipe = build_random_t2i(shape, seed=4)
    off = apply_offload(pipe, "stream", "cpu", resident_layers=1)
    calls = []
    pipe.backbone.model.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    acc = enable_graphs(pipe, static_step_on_cpu=True)
    loads = off.stream.stats.streamed_loads
    bits = pipe.generate(PROMPT, 128, 128, steps=1, cfg=4.0, seed=2)
    assert torch.equal(bits, ref)
    assert len(calls) == 4  # prefill + 3 block steps (128² at 16 per block: 4 blocks, no pass after the last)
    assert off.stream.stats.streamed_loads > loads and acc.stats.eager_calls == 4
    acc.remove()
    off.remove()


def test_weights_that_keep_moving_give_up_the_graph():
    from bitdance_core.runtime.graphs import GraphStats, _replayed, _weights_moved_again

    st = GraphStats()
    assert not _weights_moved_again(st, "k", had_capture=False)  # a first capture
    assert not _weights_moved_again(st, "k", had_capture=True)  # moved once (loaded again elsewhere): recapture
    _replayed(st, "k", unchanged=False)  # the replay right after that recapture
    _replayed(st, "k", unchanged=True)  # and one with the weights where they were: moves are rare
    assert st.recaptures == {} and st.replays == 2
    assert not _weights_moved_again(st, "k", had_capture=True)  # moved once more, much later: one recapture
    _replayed(st, "k", unchanged=False)
    assert "k" not in st.failures
    assert _weights_moved_again(st, "k", had_capture=True)  # moved again at once: eager from now on
    assert "offload" in st.failures["k"] and st.recaptures == {"k": 2}
