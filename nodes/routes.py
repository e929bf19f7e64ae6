"""HTTP routes for the web extension (web/bitdance.js)."""
from __future__ import annotations

from aiohttp import web

from . import paths
from .engine import bd, describe_t2i


def register(server) -> None:
    routes = server.routes

    @routes.get("/bitdance/model_info")
    async def model_info(request: web.Request) -> web.Response:
        """Block geometry of a text-to-image model, read from its config files (no weights)."""
        name = request.query.get("model", "")
        try:
            info = describe_t2i(paths.resolve(name, "model"))
        except bd.BitDanceError as e:
            return web.json_response({"model": name, "available": False, "error": str(e)})
        return web.json_response({"model": name, "available": True, **info})
