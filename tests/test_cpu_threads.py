"""Small models sample on fewer CPU threads (bitdance_core/cpu_threads.py), and the count is restored."""
import torch

from bitdance_core import demo_models as dm
from bitdance_core import load_imagenet, load_t2i
from bitdance_core.pipelines.cpu_threads import GRAIN_SIZE, generation_threads, threads_for


def test_the_rule():
    assert threads_for(8, 128, available=16) == 1  # the digits demo: 2 branches x 4 tokens, width 128
    assert threads_for(128, 5120, available=16) == 16  # the 14B: 2 x 64 tokens, width 5120
    assert threads_for(128, 512, available=16) == 128 * 512 // GRAIN_SIZE == 2
    assert threads_for(1, 1, available=1) == 1


def test_threads_are_restored_and_the_gpu_left_alone():
    before = torch.get_num_threads()
    with generation_threads("cpu", 8, 128):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with generation_threads("cuda", 8, 128):  # only the CPU's threads are touched (no GPU needed to check)
        assert torch.get_num_threads() == before


def test_the_demo_models_sample_on_one_thread():
    before = torch.get_num_threads()
    seen = []
    t2i = load_t2i(dm.T2I)
    t2i.generate(dm.prompt(7), 32, 32, steps=2, cfg=4.0, callback=lambda *a: seen.append(torch.get_num_threads()))
    net = load_imagenet(dm.IMAGENET)
    net.generate([7], steps=2, callback=lambda *a: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
