#!/usr/bin/env python
"""Images per second through the FID InceptionV3 (fid.FIDInception, pool3 features), the cost of scoring a set:
the time of an FID-50k row is 50,000 / rate per process. Random weights (the speed does not depend on them).

    python bench/inception_rate.py --device cpu --threads 1 --batch_size 50 --resolution 256
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
from runtime import choose_device  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=256, help="image side before the resize to 299")
    parser.add_argument("--iters", type=int, default=3, help="timed batches")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    net = fid.FIDInception().to(device).eval()
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
    with torch.no_grad():
        net(images)  # warm-up (cuDNN's choice of kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.iters):
            net(images).cpu()
        seconds = time.perf_counter() - started
    rate = args.iters * args.batch_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = dict(device=name, batch_size=args.batch_size, resolution=args.resolution, images_per_s=rate,
                  hours_per_50k=50000 / rate / 3600)
    print(f"FID InceptionV3 on {name}: {rate:.1f} images/s at {args.resolution}x{args.resolution}, batch "
          f"{args.batch_size}: {result['hours_per_50k']:.2f} hours for 50,000 images in one process")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
