"""The shipped digits checkpoints are what bench/reproduce_digits.sh makes: their stored arguments are
the script's command lines, parsed by today's parsers, and each stage is the student of the one before."""
import os
import shlex

import pytest
import torch

from conftest import ROOT
from train_utils import distill_argument_parser, train_argument_parser

SHIPPED = os.path.join(ROOT, "checkpoints", "digits")
SCRIPT = os.path.join(ROOT, "bench", "reproduce_digits.sh")
STAGES = ["original"] + [f"base_{k}" for k in range(7)]


def script_commands():
    """{script name: argv} of the python commands in reproduce_digits.sh, with its default variables."""
    with open(SCRIPT) as f:
        text = f.read().replace("\\\n", " ")
    variables = {"$PY": "python", '"$RUN"': "digits_run", "$RUN": "digits_run", '"$OUT"': "checkpoints/digits"}
    commands = {}
    for line in text.splitlines():
        if not line.startswith("$PY "):
            continue
        for name, value in variables.items():
            line = line.replace(name, value)
        words = shlex.split(line)
        commands.setdefault(words[1], words[2:])
    return commands


def given_flags(argv):
    return {word[2:] for word in argv if word.startswith("--")}


def load(stage):
    return torch.load(os.path.join(SHIPPED, stage, "checkpoint.pt"), weights_only=True)


@pytest.mark.parametrize("stage", STAGES)
def test_stored_arguments_equal_the_scripts(stage):
    commands = script_commands()
    script = "train.py" if stage == "original" else "distillate.py"
    argv = commands[script]
    parser = train_argument_parser("") if script == "train.py" else distill_argument_parser("")
    expected = vars(parser.parse_args(argv))
    stored = load(stage)["args"]
    assert given_flags(argv) <= stored.keys(), "a flag of the script is missing from the stored arguments"
    differing = {k: (stored[k], expected[k]) for k in stored.keys() & expected.keys() if stored[k] != expected[k]}
    assert not differing, f"{stage}: stored arguments differ from bench/reproduce_digits.sh: {differing}"


def test_each_stage_is_the_finished_student_of_the_one_before():
    base = load("original")
    assert (base["n_timesteps"], base["time_scale"], base["step"]) == (128, 1, base["args"]["num_iters"])
    for k in range(7):
        ckpt = load(f"base_{k}")
        teacher = f"checkpoints/digits_run/{'original' if k == 0 else f'base_{k - 1}'}/checkpoint.pt"
        assert ckpt["teacher"]["path"] == teacher
        assert (ckpt["n_timesteps"], ckpt["time_scale"]) == (128 // 2 ** (k + 1), 2 ** (k + 1))
        assert ckpt["step"] == ckpt["args"]["num_iters"]
        assert ckpt["time_labels"] == "aligned" and ckpt["channel_order"] == "RGB"
