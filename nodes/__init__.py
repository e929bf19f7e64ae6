"""The BitDance nodes (V3 schema API, comfy_api.latest), registered through comfy_entrypoint."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths
from .continuation import NODES as CONTINUATION_NODES
from .imagenet import NODES as IMAGENET_NODES
from .split_loader import NODES as SPLIT_NODES
from .t2i import NODES as T2I_NODES
from .tokenizer import NODES as TOKENIZER_NODES

NODES: list[type[io.ComfyNode]] = [*T2I_NODES, *SPLIT_NODES, *TOKENIZER_NODES, *CONTINUATION_NODES, *IMAGENET_NODES]

paths.register()


def _register_routes() -> None:
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (e.g. a script): no routes needed
        return
    if getattr(PromptServer, "instance", None) is not None:
        from .routes import register

        register(PromptServer.instance)


_register_routes()


class BitDanceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> ComfyExtension:
    return BitDanceExtension()
