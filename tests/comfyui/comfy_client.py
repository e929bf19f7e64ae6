"""A small HTTP + websocket client for a ComfyUI server under test (stdlib + aiohttp)."""
from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import psutil


class ComfyClient:
    def __init__(self, url: str, proc, base: str, log_path: str):
        self.url = url
        self.proc = proc
        self.base = base
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        self.startup_s = None

    # --- plain HTTP -------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30):
        from run_workflow import request  # scripts/ (on sys.path via conftest): the demo command's client

        return request(self.url + path, method, body, timeout)

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {body!r}"[:2000]
        return body

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def ready(self, node: str) -> bool:
        try:
            status, body = self.request("GET", f"/object_info/{node}", timeout=2)
        except OSError:
            return False
        return status == 200 and isinstance(body, dict) and node in body

    # --- prompts ----------------------------------------------------------------------------
    def post_prompt(self, prompt: dict):
        """(status, body) of POST /prompt."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def queue_prompt(self, prompt: dict) -> str:
        status, body = self.post_prompt(prompt)
        assert status == 200, f"/prompt refused it ({status}): {json.dumps(body)[:3000]}"
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The prompt's history entry as it is now: None until ComfyUI has written it (which can be
        after the websocket said the prompt ended); use wait() for a finished prompt."""
        body = self.get(f"/history/{prompt_id}")
        return body.get(prompt_id)

    @staticmethod
    def finished(entry: dict | None) -> bool:
        status = (entry or {}).get("status") or {}
        return status.get("completed") is not None and status.get("status_str") in ("success", "error")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry once the prompt has finished (successfully or not): /history/<id> is
        polled until it holds the finished entry, at most `timeout` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)
            if self.finished(entry):
                return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI died (exit {self.proc.returncode})")
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s; queue: {self.get('/queue')}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        entry = self.wait(self.queue_prompt(prompt), timeout)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
        return entry

    def images(self, entry: dict):
        """PIL images of every image output in a history entry, as {node_id: [image, ...]}."""
        from PIL import Image

        out = {}
        for node_id, node_out in entry.get("outputs", {}).items():
            for im in node_out.get("images", []):
                q = urllib.parse.urlencode({"filename": im["filename"], "subfolder": im.get("subfolder", ""),
                                            "type": im.get("type", "output")})
                img = Image.open(io.BytesIO(self.get_bytes(f"/view?{q}")))
                img.load()
                out.setdefault(node_id, []).append(img)
        return out

    @staticmethod
    def messages(entry: dict, kind: str):
        return [m[1] for m in entry["status"].get("messages", []) if m[0] == kind]

    def interrupt(self):
        status, _ = self.request("POST", "/interrupt", {})
        assert status == 200

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    # --- websocket --------------------------------------------------------------------------
    def run_watching(self, prompt: dict, timeout: float = 300, on_message=None):
        """Queue `prompt` and collect the websocket messages for it until it ends, then wait for its
        history entry (ComfyUI may send the end message before it writes the history).

        Returns (history entry, json messages [(type, data)], binary message count).
        `on_message(type, data)` is called for each JSON message (used to interrupt mid-run)."""
        t0 = time.time()
        prompt_id, msgs, binary = asyncio.run(self._run_watching(prompt, timeout, on_message))
        entry = self.wait(prompt_id, max(1.0, timeout - (time.time() - t0)))
        return entry, msgs, binary

    async def _run_watching(self, prompt, timeout, on_message):
        import aiohttp

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        msgs, binary = [], 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url) as ws:
                prompt_id = await asyncio.to_thread(self.queue_prompt, prompt)
                deadline = time.time() + timeout
                while time.time() < deadline:
                    try:
                        m = await ws.receive(timeout=max(0.1, deadline - time.time()))
                    except asyncio.TimeoutError:
                        break
                    if m.type == aiohttp.WSMsgType.BINARY:
                        binary += 1
                        continue
                    if m.type != aiohttp.WSMsgType.TEXT:
                        break
                    d = json.loads(m.data)
                    t, data = d.get("type"), d.get("data", {})
                    if isinstance(data, dict) and data.get("prompt_id") not in (None, prompt_id):
                        continue
                    msgs.append((t, data))
                    if on_message is not None:
                        await asyncio.to_thread(on_message, t, data)
                    if t in ("execution_success", "execution_error", "execution_interrupted"):
                        break
        return prompt_id, msgs, binary
