"""The GPU scripts' own arithmetic, on their GPU branch (not DRY): one device call gives 600 s, so the
parts' timeouts must add up to at most 540 s, every Python run must be under a timeout (a run that
hangs must not eat the rest), and a sweep's last variant must end inside its part (a variant may start
until `--deadline` and run `--variant-timeout`; the start-up of the process comes on top).

The scripts run for real under bash, with `timeout` replaced by a function that writes down its
arguments instead of running the command (BASH_ENV), and PY a command that writes down that it was
called outside a timeout. What the parts do on a GPU is measured by the scripts themselves."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL_S = 540  # of the device call's 600 s: the rest is for the start of the machine and the transfers
START_S = 15  # a part's process start (torch import, CUDA context, random weights at 14B) before its sweep


def _record(tmp_path, script):
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub.sh"
    stub.write_text(f'timeout() {{ printf "%s\\n" "$*" >> "{log}"; return 0; }}\n'
                    f'nvidia-smi() {{ return 0; }}\n')
    py = tmp_path / "py"
    py.write_text(f'#!/bin/sh\necho "UNTIMED $*" >> "{log}"\n')
    py.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DRY", "PARTS_S", "BEST", "LEVERS", "CAPS", "VARIANTS")}
    # BEST as part 3 would choose one: the target sweeps then time two variants each
    env.update(BASH_ENV=str(stub), PY=str(py), OUT=str(tmp_path / "out"), BEST="compile=loop+fuse")
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return log.read_text().splitlines()


def _timed(lines):
    """(seconds, command) of each timeout call: `timeout [-s SIG] [-k K] N command...`."""
    out = []
    for line in lines:
        m = re.match(r"(?:-s \S+ )?(?:-k \d+ )?(\d+) (.*)", line)
        assert m, f"not a timeout call with its seconds: {line}"
        out.append((int(m.group(1)), m.group(2)))
    return out


@pytest.mark.parametrize("script", ["gpu_consumer.sh", "gpu_kernels.sh", "gpu_quick.sh"])
def test_a_gpu_script_fits_one_device_call(tmp_path, script):
    lines = _record(tmp_path, script)
    untimed = [ln for ln in lines if ln.startswith("UNTIMED")]
    assert not untimed, f"{script} runs Python outside a timeout: {untimed}"
    calls = _timed(lines)
    assert len(calls) >= 4, calls
    total = sum(s for s, _ in calls)
    assert total <= CALL_S, f"{script}: the parts' timeouts add up to {total} s, more than {CALL_S} s: {calls}"
    for seconds, cmd in calls:
        if " bench-sweep " not in f" {cmd} ":
            continue
        vt = re.search(r"--variant-timeout (\d+)", cmd)
        dl = re.search(r"--deadline (\d+)", cmd)
        n = len(re.search(r"--variants (\S+)", cmd).group(1).split(","))
        assert vt, f"{script}: a sweep without --variant-timeout: {cmd}"
        # the last variant starts at the deadline at the latest, or after all the others ran their limit
        latest_start = min(int(dl.group(1)), (n - 1) * int(vt.group(1))) if dl else (n - 1) * int(vt.group(1))
        last_end = latest_start + int(vt.group(1)) + START_S
        assert last_end <= seconds, (f"{script}: a variant started at the deadline would end at {last_end} s, after the "
                                     f"part's {seconds} s: {cmd}")
