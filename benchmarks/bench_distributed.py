"""Data-parallel scaling on CPU: ``sharpscope train`` and ``sharpscope landscape`` with 1 vs 2 torchrun ranks.

    python benchmarks/bench_distributed.py            # ~1-2 min on 2 CPU cores
    python benchmarks/bench_distributed.py --json out.json

Each command runs as a subprocess, once through ``python -m torch.distributed.run --nproc_per_node=R`` per rank
count ``R`` (gloo, ``--device cpu``, ``OMP_NUM_THREADS=1`` per rank, so R ranks use R cores):

* ``train``: digits, ``convnet``, ``--epochs`` (default 2), batch 64 per step. Throughput is training samples
  per second of the epochs' own timer (``seconds`` in metrics.jsonl: the training loop, without start-up and
  evaluation) and, for comparison, per second of the whole command's wall time (start-up included).
* ``landscape``: digits, the trained model, random filter-normalised plane, an 11 x 11 grid over the first
  ``--num-samples`` training samples; throughput is (grid points x samples) / wall time of the whole command
  (grid points are split over the ranks; start-up, direction set-up and writing are included).

The table gives each figure for 1 and 2 ranks and the ratio 2 / 1 (ideal 2.0). With 2 shared cores and
other work on the machine the ratios are noisy; ``--repeats`` takes the best of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(ranks: int, args: list[str], cwd: Path) -> float:
    """Run ``sharpscope ARGS`` on ``ranks`` torchrun processes; return the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={_free_port()}", "-m", "sharpscope", "-q", *args]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}")
    return seconds


def _train_samples(run: Path) -> int:
    from sharpscope.data import load_dataset

    config = json.loads((run / "config.json").read_text())
    return int(load_dataset(config.get("dataset", "digits")).train_images.shape[0])


def bench_train(ranks: int, work: Path, epochs: int) -> dict:
    out = work / f"train-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    wall = _launch(ranks, ["train", "--dataset", "digits", "--model", "convnet", "--epochs", str(epochs),
                           "--batch-size", "64", "--device", "cpu", "--out", str(out)], work)
    epochs_seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()
                      if line.strip()]
    samples = _train_samples(out) * epochs
    return {"ranks": ranks, "wall_s": wall, "loop_s": sum(epochs_seconds), "samples": samples,
            "samples_per_s_loop": samples / sum(epochs_seconds), "samples_per_s_wall": samples / wall,
            "checkpoint": str(out / "final.pt")}


def bench_landscape(ranks: int, work: Path, checkpoint: str, num_samples: int, grid: int) -> dict:
    out = work / f"landscape-{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    wall = _launch(ranks, ["landscape", checkpoint, "--x", f"-1:1:{grid}", "--y", f"-1:1:{grid}",
                           "--num-samples", str(num_samples), "--device", "cpu", "--out", str(out)], work)
    samples = grid * grid * num_samples
    return {"ranks": ranks, "wall_s": wall, "points": grid * grid, "samples": samples,
            "samples_per_s_wall": samples / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=1000, help="landscape evaluation samples")
    parser.add_argument("--grid", type=int, default=11, help="landscape grid points per axis")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per setting")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        train = {r: max((bench_train(r, work, options.epochs) for _ in range(options.repeats)),
                        key=lambda row: row["samples_per_s_loop"]) for r in (1, 2)}
        checkpoint = train[1]["checkpoint"]
        land = {r: max((bench_landscape(r, work, checkpoint, options.num_samples, options.grid)
                        for _ in range(options.repeats)), key=lambda row: row["samples_per_s_wall"]) for r in (1, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        (f"train convnet/digits, {options.epochs} epochs (loop timer)", "samples_per_s_loop", train),
        (f"train convnet/digits, {options.epochs} epochs (wall)", "samples_per_s_wall", train),
        (f"landscape {options.grid}x{options.grid} x {options.num_samples} samples (wall)", "samples_per_s_wall",
         land),
    ]
    print(f"{'benchmark':<52} {'1 rank':>10} {'2 ranks':>10} {'2/1':>6}   (samples/s; CPU, gloo, 1 thread/rank)")
    for label, key, table in rows:
        one, two = table[1][key], table[2][key]
        print(f"{label:<52} {one:>10.0f} {two:>10.0f} {two / one:>6.2f}")
    print(f"wall seconds: train {train[1]['wall_s']:.1f} / {train[2]['wall_s']:.1f}, "
          f"landscape {land[1]['wall_s']:.1f} / {land[2]['wall_s']:.1f} (1 / 2 ranks)")
    if options.json is not None:
        options.json.write_text(json.dumps({"train": train, "landscape": land, "options": vars(options)},
                                           indent=2, default=str))


if __name__ == "__main__":
    main()
