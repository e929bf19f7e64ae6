"""Memory and speed around a loaded pipeline: the memory planner and what fits (planner.py, fitting.py),
offload (stage, stream) with page-locked host copies (offload.py, host_memory.py), CUDA graphs and
torch.compile (graphs.py), the speed levers measured one at a time (levers.py). Imports pipelines and below.

What the ComfyUI nodes and the command line use is re-exported here.
"""
from .fitting import (OFFLOAD_CHOICES, WEIGHTS_CHOICES, GenerationCheck, LoadDecision, check_generation,
                      images_per_decode, load_planned, plan_for)
from .graphs import enable_compile, enable_graphs
from .host_memory import held_host_storages
from .levers import Levers, apply_levers

__all__ = ["GenerationCheck", "LoadDecision", "Levers", "OFFLOAD_CHOICES", "WEIGHTS_CHOICES", "apply_levers",
           "check_generation", "enable_compile", "enable_graphs", "held_host_storages", "images_per_decode",
           "load_planned", "plan_for"]
