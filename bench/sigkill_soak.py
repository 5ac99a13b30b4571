#!/usr/bin/env python
"""SIGKILL soak: kill train.py at random moments, again and again; nothing may be lost.

    python bench/sigkill_soak.py            # 20 rounds, about 3-5 minutes on 2 CPU cores

Each round starts `train.py --module toy_u` (tests/toy_u.py, a small MLP), continuing from the last
checkpoint when there is one, waits until this process has written a checkpoint of its own (mtime newer
than its start), sleeps a random 0-1.5 s and sends SIGKILL. Then checkpoint.pt must load with
torch.load(weights_only=True) (with a step > 0 and weights), and every run after the first must have
printed "Continuing from ... at step S" with S the step saved before it was started. A last run
continues to the saved step + 2 and must finish there. Prints a summary such as
"20/20 loadable, 19/19 resumed from the saved step" and exits 1 if any round failed.
Same logic as tests/test_resume.py::test_sigkill_at_random_moments_leaves_a_loadable_checkpoint.
"""
import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
CONTINUING = re.compile(r"Continuing from (.+) at step (\d+)\.")
TOY = ["--module", "toy_u", "--num_workers", "0", "--device", "cpu", "--batch_size", "16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="number of SIGKILLs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--max_sleep", type=float, default=1.5, help="kill within this many seconds after the run's first checkpoint")
    p.add_argument("--wait", type=float, default=120.0, help="give up on a run that writes no checkpoint within this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    return p.parse_args(argv)


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="sigkill_soak_")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ckpt = os.path.join(work, "checkpoints", "toy", "base", "checkpoint.pt")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--name", "toy", "--dname", "base", "--num_timesteps", "16",
           "--num_iters", "100000000", "--save_every", "3", "--keep_last", "2", *TOY]
    loadable = resumed = resume_checks = 0
    previous = None  # the step in checkpoint.pt before this round's run started
    print(f"sigkill soak: {args.rounds} rounds in {work}")
    for kill in range(args.rounds):
        run = cmd + (["--checkpoint_to_continue", ckpt] if os.path.exists(ckpt) else [])
        started = time.time()
        proc = subprocess.Popen(run, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + args.wait
        while not (os.path.exists(ckpt) and os.path.getmtime(ckpt) > started) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)  # until this process has written a checkpoint of its own
        wrote = os.path.exists(ckpt) and os.path.getmtime(ckpt) > started
        sleep = rng.uniform(0.0, args.max_sleep)
        if wrote:
            time.sleep(sleep)
        exited_early = proc.poll() is not None
        proc.kill()
        output = proc.communicate()[0]
        problems = []
        if exited_early:
            problems.append(f"train.py exited by itself with status {proc.returncode}")
        if not wrote:
            problems.append(f"no checkpoint of its own within {args.wait:.0f} s")
        try:
            saved = load(ckpt)
            step = int(saved["step"])
            if step <= 0 or not saved["G"]:
                raise ValueError(f"step {step}, {len(saved['G'])} weight tensors")
            loadable += 1
        except Exception as e:  # any failure to load is what this soak looks for
            step = None
            problems.append(f"checkpoint.pt does not load: {type(e).__name__}: {e}")
        resume_text = ""
        if previous is not None:
            resume_checks += 1
            match = CONTINUING.search(output)
            if match and int(match.group(2)) == previous:
                resumed += 1
                resume_text = f", resumed from step {previous}"
            else:
                problems.append(f"expected 'Continuing from ... at step {previous}', got "
                                f"{match.group(0) if match else 'no such line'}")
        print(f"round {kill + 1:2d}: killed {sleep:.2f} s after its first checkpoint; checkpoint.pt "
              f"{'loads, step ' + str(step) if step is not None else 'BROKEN'}{resume_text}"
              + ("" if not problems else "  <-- " + "; ".join(problems)), flush=True)
        if problems:
            print("  output tail: " + "\n  ".join(output.strip().splitlines()[-8:]), flush=True)
        if step is not None:
            previous = step
    final_ok = False
    if previous is not None:
        result = subprocess.run([a if a != "100000000" else str(previous + 2) for a in cmd]
                                + ["--checkpoint_to_continue", ckpt], cwd=work, env=env, capture_output=True, text=True,
                                timeout=300)
        match = CONTINUING.search(result.stdout)
        final_step = int(load(ckpt)["step"]) if result.returncode == 0 else None
        final_ok = bool(match) and int(match.group(2)) == previous and final_step == previous + 2
        print(f"final run: continued from step {match.group(2) if match else '?'} and finished at step {final_step} "
              f"(expected {previous} -> {previous + 2}): {'ok' if final_ok else 'FAILED'}")
        if not final_ok:
            print(result.stdout[-2000:] + result.stderr[-2000:])
    print(f"{loadable}/{args.rounds} loadable, {resumed}/{resume_checks} resumed from the saved step")
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if loadable == args.rounds and resumed == resume_checks and final_ok else 1


if __name__ == "__main__":
    sys.exit(main())
