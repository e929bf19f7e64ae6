"""`python -m bitdance_core eval-generate` on the tiny text-to-image fixtures, on the CPU: one process
and two torchrun processes (gloo) give byte-identical image sets in GenEval's and DPG-Bench's
layouts; the seed rule; a rerun after a deleted image or a killed run completes the set
identically; other settings are refused; bad prompt files are named with their line numbers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from paths import REPO, fixture_dirs, run_cli

FIXTURES = fixture_dirs("t2i-tiny")
RECORD = ".bitdance-eval.json"

# GenEval-style metadata lines (the last without a newline: metadata.jsonl keeps each line as it is)
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n',
    '{"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "apple", "count": 1}], "prompt": "a photo of a cow and an apple"}\n',
    '{"tag": "counting", "include": [{"class": "dog", "count": 3}], "prompt": "a photo of three dogs"}\n',
    '{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}], "prompt": "a photo of a blue car"}\n',
    '{"tag": "position", "include": [{"class": "chair", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a cat left of a chair"}\n',
    '{"tag": "color_attr", "prompt": "A green bird sits on a yellow branch under a wide and cloudy evening sky."}',
]
DPG_PROMPTS = {
    "0": "An expansive field with eight round cabbages in the soft morning light.",
    "1": "A red pickup truck parked on a sandy shore at dusk.",
    "partiprompts7": "a painting of a fox",
    "countbench12": "three small boats on a calm lake under grey clouds",
    "x": "a tree",
}
DPG_SEED = 3
DPG_PER_BATCH = 2  # batches [0, 1], [2, 3], [4]: the last prompt is alone in its batch


def size_of(fx) -> int:
    from bitdance_core import describe_t2i

    return describe_t2i(os.path.join(fx, "model")).block_pixels  # the smallest size the model makes (64 for p16)


def eval_cmd(*args, procs=1):
    head = [sys.executable, "-m", "bitdance_core", "eval-generate"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        "-m", "bitdance_core", "eval-generate"]
    return head + list(args)


def run_eval(*args, procs=1, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run(eval_cmd(*args, procs=procs), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def common(fx, out, benchmark, prompts, *extra):
    s = str(size_of(fx))
    return ["--model", os.path.join(fx, "model"), "--benchmark", benchmark, "--prompts", str(prompts), "--out", str(out),
            "--height", s, "--width", s, "--steps", "2", "--cfg", "4", "--device", "cpu", "--dtype", "float32", *extra]


def files_of(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), the settings record left out."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel != RECORD:
                out[rel] = open(os.path.join(root, f), "rb").read()
    return out


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def grid_2x2(imgs) -> np.ndarray:
    """Four [H, W, 3] images as make_grid(nrow=2, padding=0) lays them out (written independently)."""
    return np.concatenate([np.concatenate(imgs[0:2], axis=1), np.concatenate(imgs[2:4], axis=1)], axis=0)


def stamps(folder) -> dict[str, tuple[int, int]]:
    return {rel: (os.stat(os.path.join(folder, rel)).st_ino, os.stat(os.path.join(folder, rel)).st_mtime_ns)
            for rel in files_of(folder)}


@pytest.fixture(scope="module", params=FIXTURES, ids=[os.path.basename(f) for f in FIXTURES])
def sets(request, tmp_path_factory):
    """The reference image sets of one fixture, made by one process."""
    fx = request.param
    tmp = tmp_path_factory.mktemp(os.path.basename(fx))
    gen_prompts, dpg_prompts = tmp / "evaluation_metadata.jsonl", tmp / "prompts.json"
    gen_prompts.write_text("".join(GENEVAL_LINES))
    dpg_prompts.write_text(json.dumps(DPG_PROMPTS, indent=4) + "\n")
    r = run_eval(*common(fx, tmp / "geneval", "geneval", gen_prompts))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 images written, 0 skipped" in r.stderr, r.stderr[-2000:]
    r2 = run_eval(*common(fx, tmp / "dpg", "dpg", dpg_prompts, "--seed", str(DPG_SEED),
                          "--prompts-per-batch", str(DPG_PER_BATCH)))
    assert r2.returncode == 0, r2.stderr[-3000:]
    return {"fx": fx, "tmp": tmp, "geneval": tmp / "geneval", "dpg": tmp / "dpg", "geneval_prompts": gen_prompts,
            "dpg_prompts": dpg_prompts, "size": size_of(fx)}


def test_geneval_layout_and_two_processes_identical(sets, tmp_path):
    ref, s = sets["geneval"], sets["size"]
    assert sorted(os.listdir(ref)) == [RECORD] + [f"{i:05d}" for i in range(6)]
    for i, line in enumerate(GENEVAL_LINES):
        folder = ref / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["grid.png", "metadata.jsonl", "samples"]
        assert (folder / "metadata.jsonl").read_bytes() == line.encode()  # the line as in the file
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png", "0002.png", "0003.png"]
        samples = [png(folder / "samples" / f"{k:04d}.png") for k in range(4)]
        assert all(im.shape == (s, s, 3) for im in samples)
        assert len({im.tobytes() for im in samples}) == 4  # four different images
        assert (png(folder / "grid.png") == grid_2x2(samples)).all()
    record = json.loads((ref / RECORD).read_text())["settings"]
    assert record["seed"] == 0 and record["cfg"] == 4.0 and record["steps"] == 2 and record["images_per_prompt"] == 4

    r = run_eval(*common(sets["fx"], tmp_path / "two", "geneval", sets["geneval_prompts"]), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = files_of(tmp_path / "two"), files_of(ref)
    assert sorted(two) == sorted(one)
    differ = [f for f in one if one[f] != two[f]]
    assert not differ, f"files differ between 1 and 2 processes: {differ}"
    # a progress bar per process, rank-prefixed, and the summary
    for rank in (0, 1):
        assert f"[rank {rank}/2] [" in r.stderr and f"[rank {rank}/2] done: 12 images written" in r.stderr
    assert "24 images written, 0 skipped (already complete), 24 generated" in r.stderr
    assert "s/image" in r.stderr


def test_dpg_layout_and_two_processes_identical(sets, tmp_path):
    ref, s = sets["dpg"], sets["size"]
    assert sorted(os.listdir(ref)) == sorted([RECORD] + [f"{k}.png" for k in DPG_PROMPTS])
    grids = {k: png(ref / f"{k}.png") for k in DPG_PROMPTS}
    assert all(g.shape == (2 * s, 2 * s, 3) for g in grids.values())
    assert len({g.tobytes() for g in grids.values()}) == len(DPG_PROMPTS)

    r = run_eval(*common(sets["fx"], tmp_path / "two", "dpg", sets["dpg_prompts"], "--seed", str(DPG_SEED),
                         "--prompts-per-batch", str(DPG_PER_BATCH)), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = files_of(tmp_path / "two"), files_of(ref)
    assert sorted(two) == sorted(one) and all(one[f] == two[f] for f in one)
    assert "20 images written, 0 skipped" in r.stderr

    # a deleted grid: its batch ([0, 1]) is generated again, only the missing file is written
    work = tmp_path / "resume"
    shutil.copytree(ref, work)
    os.remove(work / "1.png")
    before = stamps(work)
    r = run_eval(*common(sets["fx"], work, "dpg", sets["dpg_prompts"], "--seed", str(DPG_SEED),
                         "--prompts-per-batch", str(DPG_PER_BATCH)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 images written, 16 skipped (already complete), 8 generated" in r.stderr
    assert files_of(work) == one
    after = stamps(work)
    assert {f: after[f] for f in before} == before  # nothing else rewritten


def test_seed_rule_is_the_t2i_command(sets, tmp_path, one_thread):
    """Prompt i with --seed S draws what `t2i --seed S*1000000+i` draws (the same generate call, so the same
    bits), and its images are those bits decoded with the eval scripts' conversion."""
    import bitdance_core as bd
    from bitdance_core.pipelines.images import to_uint8_rounded

    fx, s = sets["fx"], sets["size"]
    pipe = bd.load_t2i(os.path.join(fx, "model"))
    cases = [(sets["geneval"] / "00002" / "samples", json.loads(GENEVAL_LINES[2])["prompt"], 2),  # seed 0, prompt 2
             (sets["dpg"], DPG_PROMPTS["x"], DPG_SEED * 1_000_000 + 4)]  # seed 3, prompt 4 (alone in its batch)
    for where, prompt, seed in cases:
        bits = pipe.generate(prompt, s, s, 2, 4.0, 4, seed)
        images = to_uint8_rounded(pipe.decode(bits)).numpy()
        if where.name == "samples":
            got = np.stack([png(where / f"{k:04d}.png") for k in range(4)])
            assert (got == images).all()
        else:
            assert (png(where / "x.png") == grid_2x2(list(images))).all()
        tok = tmp_path / f"{seed}.npy"
        r = run_cli("t2i", "--model", os.path.join(fx, "model"), "--prompt", prompt, "--height", str(s), "--width", str(s),
                    "--steps", "2", "--cfg", "4", "--num-images", "4", "--seed", str(seed), "--device", "cpu",
                    "--tokens-npy", str(tok))
        assert r.returncode == 0, r.stderr[-2000:]
        assert np.array_equal(np.load(tok), bits.numpy())


def test_rerun_after_deleted_sample_regenerates_only_it(sets, tmp_path):
    work = tmp_path / "set"
    shutil.copytree(sets["geneval"], work)
    ref = files_of(work)
    os.remove(work / "00003" / "samples" / "0002.png")
    before = stamps(work)
    r = run_eval(*common(sets["fx"], work, "geneval", sets["geneval_prompts"]), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 image written, 23 skipped (already complete), 4 generated" in r.stderr, r.stderr[-2000:]
    assert "1 prompt to generate over 2 processes" in r.stderr
    assert files_of(work) == ref  # the same bytes again
    after = stamps(work)
    assert {f: after[f] for f in before} == before  # no other file rewritten


def test_resume_after_killed_run(sets, tmp_path):
    work = tmp_path / "set"
    args = common(sets["fx"], work, "geneval", sets["geneval_prompts"])
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(eval_cmd(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = work / "00000" / "samples" / "0000.png"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)  # as soon as the first image is in place
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    partial = files_of(work)
    assert first.exists() and len([f for f in partial if "/samples/" in f]) < 24
    # what a kill during a write leaves behind: a temporary file, never under an image's name
    (work / "00001" / "samples").mkdir(parents=True, exist_ok=True)
    (work / "00001" / "samples" / ".0000.png.1234-abcd.bitdance-partial").write_bytes(b"\x89PNG half")

    r = run_eval(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unfinished file" in r.stderr and "resuming" in r.stderr
    assert files_of(work) == files_of(sets["geneval"])


def test_other_settings_refused_unless_overwrite(sets, tmp_path):
    work = tmp_path / "set"
    shutil.copytree(sets["geneval"], work)
    ref = files_of(work)
    r = run_eval(*common(sets["fx"], work, "geneval", sets["geneval_prompts"], "--seed", "1"))
    assert r.returncode == 2
    assert "other settings" in r.stderr and "seed: 0 there, 1 now" in r.stderr and "--overwrite" in r.stderr
    assert files_of(work) == ref  # untouched

    (work / "notes.txt").write_text("mine")
    r = run_eval(*common(sets["fx"], work, "geneval", sets["geneval_prompts"], "--seed", "1", "--overwrite"))
    assert r.returncode == 0, r.stderr[-3000:]
    new = files_of(work)
    assert sorted(new) == sorted(ref) + ["notes.txt"]
    assert new["notes.txt"] == b"mine"  # only the benchmark's files are deleted
    assert [f for f in ref if f.endswith(".png") and new[f] == ref[f]] == []  # all images made again, other seeds
    assert json.loads((work / RECORD).read_text())["settings"]["seed"] == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000").mkdir()
    r = run_eval(*common(sets["fx"], foreign, "geneval", sets["geneval_prompts"]))
    assert r.returncode == 2 and "not empty" in r.stderr and RECORD in r.stderr


# ---- cheap checks, in this process --------------------------------------------------------------------

def cli_main(capsys, *argv):
    from bitdance_core.cli.main import main

    rc = main(["eval-generate", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("fx", FIXTURES, ids=[os.path.basename(f) for f in FIXTURES])
def test_bad_inputs_named(fx, tmp_path, capsys):
    model = os.path.join(fx, "model")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(GENEVAL_LINES))
    base = ["--model", model, "--out", str(tmp_path / "out"), "--device", "cpu", "--steps", "1"]

    with pytest.raises(SystemExit) as e:
        cli_main(capsys, *base, "--benchmark", "parti", "--prompts", str(good))
    assert e.value.code == 2 and "invalid choice: 'parti'" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GENEVAL_LINES[0] + GENEVAL_LINES[1] + '{"tag": "counting", "prompt": "two cats"\n' + GENEVAL_LINES[3])
    rc, err = cli_main(capsys, *base, "--benchmark", "geneval", "--prompts", str(bad))
    assert rc == 2 and f"{bad}, line 3: not valid JSON" in err

    bad.write_text(GENEVAL_LINES[0] + '{"tag": "counting", "text": "two cats"}\n')
    rc, err = cli_main(capsys, *base, "--benchmark", "geneval", "--prompts", str(bad))
    assert rc == 2 and "line 2: no \"prompt\" key" in err

    rc, err = cli_main(capsys, *base, "--benchmark", "dpg", "--prompts", str(good))
    assert rc == 2 and "--benchmark geneval" in err  # a GenEval file given as DPG-Bench's
    one = tmp_path / "one.jsonl"  # one GenEval line is one JSON object too: not read as {id: prompt}
    one.write_text('{"prompt": "a seven", "tag": "single_object"}\n')
    rc, err = cli_main(capsys, *base, "--benchmark", "dpg", "--prompts", str(one))
    assert rc == 2 and f"{one}: a GenEval metadata line (\"prompt\" with \"tag\"/\"include\"): use --benchmark geneval" in err
    one.write_text(GENEVAL_LINES[0])
    rc, err = cli_main(capsys, *base, "--benchmark", "dpg", "--prompts", str(one))
    assert rc == 2 and "use --benchmark geneval" in err

    dpg = tmp_path / "prompts.json"
    dpg.write_text('{\n    "0": "a cat",\n    "1": "a dog",\n    "2": 7\n}\n')
    rc, err = cli_main(capsys, *base, "--benchmark", "dpg", "--prompts", str(dpg))
    assert rc == 2 and f"{dpg}, line 4: the prompt of id \"2\" is 7" in err
    dpg.write_text('{\n    "0": "a cat",\n    "0": "a dog"\n}\n')
    rc, err = cli_main(capsys, *base, "--benchmark", "dpg", "--prompts", str(dpg))
    assert rc == 2 and "line 3: id \"0\" appears twice (first on line 2)" in err

    rc, err = cli_main(capsys, *base, "--benchmark", "geneval", "--prompts", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and "prompt file not found" in err

    rc, err = cli_main(capsys, *base, "--benchmark", "geneval", "--prompts", str(good), "--height", "48")
    assert rc == 2 and "--height 48 is not supported" in err
    rc, err = cli_main(capsys, *base, "--benchmark", "geneval", "--prompts", str(good), "--seed", "4294")
    assert rc == 2 and "--seed must be in 0..4293" in err
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_blank_geneval_line_is_refused(tmp_path):
    from bitdance_core.errors import BitDanceError
    from bitdance_core.cli.eval_prompts import read_geneval

    f = tmp_path / "m.jsonl"
    f.write_text(GENEVAL_LINES[0] + "\n" + GENEVAL_LINES[1] + "\n\n")  # a blank line 2; blank lines at the end are fine
    with pytest.raises(BitDanceError, match="line 2 is empty"):
        read_geneval(str(f))
    f.write_text(GENEVAL_LINES[0] + GENEVAL_LINES[1] + "\n\n")
    got = read_geneval(str(f))
    assert [(p.index, p.name, p.metadata) for p in got] == [(0, "00000", GENEVAL_LINES[0]), (1, "00001", GENEVAL_LINES[1])]


def test_per_prompt_generators_draw_what_each_draws_alone():
    from bitdance_core.models.sampler import predraw_noise, randn_rows

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 1_000_007)]

    a, b = gens()
    alone = [torch.randn([2, 16, 32], generator=a), torch.randn([2, 16, 32], generator=b)]
    assert torch.equal(randn_rows([4, 16, 32], gens(), "cpu"), torch.cat(alone))
    one = torch.Generator().manual_seed(5)
    assert torch.equal(randn_rows([2, 16, 32], [torch.Generator().manual_seed(5)], "cpu"), torch.randn([2, 16, 32], generator=one))
    # the sampler's whole sequence of draws, per generator, in order
    cond = torch.zeros(8, 16, 64)  # [cond x 4; uncond x 4] rows: 4 images, 2 prompts
    noise = predraw_noise("euler_maruyama", cond, 4.0, 3, gens())
    for k, g in enumerate(gens()):
        own = predraw_noise("euler_maruyama", cond[:4], 4.0, 3, g)  # as if alone: 2 images
        assert torch.equal(noise[:, 2 * k:2 * k + 2], own[:, :2])


@pytest.mark.parametrize("fx", FIXTURES, ids=[os.path.basename(f) for f in FIXTURES])
def test_generate_with_a_list_of_one_prompt_is_the_plain_call(fx, one_thread):
    import bitdance_core as bd

    pipe = bd.load_t2i(os.path.join(fx, "model"))
    s = pipe.block_pixels
    plain = pipe.generate("a red fox", s, s, 2, 4.0, 2, 11)
    listed = pipe.generate(["a red fox"], s, s, 2, 4.0, 2, [11])
    assert torch.equal(plain, listed)
    two = pipe.generate(["a red fox", "a blue bird on a long branch"], s, s, 2, 4.0, 2, [11, 12])
    assert two.shape == (4, *plain.shape[1:])
    with pytest.raises(bd.BitDanceError, match="2 prompts need as many seeds"):
        pipe.generate(["a", "b"], s, s, 2, 4.0, 1, 11)


TORCHVISION_SAVE = """
import sys
import numpy as np
import torch
from comfy_launcher import _define_torchvision_schemas
_define_torchvision_schemas()  # the CUDA torchvision wheel beside a CPU torch (see comfy_launcher)
from torchvision.utils import make_grid, save_image
for stem in sys.argv[1:]:
    unit = torch.from_numpy(np.load(stem + ".npy")).clamp(-1, 1) * 0.5 + 0.5  # as eval_geneval.py / eval_dpg.py
    save_image(unit[0], stem + "_sample.png")
    save_image(make_grid(unit, nrow=2, padding=0), stem + "_grid.png")
"""


def test_grid_and_pngs_match_torchvision(tmp_path):
    """The official scripts save with torchvision (save_image, make_grid(nrow=2, padding=0)): our files
    are byte for byte what it writes from the same pixels. (torchvision runs in its own interpreter:
    importing it here would leave this test process's transformers trying to use it.)"""
    from bitdance_core.cli.eval_layout import grid, png_bytes
    from bitdance_core.pipelines.images import to_uint8_rounded

    g = torch.Generator().manual_seed(0)
    cases = {n: torch.randn(n, 3, 16, 24, generator=g) * 0.7 for n in (4, 3, 1)}  # some beyond [-1, 1]
    for n, pixels in cases.items():
        np.save(tmp_path / f"{n}.npy", pixels.numpy())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    r = subprocess.run([sys.executable, "-c", TORCHVISION_SAVE, *(str(tmp_path / str(n)) for n in cases)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for n, pixels in cases.items():
        u8 = to_uint8_rounded(pixels).numpy()
        assert (tmp_path / f"{n}_sample.png").read_bytes() == png_bytes(u8[0])
        assert (tmp_path / f"{n}_grid.png").read_bytes() == png_bytes(grid(u8))


GROUP_SCRIPT = """
import json, sys
from bitdance_core.runtime import distributed
g = distributed.join("cpu")
plan = g.broadcast({"work": [[0, 1], [2]], "note": "fünf €", "pair": (1, 2)} if g.rank == 0 else None)
stats = g.gather({"rank": g.rank, "written": 10 * g.rank + 1})
least = g.smallest(7 - 3 * g.rank)
none = g.smallest(None if g.rank == 1 else 5)
g.close()
with open(sys.argv[1] + f"/{g.rank}.json", "w") as f:
    json.dump({"plan": plan, "stats": stats, "least": least, "none": none, "joined": g.joined}, f)
"""


def test_the_process_group_carries_json_and_closes(tmp_path):
    """The collectives eval-generate uses, in two torchrun processes (gloo): rank 0's plan on both
    ranks, both ranks' stats on both, in rank order, as JSON (a tuple arrives as a list), the smallest
    of the ranks' values (their free memory); and the group closes. Three launches: on torch 2.7 the
    pickling collectives hung in close about 4 times in 10."""
    script = tmp_path / "group.py"
    script.write_text(GROUP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for launch in range(3):
        out = tmp_path / str(launch)
        out.mkdir()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        for rank in (0, 1):
            got = json.loads((out / f"{rank}.json").read_text())
            assert got == {"plan": {"work": [[0, 1], [2]], "note": "fünf €", "pair": [1, 2]},
                           "stats": [{"rank": 0, "written": 1}, {"rank": 1, "written": 11}],
                           "least": 4, "none": None, "joined": False}, got


FAILING_RANK_SCRIPT = """
import sys, time
from bitdance_core.runtime import distributed
g = distributed.join("cpu")
try:
    g.broadcast({"work": []} if g.rank == 0 else None)
    if g.rank == 1:
        raise RuntimeError("boom on rank 1")
    g.gather({"rank": g.rank})  # rank 0 waits here for a rank that will never come
finally:
    g.close()
"""


def test_a_failing_rank_ends_the_launch_with_its_error(tmp_path):
    """A rank that fails while the others work (out of memory, a full disk) must end the launch with
    its own error printed, not leave the others waiting in a collective for the group's timeout (what
    NCCL's shutdown does: the reason the group is gloo on GPUs too)."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "RuntimeError: boom on rank 1" in r.stderr, r.stderr[-3000:]
