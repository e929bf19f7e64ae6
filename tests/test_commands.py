"""The commands a new user types, as the README and --help show them."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

from PIL import Image

from paths import REPO, run_cli


def test_t2i_help_shows_the_defaults():
    r = run_cli("t2i", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for option, default in (("--height", "1024"), ("--width", "1024"), ("--steps", "50"), ("--cfg", "7.5"),
                            ("--num-images", "1"), ("--seed", "0")):
        assert re.search(rf"{option} \S+ .*?\(default: {re.escape(default)}\)", text), (option, text)


def test_the_readme_demo_command_runs_as_written():
    """The README's first engine command, exactly as printed, run from the pack's folder."""
    with open(os.path.join(REPO, "README.md")) as f:
        (line,) = [ln for ln in f if ln.startswith(".venv/bin/python -m bitdance_core t2i --model bitdance_core/")]
    out = os.path.join(REPO, re.search(r"--out (\S+)", line).group(1))
    if os.path.exists(out):
        os.remove(out)
    r = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == os.path.relpath(out, REPO)
    with Image.open(out) as im:
        assert im.size == (32, 32)


def _fake_checkout(tmp_path):
    """scripts/test.sh in a copy of the repo layout whose setup scripts and python only say they ran."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "test.sh"), tmp_path / "scripts" / "test.sh")
    for name in ("setup_engine.sh", "setup_comfyui.sh"):
        (tmp_path / "scripts" / name).write_text(f"echo 'ran {name}'\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    py = tmp_path / ".venv" / "bin" / "python"
    py.write_text("#!/bin/sh\necho 'ran pytest'\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return tmp_path / "scripts" / "test.sh"


def test_test_sh_says_first_that_it_will_install_chromium_with_apt(tmp_path):
    script = _fake_checkout(tmp_path)
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, CHROMIUM=str(tmp_path / "no-chromium"), SKIP_BROWSER="0"))
    lines = missing.stdout.splitlines()
    assert missing.returncode == 0 and lines[-1] == "ran pytest", missing.stdout + missing.stderr
    assert "apt-get" in lines[0] and "chromium" in lines[0] and "SKIP_BROWSER=1" in lines[0], lines
    assert lines.index("ran setup_engine.sh") > 0 and lines.index("ran setup_comfyui.sh") > 0
    present = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, CHROMIUM="/bin/sh", SKIP_BROWSER="0"))
    assert "apt-get" not in present.stdout and present.stdout.splitlines()[0] == "ran setup_engine.sh", present.stdout


def _command_options() -> dict[str, set[str]]:
    """Each command of `python -m bitdance_core` -> its options."""
    import argparse

    from bitdance_core.cli.main import build_parser

    out = {}

    def walk(parser, name):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name:
            out[name] = {o for a in parser._actions for o in a.option_strings}
        for action in subs:
            for child, p in action.choices.items():
                walk(p, f"{name} {child}".strip())

    walk(build_parser(), "")
    return out


def _doc_commands(text: str):
    """(command words, the rest) for each engine command a document shows: in code blocks (with
    backslash continuations joined) and in inline code spans that start with a command name."""
    text = re.sub(r"\\\n\s*", " ", text)
    pieces = []
    for i, block in enumerate(text.split("```")):
        if i % 2:  # inside a fenced block: each line, its comment cut off
            pieces += [line.split(" #")[0] for line in block.splitlines()]
        else:
            pieces += re.findall(r"`([^`\n]+)`", block)
    for piece in pieces:
        for part in re.split(r"\||&&|;", piece):
            m = re.search(r"(?:^|bitdance_core\s+)([a-z][a-z0-9-]*)((?:\s.*)?)$", part.strip())
            if m:
                yield m.group(1), m.group(2)


def test_every_option_the_docs_show_exists():
    """README, ARCHITECTURE and docs/ name engine options (`t2i --weights 4bit`, `bench --memory-cap-gb N`,
    whole commands): each must be an option of that command's parser, so a renamed or removed option
    cannot stay documented."""
    import glob

    options = _command_options()
    assert {"t2i", "bench", "tokenizer", "convert"} <= set(options)
    seen, wrong = 0, []
    for path in [os.path.join(REPO, "README.md"), os.path.join(REPO, "ARCHITECTURE.md"),
                 *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read()
        for command, rest in _doc_commands(text):
            if command not in options:
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                seen += 1
                if flag not in options[command]:
                    wrong.append(f"{os.path.relpath(path, REPO)}: {command} {flag}")
    assert not wrong, "documented options that the commands do not have:\n" + "\n".join(wrong)
    assert seen > 50, seen  # the docs do show options: the search found them


def test_pyproject_declares_what_requirements_txt_installs():
    """ComfyUI-Manager installs requirements.txt; the registry (comfy-cli) reads pyproject.toml's
    dependencies. A user must get the same packages both ways (gguf for 4-bit weights, say)."""
    import tomllib

    def names(specs):
        return {re.split(r"[<>=!~ \[;]", s.strip(), maxsplit=1)[0].lower().replace("_", "-"): s.strip()
                for s in specs if s.strip() and not s.strip().startswith("#")}

    with open(os.path.join(REPO, "requirements.txt")) as f:
        required = names(f.read().splitlines())
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        declared = names(tomllib.load(f)["project"]["dependencies"])
    assert "gguf" in required and "safetensors" in required, required
    assert declared == required, (f"pyproject.toml's dependencies {sorted(declared.values())} differ from "
                                  f"requirements.txt {sorted(required.values())}")


def test_dtype_auto_is_the_default_and_float32_on_the_cpu():
    """--dtype auto (the default of the generating commands): bfloat16 on a GPU that has it, the
    official dtype, and float32 on the CPU (where the fixtures are reproduced bit for bit); an explicit
    dtype is taken as given, float16 refused on the CPU with the alternatives."""
    import argparse

    import pytest
    import torch

    from bitdance_core.cli.main import build_parser
    from bitdance_core.cli.common import device_dtype
    from bitdance_core.errors import BitDanceError

    parser = build_parser()
    for cmd in (["t2i", "--model", "m", "--prompt", "p"], ["eval-generate", "--model", "m", "--benchmark", "dpg",
                                                           "--prompts", "p.json", "--out", "o"]):
        assert parser.parse_args(cmd).dtype == "auto", cmd
    assert device_dtype(argparse.Namespace(device="cpu", dtype="auto")) == ("cpu", torch.float32)
    assert device_dtype(argparse.Namespace(device="cpu", dtype="bfloat16")) == ("cpu", torch.bfloat16)
    with pytest.raises(BitDanceError, match="float16 is not supported on the CPU; use float32 or bfloat16"):
        device_dtype(argparse.Namespace(device="cpu", dtype="float16"))
