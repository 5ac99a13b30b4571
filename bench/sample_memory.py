#!/usr/bin/env python
"""Peak host memory of sample.py writing a sample set, against the number of images, and resuming after a kill.

    python bench/sample_memory.py --counts 2000,20000 --json bench/out/sample_memory.json

A small convolutional network on 3x64x64 images (this file's make_model; one DDIM step, so that the set is
written quickly) is saved as a checkpoint; sample.py runs in a fresh process for each count with --out_npz
(shards of --shard_size images, then the streamed npz) and its peak RSS is read from the kernel
(wait4 of the finished child: ru_maxrss), the median of --repeats runs. Then a run of the largest count is killed once its fifth shard is
on disk, resumed, and its npz compared byte for byte with the uninterrupted one.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SmallNet(nn.Module):
    """Two convolutions: a network of a few thousand parameters on 3x64x64 images (the time label ignored)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))
        self.image_size = [1, 3, 64, 64]

    def forward(self, x, t):
        return self.net(x)


def make_model():
    return SmallNet()


def make_dataset():
    return torch.utils.data.TensorDataset(torch.zeros(1, 3, 64, 64))


def run_sample(folder, count, out, args, wait_for_shard=None):
    """sample.py in a fresh process; (peak RSS in MiB of that process, seconds, killed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), ROOT]),
               OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, os.path.join(ROOT, "sample.py"), "--module", "sample_memory", "--checkpoint", "net.pt",
               "--sampler", "ddim", "--steps", "1", "--num_images", str(count), "--shard_size", str(args.shard_size),
               "--chunk_size", str(args.chunk_size), "--out_npz", out, "--device", args.device]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    if wait_for_shard is not None:
        shard = os.path.join(folder, out[:-4] + "_shards", f"shard_{wait_for_shard:06d}.npz")
        while not os.path.exists(shard) and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        killed = True
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    if not killed and os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"sample.py failed:\n{stderr[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started, killed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="2000,20000", help="numbers of images, comma separated")
    parser.add_argument("--shard_size", type=int, default=1000)
    parser.add_argument("--chunk_size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per count; the median peak counts (the RSS of "
                                                                  "torch's start varies by tens of MiB between runs)")
    parser.add_argument("--device", default="cpu", help="where sample.py runs (cpu, cuda)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results = {"device": args.device, "shard_size": args.shard_size, "chunk_size": args.chunk_size, "image_shape": [3, 64, 64], "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        torch.save({"G": make_model().state_dict(), "n_timesteps": 8, "time_scale": 1}, os.path.join(folder, "net.pt"))
        for count in counts:
            peaks = []
            for repeat in range(args.repeats):  # a fresh sample folder each time
                peak, seconds, _ = run_sample(folder, count, f"set_{count}_{repeat}.npz", args)
                peaks.append(peak)
            peak = statistics.median(peaks)
            results["runs"][str(count)] = {"peak_rss_mib": peak, "peak_rss_mib_each": peaks, "seconds": seconds,
                                           "npz_bytes": os.path.getsize(os.path.join(folder, f"set_{count}_0.npz"))}
            print(f"{count:6d} images: peak RSS {peak:7.1f} MiB (median of {', '.join(f'{p:.0f}' for p in peaks)}), "
                  f"{seconds:6.1f} s")
        largest = max(counts)
        run_sample(folder, largest, "resumed.npz", args, wait_for_shard=4)
        shards = len([f for f in os.listdir(os.path.join(folder, "resumed_shards")) if f.endswith(".npz")])
        run_sample(folder, largest, "resumed.npz", args)
        with open(os.path.join(folder, "resumed.npz"), "rb") as a, open(os.path.join(folder, f"set_{largest}_0.npz"), "rb") as b:
            same = a.read() == b.read()
        results["resume"] = {"images": largest, "shards_before_the_kill": shards, "same_file": same}
        print(f"killed with {shards} shards on disk, resumed: the same file as the uninterrupted run: {same}")
    peaks = [results["runs"][str(c)]["peak_rss_mib"] for c in counts]
    results["peak_ratio_largest_to_smallest"] = peaks[counts.index(largest)] / peaks[counts.index(min(counts))]
    print(f"peak RSS, {largest} / {min(counts)} images: {results['peak_ratio_largest_to_smallest']:.3f} (goal <= 1.10)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
