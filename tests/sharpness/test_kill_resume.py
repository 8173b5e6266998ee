"""Resume at any moment (issue 18): a real ``sharpscope sharpness`` process SIGKILLed at random times resumes
mid-measure from ``sharpness.partial.npz`` and ends with the numbers of an uninterrupted run, bit for bit (CPU,
one thread); no kill loses more than the block of chunks in progress (``--save-every 0``), so the chunks saved
grow from kill to kill."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from sharpness_cases import digits_checkpoint

#: m = 1 and 4 in blocks of 8 samples: 24 blocks of 4-step ascents, ~1 s of measuring after ~3 s of start-up
ARGS = ["--measure", "worst", "--m", "1,4", "--rho", "0.05", "--steps", "4", "--num-samples", "96",
        "--batch-size", "8", "--gap-samples", "64", "--device", "cpu", "--save-every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: bit-identical sums


def start(checkpoint, out):
    return subprocess.Popen([sys.executable, "-m", "sharpscope", "-q", "sharpness", str(checkpoint), *ARGS,
                             "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


#: chunks of the whole measure: 96 of m = 1 and 24 of m = 4
TOTAL = 120.0


def chunks_saved(out) -> float:
    """Chunks whose results are on disk: those in the partial file, or all once the measure is in sharpness.json
    (the file is deleted then; a kill can land after it, while the figures are drawn)."""
    if (out / "sharpness.json").exists():
        assert json.loads((out / "sharpness.json").read_text())["entries"], "sharpness.json without the measure"
        return TOTAL
    path = out / "sharpness.partial.npz"
    return float(np.load(path)["__chunks__"]) if path.exists() else 0.0


def test_killed_at_random_times_resumes_to_the_uninterrupted_numbers(tmp_path):
    checkpoint = digits_checkpoint(tmp_path / "run" / "final.pt")
    straight = start(checkpoint, tmp_path / "straight")
    output, _ = straight.communicate(timeout=120)
    assert straight.returncode == 0, output
    rng = random.Random("sharpness-kill")  # fixed draws: reproducible, yet not chosen at block boundaries
    out = tmp_path / "killed"
    saved, kills = [0.0], 0
    for _ in range(2):  # two kills: 4 processes of ~4 s CPU each (start-up is most of it)
        process = start(checkpoint, out)
        # wait for a new save (so the kill lands inside the measure, past the start-up), then a random moment
        deadline = time.monotonic() + 120
        while chunks_saved(out) <= saved[-1] and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if process.poll() is not None:  # finished before the kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        saved.append(chunks_saved(out))
        assert saved[-1] > saved[-2], f"no progress kept across a kill: chunks saved after each kill {saved}"
    assert kills >= 2 and 0 < saved[1] < TOTAL, (kills, saved)  # the kills did land inside the measure
    final = start(checkpoint, out)
    output, _ = final.communicate(timeout=120)
    assert final.returncode == 0, output
    if 0 < saved[-1] < TOTAL:  # everything the last kill left was reused, not recomputed
        assert f"{saved[-1]:g} chunk(s) taken from its partial file" in output, output
    a, b = (json.loads((folder / "sharpness.json").read_text()) for folder in (tmp_path / "straight", out))
    assert [e["result"] for e in a["entries"]] == [e["result"] for e in b["entries"]]  # bit for bit
    assert a["rows"] == b["rows"] and a["checkpoints"] == b["checkpoints"]
    assert not (out / "sharpness.partial.npz").exists()
