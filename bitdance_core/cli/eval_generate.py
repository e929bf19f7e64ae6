"""`python -m bitdance_core eval-generate`: a benchmark's image set (GenEval, DPG-Bench) in the layout its
scorer reads, on one process or many (`torchrun --nproc_per_node=N -m bitdance_core eval-generate ...`).

Seed rule: the images of prompt i (its 0-based position in the prompt file) come from one
torch.Generator seeded with `seed * 1_000_000 + i` on the compute device, drawn in the official
order; a GAN decoder's noise from a second one seeded the same way. With --prompts-per-batch 1 (the
default) prompt i's bits are exactly `t2i --num-images N --seed <seed * 1_000_000 + i>`'s (saved with
the official eval scripts' rounding conversion, `images.to_uint8_rounded`). The seeds stay below
2**32 (seed <= 4293, fewer than a million prompts): torch's CPU generator keeps only the low 32 bits
of a seed, so larger ones would repeat.

Work: the prompts in batches of --prompts-per-batch consecutive indices ([0..K), [K..2K), ...), fixed
by the settings alone. Rank 0 lists the batches that still lack a file; the ranks take them in turn
(batch j of that list goes to rank j mod N). A batch's composition never depends on the number of
processes, so neither does any image: they depend on the model, the settings, the prompt's index and
--seed only. Several prompts in a batch share the backbone and head passes (faster on a big GPU), each
with its own generator; their rows can round differently from a batch of one, which is why the batch
size is a recorded setting.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from ..errors import BitDanceError, require
from ..pipelines.images import to_uint8_rounded
from . import options
from .common import DTYPES, device_dtype
from .eval_layout import Layout, claim_folder
from .eval_prompts import EvalPrompt, read_prompts
from .t2i import add_t2i_load_options, device_free_bytes, load_t2i_as_planned, plan_t2i_load

SEED_STRIDE = 1_000_000  # prompt seeds: seed * SEED_STRIDE + index, below 2**32 (see the module docstring)
MAX_SEED = (2 ** 32 - 1) // SEED_STRIDE - 1  # 4293: its last prompt seed still below 2**32


@dataclass(frozen=True)
class Benchmark:
    """The official eval scripts' settings (scripts/eval/eval_bitdance_14b_*.sh)."""

    height: int
    width: int
    steps: int
    cfg: float


BENCHMARKS = {
    "geneval": Benchmark(1024, 1024, 50, 13.0),
    "dpg": Benchmark(1024, 1024, 50, 7.5),
}


def prompt_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index` (see the module docstring)."""
    return seed * SEED_STRIDE + index


def batches(n_prompts: int, per_batch: int) -> list[list[int]]:
    """The units of work: consecutive prompt indices, `per_batch` at a time."""
    return [list(range(i, min(i + per_batch, n_prompts))) for i in range(0, n_prompts, per_batch)]


def model_fingerprint(path: str) -> str:
    """Names and sizes of the model folder's files and the contents of its JSON configs (the weights
    are not read: a changed or moved file changes its size, a renamed folder changes nothing)."""
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            full = os.path.join(folder, name)
            h.update(f"{os.path.relpath(full, path)}\0{os.path.getsize(full)}\0".encode())
            if name.endswith(".json"):
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- console ---------------------------------------------------------------------------------------

class Progress:
    """One process's progress on stderr, prefixed with its rank: a redrawn bar on a terminal when it
    runs alone, otherwise a line per finished batch (several processes share the console)."""

    def __init__(self, tag: str, total_prompts: int, redraw: bool):
        self.tag, self.total, self.redraw = tag, total_prompts, redraw
        self.done = self.written = self.generated = 0
        self.seconds = 0.0
        self.in_batch = 0  # prompts of the batch being generated

    def line(self, block: int | None = None, blocks: int | None = None) -> str:
        frac = (self.done + (self.in_batch * block / blocks if blocks else 0)) / max(self.total, 1)
        n = int(30 * frac)
        rate = f"{self.seconds / self.generated:.2f} s/image" if self.generated else "-- s/image"
        left = ""
        if self.generated and self.done < self.total:
            per_prompt = self.seconds / self.done
            left = f", ~{_duration(per_prompt * (self.total - self.done))} left"
        return (f"{self.tag} [{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} prompts, "
                f"{_count(self.written, 'image')} written, {rate}{left}")

    def block(self, step: int, total: int, _bits) -> None:
        sys.stderr.write("\r" + self.line(step + 1, total))
        sys.stderr.flush()

    def batch_done(self, prompts: int, generated: int, written: int, seconds: float) -> None:
        self.done += prompts
        self.in_batch = 0
        self.generated += generated
        self.written += written
        self.seconds += seconds
        sys.stderr.write(("\r" if self.redraw else "") + self.line() + ("" if self.redraw else "\n"))
        sys.stderr.flush()

    def finish(self) -> None:
        if self.redraw and self.total:
            sys.stderr.write("\n")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 'es' if what.endswith('s') else 's'}"


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


# ---- the command -----------------------------------------------------------------------------------

def _check_args(args, bench: Benchmark, prompts: list[EvalPrompt]):
    from ..pipelines.t2i_loading import describe_t2i

    require(args.images_per_prompt >= 1, f"--images-per-prompt must be >= 1, got {args.images_per_prompt}")
    require(args.prompts_per_batch >= 1, f"--prompts-per-batch must be >= 1, got {args.prompts_per_batch}")
    require(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    require(args.cfg is None or args.cfg >= 0, f"--cfg must be >= 0, got {args.cfg}")
    require(0 <= args.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED} (prompt i draws from seed * {SEED_STRIDE:_} + i, "
            f"which must stay below 2**32), got {args.seed}")
    require(len(prompts) <= SEED_STRIDE, f"{args.prompts}: {len(prompts)} prompts; the seed rule takes at most "
            f"{SEED_STRIDE:_} (split the file)")
    info = describe_t2i(args.model)
    h, w = args.height or bench.height, args.width or bench.width
    bp = info.block_pixels
    for v, what in ((h, "height"), (w, "width")):
        require(v > 0 and v % bp == 0, f"--{what} {v} is not supported: it must be a positive multiple of {bp} px "
                f"for this {info.parallel_num}-token-per-step model")
    return h, w, args.steps or bench.steps, bench.cfg if args.cfg is None else args.cfg


@dataclass(frozen=True)
class Sampling:
    height: int
    width: int
    steps: int
    cfg: float
    images_per_prompt: int
    prompts_per_batch: int


def cmd_eval_generate(args):
    from ..runtime import distributed

    bench = BENCHMARKS[args.benchmark]
    prompts = read_prompts(args.benchmark, args.prompts)
    height, width, steps, cfg = _check_args(args, bench, prompts)
    sampling = Sampling(height, width, steps, cfg, args.images_per_prompt, args.prompts_per_batch)
    dev, dtype = device_dtype(args)
    dev_type = torch.device(dev).type
    if dev_type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.device(dev).index is not None:
        raise BitDanceError(f"--device {dev}: under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda")
    group = distributed.join(dev_type)
    try:
        _run(args, group, group.device(dev), dtype, prompts, sampling)
    finally:
        group.close()


def _run(args, group, dev: str, dtype, prompts: list[EvalPrompt], sm: Sampling):
    tag, n = group.tag, sm.images_per_prompt
    # every rank plans against the least free memory of all: one choice of weights and offload for all
    # (the images, and the settings rank 0 records, must not depend on which GPU made them)
    free = group.smallest(device_free_bytes(dev))
    decision = plan_t2i_load(args, dev, dtype, sm.height, sm.width, sm.prompts_per_batch * n, sm.cfg,
                             log_prefix=f"{tag} ", free_bytes=free)
    settings = {
        "benchmark": args.benchmark, "prompts_sha256": file_sha256(args.prompts), "prompts": len(prompts),
        "model_fingerprint": model_fingerprint(args.model), "height": sm.height, "width": sm.width,
        "steps": sm.steps, "cfg": sm.cfg, "images_per_prompt": n, "seed": args.seed,
        "prompts_per_batch": sm.prompts_per_batch, "dtype": str(dtype).replace("torch.", ""), "weights": decision.weights,
        "attention": args.attention, "compile": bool(args.compile), "device": torch.device(dev).type,
    }
    info = {"model": os.path.realpath(args.model), "prompt_file": os.path.realpath(args.prompts),
            "seed_rule": f"prompt i: torch.Generator().manual_seed(seed * {SEED_STRIDE} + i)",
            "command": "python -m bitdance_core " + " ".join(sys.argv[1:])}
    layout = Layout(args.benchmark, args.out, n)

    # Rank 0 claims the folder and lists the batches that lack a file; every rank gets that list (or
    # the error). Each rank then looks again at what its own prompts lack (no one else writes them).
    plan = None
    if group.rank == 0:
        try:
            note = claim_folder(args.out, settings, info, args.overwrite)
            todos = [layout.todo(p) for p in prompts]
            for t in todos:  # a metadata file alone needs no images
                if t.metadata and not t.needs_images:
                    layout.write_metadata(t.prompt)
            skipped = sum(layout.images_done(t) for t in todos)
            work = [b for b in batches(len(prompts), sm.prompts_per_batch) if any(todos[i].needs_images for i in b)]
            plan = {"note": note, "skipped": skipped, "work": work}
        except BitDanceError as e:
            plan = {"error": str(e)}
        except OSError as e:  # the folder cannot be made or written
            plan = {"error": f"--out {args.out}: {e}"}
    plan = group.broadcast(plan)
    if "error" in plan:
        raise BitDanceError(plan["error"])
    mine = plan["work"][group.rank::group.world]
    if group.rank == 0:
        total = sum(len(b) for b in plan["work"])
        print(f"{tag} [bitdance] {args.out}: {plan['note']}; {_count(len(prompts), 'prompt')}, "
              f"{_count(plan['skipped'], 'image')} already complete, {_count(total, 'prompt')} to generate over "
              f"{_count(group.world, 'process')}", file=sys.stderr)

    progress = Progress(tag, sum(len(b) for b in mine), redraw=group.world == 1 and sys.stderr.isatty())
    pipe = load_t2i_as_planned(args, decision, dev, dtype) if mine else None
    start = time.perf_counter()
    for batch in mine:
        t0 = time.perf_counter()
        todos = [layout.todo(prompts[i]) for i in batch]
        seeds = [prompt_seed(args.seed, i) for i in batch]
        progress.in_batch = len(batch)
        bits = pipe.generate([prompts[i].prompt for i in batch], sm.height, sm.width, sm.steps, sm.cfg, n, seeds,
                             callback=progress.block if progress.redraw else None)
        written = 0
        for k, (t, s) in enumerate(zip(todos, seeds)):
            gan_noise = torch.Generator(device=pipe.device).manual_seed(s)  # where decode draws (offload: CPU)
            images = to_uint8_rounded(pipe.decode(bits[k * n:(k + 1) * n], generator=gan_noise)).numpy()
            written += layout.write(t, images)
        progress.batch_done(len(batch), len(batch) * n, written, time.perf_counter() - t0)
    progress.finish()
    rate = f"{progress.seconds / progress.generated:.2f} s/image" if progress.generated else "nothing to generate"
    print(f"{tag} done: {_count(progress.written, 'image')} written, {progress.generated} generated ({rate})",
          file=sys.stderr)
    stats = group.gather({"written": progress.written, "generated": progress.generated, "seconds": progress.seconds})
    wall = time.perf_counter() - start
    if group.rank == 0:
        written = sum(s["written"] for s in stats)
        generated = sum(s["generated"] for s in stats)
        busy = sum(s["seconds"] for s in stats)
        speed = (f"{busy / generated:.2f} s/image per process, {wall / generated:.2f} s/image overall "
                 f"({_count(group.world, 'process')}, {wall:.1f} s)") if generated else "nothing to do"
        print(f"[bitdance] eval-generate {args.benchmark}: {_count(written, 'image')} written, {plan['skipped']} "
              f"skipped (already complete), {generated} generated; {speed}; {args.out}", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("eval-generate", help="a GenEval or DPG-Bench image set, in the layout its scorer reads "
                       "(one process, or many under torchrun)")
    p.add_argument("--model", type=options.model_folder, required=True,
                   help="text-to-image model folder (official or diffusers layout)")
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS),
                   help="geneval: <out>/<index:05d>/{metadata.jsonl,samples/0000.png..,grid.png}; "
                        "dpg: <out>/<id>.png (2x2 grid)")
    p.add_argument("--prompts", required=True, help="GenEval's evaluation_metadata*.jsonl or DPG-Bench's prompts JSON")
    p.add_argument("--out", required=True, help="output folder (resumable: a rerun completes it)")
    p.add_argument("--height", type=int, default=None, help="default: the benchmark's (1024)")
    p.add_argument("--width", type=int, default=None, help="default: the benchmark's (1024)")
    p.add_argument("--steps", type=int, default=None, help="diffusion-head steps per block (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: GenEval 13.0, DPG-Bench 7.5)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help=f"0..{MAX_SEED}: prompt i's generator is seeded with SEED * 1_000_000 + i")
    p.add_argument("--prompts-per-batch", type=int, default=1,
                   help="prompts sharing one batch (faster where memory allows; part of the settings: the "
                        "images differ in rounding from another batch size)")
    p.add_argument("--overwrite", action="store_true",
                   help="the output folder holds another run's images: delete them and start again")
    p.add_argument("--device", type=options.device, default=None, help="cpu or cuda (default: cuda when available; under torchrun "
                   "each process uses the GPU of its LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype; auto: bfloat16 on a GPU that has it (the official dtype), else float32")
    add_t2i_load_options(p)
    p.set_defaults(func=cmd_eval_generate)
