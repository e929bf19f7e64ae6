"""Start ComfyUI's main.py with a CPU torch 2.13 and PyPI's torchvision 0.28 wheel.

PyPI's torchvision wheel is a CUDA build; beside the CPU build of torch its C++ operators fail to
register and ``import torchvision`` dies with ``operator torchvision::nms does not exist`` (its
Python side registers fake kernels for ops whose schemas the C++ library would have defined).
Defining the two schemas it needs before the first import is enough for ComfyUI, which never
calls them. A torch and torchvision of the same build (both CUDA, as PyPI gives them together)
load their operators themselves: there the schemas are left alone, since torchvision's C++ library
aborts the process when it finds them already defined.
Usage: ``python tests/comfy_launcher.py <comfyui dir> [main.py args...]``.
"""

import os
import runpy
import sys


def _torchvision_needs_schemas() -> bool:
    """A CPU build of torch beside a torchvision that is not one (PyPI's default wheel is CUDA's)."""
    import importlib.metadata as md

    import torch

    try:
        tv = md.version("torchvision")
    except md.PackageNotFoundError:
        return False
    return torch.version.cuda is None and "+cpu" not in tv


def _define_torchvision_schemas() -> None:
    import torch

    if not _torchvision_needs_schemas():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (a torchvision whose C++ ops did load)
            pass
    # keep the library object alive for the life of the process
    sys.modules[__name__].__dict__["_torchvision_fragment"] = lib


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: comfy_launcher.py COMFYUI_DIR [main.py args...]")
    comfy_dir = os.path.abspath(sys.argv[1])
    main_py = os.path.join(comfy_dir, "main.py")
    if not os.path.isfile(main_py):
        raise SystemExit(f"no ComfyUI main.py in {comfy_dir}: run scripts/setup_comfyui.sh first")
    _define_torchvision_schemas()
    sys.argv = [main_py] + sys.argv[2:]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
