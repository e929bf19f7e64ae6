"""The commands a new user types, as the README and --help show them."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import numpy as np
import pytest
from PIL import Image

from paths import REPO, run_cli

from bitdance_core import demo_models as dm


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


# ---- bad options, refused before anything is read ---------------------------------------------------

NOWHERE = "no-such-model"  # nothing exists there: an error about it would mean the options were read too late


def cli_main(capsys, *argv):
    """`python -m bitdance_core ARGV` in this process: (exit status, stderr); argparse's errors exit."""
    from bitdance_core.cli.main import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _with_device(tmp_path) -> dict[str, list[str]]:
    """Each command that takes --device, with its required options (nothing it could read exists)."""
    out = str(tmp_path / "x.png")
    return {
        "t2i": ["t2i", "--model", NOWHERE, "--prompt", "p", "--out", out],
        "imagenet": ["imagenet", "--checkpoint", NOWHERE, "--classes", "3", "--out", out],
        "demo": ["demo", "--out", out],
        "tokenizer": ["tokenizer", "encode", "--model", NOWHERE, "--image-npy", NOWHERE, "--bits-npy", out],
        "eval-generate": ["eval-generate", "--model", NOWHERE, "--benchmark", "dpg", "--prompts", NOWHERE,
                          "--out", str(tmp_path / "eval")],
        "bench": ["bench", "--shape", "tiny"],
        "bench-sweep": ["bench-sweep", "--shape", "tiny", "--variants", "as-is"],
        "bench-gemm": ["bench-gemm", "--shape", "tiny"],
    }


@pytest.mark.parametrize("device,why", [
    ("gpu", "gpu: not a device; use cpu or cuda (cuda:N)"),
    ("CPU", "CPU: not a device; use cpu or cuda (cuda:N)"),
    ("cpu:0", "cpu:0: use cpu (the engine names the CPU without an index) or cuda (cuda:N)"),
    ("mps", "mps: a torch device (mps) the engine does not run on; use cpu or cuda (cuda:N)"),
    ("xpu", "xpu: a torch device (xpu) the engine does not run on; use cpu or cuda (cuda:N)"),
])
def test_a_mistyped_device_is_refused_before_anything_is_read(device, why, tmp_path, capsys):
    for name, argv in _with_device(tmp_path).items():
        rc, err = cli_main(capsys, *argv, "--device", device)
        assert rc == 2 and f"argument --device: {why}" in err, (name, err[-1500:])
    assert not os.listdir(tmp_path)


def test_a_gpu_that_is_not_there_is_named():
    """cuda:N passes the option's check; then the machine says whether it has that GPU."""
    import argparse

    import torch

    from bitdance_core.cli.common import device_dtype
    from bitdance_core.errors import BitDanceError

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = "no CUDA GPU is available; use --device cpu" if n == 0 else f"this machine has {n} CUDA GPU"
    with pytest.raises(BitDanceError, match=re.escape(why)):
        device_dtype(argparse.Namespace(device=f"cuda:{n}", dtype="auto"))


@pytest.mark.parametrize("argv,why", [
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--steps", "0"],
     "argument --steps: must be a whole number >= 1, got 0"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--cfg", "-1"],
     "argument --cfg: must be a number >= 0, got -1"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--cfg", "nan"],
     "argument --cfg: must be a number >= 0, got nan"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--num-images", "0"],
     "argument --num-images: must be a whole number >= 1, got 0"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--width", "0"],
     "argument --width: must be a whole number >= 1, got 0"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", "--seed", str(2 ** 64)],
     f"argument --seed: {2 ** 64} is out of range: a seed is a whole number from -2**63 to 2**64-1"),
    (["t2i", "--model", NOWHERE, "--prompt", "p", "--tokens-npy", "t.npy", f"--seed={-2 ** 63 - 1}"],
     f"argument --seed: {-2 ** 63 - 1} is out of range"),
    (["imagenet", "--checkpoint", NOWHERE, "--classes", "3", "--tokens-npy", "t.npy", "--seed", str(2 ** 64)],
     "argument --seed: 18446744073709551616 is out of range"),
    (["imagenet", "--checkpoint", NOWHERE, "--classes", "3", "--tokens-npy", "t.npy", "--steps", "0"],
     "argument --steps: must be a whole number >= 1, got 0"),
    (["imagenet", "--checkpoint", NOWHERE, "--classes", "3", "--tokens-npy", "t.npy", "--decode-tile", "-8"],
     "argument --decode-tile: must be a number of pixels >= 1, or 0 for a whole (untiled) decode; got -8"),
    (["demo", "--pixels-npy", "p.npy", "--steps", "0"], "argument --steps: must be a whole number >= 1, got 0"),
    (["demo", "--pixels-npy", "p.npy", "--per-class", "0"], "argument --per-class: must be a whole number >= 1, got 0"),
    (["demo", "--pixels-npy", "p.npy", "--seed", str(2 ** 64)], "argument --seed: 18446744073709551616 is out of range"),
    (["tokenizer", "decode", "--model", NOWHERE, "--bits-npy", "b.npy", "--pixels-npy", "p.npy", "--seed", str(2 ** 64)],
     "argument --seed: 18446744073709551616 is out of range"),
    (["tokenizer", "decode", "--model", NOWHERE, "--bits-npy", "b.npy", "--pixels-npy", "p.npy", "--tile", "-1"],
     "argument --tile: must be a number of pixels >= 1, or 0 for a whole (untiled) decode; got -1"),
    (["tokenizer", "decode", "--model", NOWHERE, "--bits-npy", "b.npy", "--pixels-npy", "p.npy", "--chunk", "-2"],
     "argument --chunk: must be a number of images >= 1, or 0 for all at once; got -2"),
    (["bench", "--shape", "tiny", "--threads", "-1"], "argument --threads: must be a whole number >= 1, got -1"),
    (["bench", "--shape", "tiny", "--height", "0"], "argument --height: must be a whole number >= 1, got 0"),
    (["bench-sweep", "--shape", "tiny", "--variants", "as-is", "--threads", "0"],
     "argument --threads: must be a whole number >= 1, got 0"),
    (["bench-gemm", "--shape", "tiny", "--threads", "0"], "argument --threads: must be a whole number >= 1, got 0"),
])
def test_numbers_out_of_range_are_refused_before_anything_is_read(argv, why, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the relative output paths would go
    rc, err = cli_main(capsys, *argv, "--device", "cpu")
    assert rc == 2 and why in err, err[-1500:]
    assert not os.listdir(tmp_path)


def test_seeds_at_the_ends_of_the_range_generate(tmp_path):
    """The seed range the option takes is the one torch's generators take: both ends run."""
    for seed in (2 ** 64 - 1, -2 ** 63):
        out = tmp_path / f"{seed}.npy"
        r = run_cli("t2i", "--model", dm.T2I, "--prompt", "a handwritten digit seven", "--height", "32", "--width", "32",
                    "--steps", "1", "--device", "cpu", f"--seed={seed}", "--tokens-npy", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert np.load(out).shape == (1, 32, 4, 4)  # the demo: a 4x4 grid of 32-bit tokens


@pytest.mark.parametrize("command", ["t2i", "imagenet", "demo"])
def test_where_images_go_is_checked_before_anything_is_read(command, tmp_path, capsys):
    argv = {"t2i": ["t2i", "--model", NOWHERE, "--prompt", "p"],
            "imagenet": ["imagenet", "--checkpoint", NOWHERE, "--classes", "3"],
            "demo": ["demo"]}[command]
    (tmp_path / "folder").mkdir()
    for out, why in ((tmp_path / "x.xyz", "x.xyz: '.xyz' is not an image extension PIL writes; use .png"),
                     (tmp_path / "x.xbm", "x.xbm: PIL cannot write RGB images as XBM"),
                     (tmp_path / "folder", "folder is a folder; give an image file name, e.g. "),
                     (f"{tmp_path / 'new'}{os.sep}", "new/ is a folder; give an image file name")):
        rc, err = cli_main(capsys, *argv, "--device", "cpu", "--out", str(out))
        assert rc == 2 and f"argument --out: {tmp_path}" in err and why in err, err[-1500:]
    rc, err = cli_main(capsys, *argv, "--device", "cpu")  # nothing to write: no work to lose either
    want = "--out FILE.png or --pixels-npy" if command == "demo" else "--out FILE.png, --pixels-npy or --tokens-npy"
    assert rc == 2 and f"error: nothing would be kept: give {want}" in err, err[-1500:]
    assert os.listdir(tmp_path) == ["folder"]


def test_an_out_without_extension_is_a_png(tmp_path):
    """As for the numbered files of several images (OUT_0.png, ...), one image asked for as OUT is OUT.png."""
    r = run_cli("t2i", "--model", dm.T2I, "--prompt", "a handwritten digit seven", "--height", "32", "--width", "32",
                "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "seven"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp_path / "seven.png")
    with Image.open(tmp_path / "seven.png") as im:
        assert im.format == "PNG" and im.size == (32, 32)
    r = run_cli("demo", "--per-class", "1", "--steps", "1", "--out", str(tmp_path / "new" / "digits"))
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(tmp_path / "new" / "digits.png") as im:  # the grid: a row per digit
        assert im.format == "PNG" and im.size == (32, 320)


def test_a_file_given_as_a_model_folder_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where the relative output paths would go
    config = os.path.join(dm.T2I, "config.json")
    for argv in (["t2i", "--prompt", "p", "--tokens-npy", "t.npy"],
                 ["eval-generate", "--benchmark", "dpg", "--prompts", "p.json", "--out", "o"],
                 ["convert", "--weights", "4bit"]):
        rc, err = cli_main(capsys, *argv, "--model", dm.IMAGENET)
        assert rc == 2 and f"argument --model: {dm.IMAGENET} is a file, not a model folder; for a class-conditional " \
                            f"ImageNet checkpoint use `python -m bitdance_core imagenet --checkpoint {dm.IMAGENET}`" in err, err
        rc, err = cli_main(capsys, *argv, "--model", config)
        assert rc == 2 and f"{config} is a file, not a model folder; give the folder that holds it: {dm.T2I}" in err, err
    assert not os.listdir(tmp_path)


def test_imagenet_decode_tile_0_is_no_tiling_and_its_errors_name_its_options(tmp_path):
    """--decode-tile 0 is "off", as the ComfyUI Decode node's tile 0; an init with nothing to regenerate
    is told the options imagenet has (no --height/--width)."""
    base = ["imagenet", "--checkpoint", dm.IMAGENET, "--classes", "3", "--steps", "2", "--device", "cpu"]
    r = run_cli(*base, "--pixels-npy", str(tmp_path / "whole.npy"), "--tokens-npy", str(tmp_path / "bits.npy"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*base, "--decode-tile", "0", "--pixels-npy", str(tmp_path / "tile0.npy"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "tile0.npy"), np.load(tmp_path / "whole.npy"))
    r = run_cli(*base, "--init-tokens-npy", str(tmp_path / "bits.npy"), "--tokens-npy", str(tmp_path / "again.npy"))
    assert r.returncode == 2 and "nothing to regenerate: give --keep-rows or --keep-mask-npy (the blocks to keep), or " \
                                 "an init smaller than the model's 32x32 px to outpaint the rest" in r.stderr, r.stderr
    assert "--height" not in r.stderr and not (tmp_path / "again.npy").exists()
