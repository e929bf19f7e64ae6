"""ComfyUI entry point of the BitDance node pack: registers the nodes (V3 API) and the web extension.

The engine lives in bitdance_core/ (no ComfyUI imports); the nodes in nodes/.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
