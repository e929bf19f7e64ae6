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

