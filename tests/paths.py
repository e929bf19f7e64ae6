"""Where the shared fixtures and docs live (beside the checkout, as in CI)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BITDANCE_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
FIXTURES = os.path.join(SHARED, "fixtures")
DOCS = os.path.join(SHARED, "docs")


def fixture_dirs(prefix: str) -> list[str]:
    """Every fixture of one kind (the public ones and any others of the same kind placed beside them)."""
    if not os.path.isdir(FIXTURES):
        return []
    return sorted(os.path.join(FIXTURES, d) for d in os.listdir(FIXTURES) if d.startswith(prefix))


def official_keys() -> dict[str, dict[str, tuple]]:
    """official-state-dict-keys.txt -> {section name: {key: shape}}."""
    out, cur = {}, None
    with open(os.path.join(DOCS, "official-state-dict-keys.txt")) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("#####"):
                cur = out.setdefault(line.split()[1], {})
            elif line.strip() and cur is not None:
                key, shape = line.split("\t")
                out_shape = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
                cur[key] = out_shape
    return out


def run_cli(*args, timeout: int = 900):
    """`python -m bitdance_core ARGS` from the repo, one thread (as the fixtures were made)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bitdance_core", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def fixture_tokens_raster(case_dir: str):
    """A text-to-image fixture case's tokens.npy ([B, h*w, C] in generation order '(h w p1 p2)') as
    [B, C, h, w], what the CLI's --tokens-npy and a SaveLatent of the sampler hold (written
    independently of the engine)."""
    import json

    import numpy as np

    with open(os.path.join(case_dir, "params.json")) as f:
        p = json.load(f)
    (h, w), ps = p["latent_grid_hw"], p["patch_side_ps"]
    tokens = np.load(os.path.join(case_dir, "tokens.npy"))
    b, n, c = tokens.shape
    return tokens.reshape(b, h // ps, w // ps, ps, ps, c).transpose(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def assert_pixels_within_one_level(pixels, ref, what: str, max_fraction: float = 0.001):
    """Pixels from the same tokens on another CPU: float32 decoding rounds differently on AVX2 and
    AVX512 (and between thread counts), so a few uint8 values may be one level off; never more."""
    import numpy as np

    assert pixels.shape == ref.shape and pixels.dtype == ref.dtype, (what, pixels.shape, ref.shape)
    diff = np.abs(pixels.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= max_fraction, \
        f"{what}: max difference {diff.max()}, {int((diff > 0).sum())} of {diff.size} values off"


def compare_with_official(tokens_npy, ref_tokens, pixels_npy, ref_pixels_npy):
    """Asserts the CLI's tokens equal the official ones bit for bit and its pixels have the official
    dtype and shape; returns |pixels - official pixels| (each caller bounds it)."""
    import numpy as np

    tokens = np.load(tokens_npy)
    assert tokens.dtype == np.float32 and tokens.shape == ref_tokens.shape
    mismatched = int((tokens != ref_tokens).sum())
    assert mismatched == 0, f"{mismatched} of {tokens.size} bits differ from the official tokens"
    pixels, ref_pixels = np.load(pixels_npy), np.load(ref_pixels_npy)
    assert pixels.dtype == np.uint8 and pixels.shape == ref_pixels.shape
    return np.abs(pixels.astype(int) - ref_pixels.astype(int))


def run_pytest(*args, env: dict, timeout: int):
    """`pytest -q ARGS` in a new process from the repo, for tests that run others under settings fixed
    when a process starts (CPU instruction set, CUDA allocator). Returns (the completed process, how
    many tests passed: 0 unless its summary line reports passes and no failure or error)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    clean = " passed" in summary and "failed" not in summary and "error" not in summary
    return r, int(summary.split(" passed")[0].split()[-1]) if clean else 0


def cpu_fp8_path(mode: str) -> str:
    """The path an fp8 linear asked for a scaled-mm `mode` takes on this PyTorch's CPU (Fp8Linear.last_path):
    the mode itself where torch._scaled_mm takes row-wise scales on the CPU (torch 2.13), else the stated
    fallback (torch 2.11, the GPU machine's version)."""
    from bitdance_core.formats import fp8_matmul

    return mode if fp8_matmul.cpu_scaled_mm_takes_row_scales() else f"dequant ({fp8_matmul.NO_CPU_ROW_SCALES})"


def assert_sampled_tokens(bits, shape=None, max_zero: float = 1e-3) -> None:
    """Tokens a sampler made: torch.sign of the head's output, as the official pipeline takes it, so ±1,
    and 0 where that output is exactly 0 (torch.sign(0) = 0). That is rare, and how rare depends on the
    CPU's kernels, so a test may not count on none: about once in 10^5 values with fp8 weights on an
    AVX2 CPU (the last Euler step adds -x back to x), more in bfloat16 (max_zero 0.05 there: the head's
    output rounded to 0 in both guidance branches). Every value one of the three, almost all ±1."""
    if shape is not None:
        assert tuple(bits.shape) == tuple(shape), bits.shape
    values = set(bits.unique().tolist())
    assert {-1.0, 1.0} <= values <= {-1.0, 0.0, 1.0}, values
    assert (bits == 0).float().mean().item() <= max_zero, int((bits == 0).sum())
