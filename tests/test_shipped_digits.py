"""The shipped digits checkpoints are what bench/reproduce_digits.sh and bench/reproduce_digits_cond.sh
make: their stored arguments are the scripts' command lines, parsed by today's parsers, and each stage is
the student of the one before. The guided models' accuracy in checkpoints/digits_cond/evaluation.csv is
recomputed from their samples."""
import csv
import os
import shlex

import pytest
import torch

import digits_cond_u
import samplers
from checkpoints import checkpoint_grid
from conftest import ROOT
from diffusion import grid_indices
from sample_utils import SamplerSpec, generate, spec_grid
from train_flags import distill_argument_parser, train_argument_parser
from user_modules import guided_network, load_model_from_checkpoint

# folder -> (reproduce script, its RUN, stages in chain order)
CHAINS = {"digits": ("reproduce_digits.sh", "digits_run", ["original"] + [f"base_{k}" for k in range(7)]),
          "digits_cond": ("reproduce_digits_cond.sh", "digits_cond_run",
                          ["original", "guided_w"] + [f"guided_{k}" for k in range(7)])}
CASES = [(folder, stage) for folder, (_, _, stages) in CHAINS.items() for stage in stages]


def shipped(folder):
    return os.path.join(ROOT, "checkpoints", folder)


def script_commands(folder):
    """{script name: argv} of the python commands in the folder's reproduce script, with its default variables."""
    script, run, _ = CHAINS[folder]
    with open(os.path.join(ROOT, "bench", script)) as f:
        text = f.read().replace("\\\n", " ")
    variables = {"$PY": "python", '"$RUN"': run, "$RUN": run, '"$OUT"': f"checkpoints/{folder}"}
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


def load(folder, stage):
    return torch.load(os.path.join(shipped(folder), stage, "checkpoint.pt"), weights_only=True)


@pytest.mark.parametrize("folder, stage", CASES)
def test_stored_arguments_equal_the_scripts(folder, stage):
    argv = script_commands(folder)["train.py" if stage == "original" else "distillate.py"]
    parser = train_argument_parser("") if stage == "original" else distill_argument_parser("")
    expected = vars(parser.parse_args(argv))
    if stage.endswith("_w"):  # stage one of guidance distillation runs, and records, --guidance_num_iters steps
        expected["num_iters"] = expected["guidance_num_iters"]
    stored = load(folder, stage)["args"]
    assert given_flags(argv) <= stored.keys(), "a flag of the script is missing from the stored arguments"
    differing = {k: (stored[k], expected[k]) for k in stored.keys() & expected.keys() if stored[k] != expected[k]}
    assert not differing, f"{folder}/{stage}: stored arguments differ from bench/{CHAINS[folder][0]}: {differing}"


@pytest.mark.parametrize("folder", CHAINS)
def test_each_stage_is_the_finished_student_of_the_one_before(folder):
    _, run, stages = CHAINS[folder]
    base = load(folder, "original")
    assert (base["n_timesteps"], base["time_scale"], base["step"]) == (128, 1, base["args"]["num_iters"])
    halvings = [stage for stage in stages if stage[-1].isdigit()]
    for before, stage in zip(stages, stages[1:]):
        ckpt = load(folder, stage)
        assert ckpt["teacher"]["path"] == f"checkpoints/{run}/{before}/checkpoint.pt"
        halving = halvings.index(stage) + 1 if stage in halvings else 0
        assert (ckpt["n_timesteps"], ckpt["time_scale"]) == (128 // 2 ** halving, 2 ** halving)
        iters = ckpt["args"]["guidance_num_iters"] if stage.endswith("_w") else ckpt["args"]["num_iters"]
        assert ckpt["step"] == iters
        assert ckpt["time_labels"] == "aligned" and ckpt["channel_order"] == "RGB"
    if folder == "digits_cond":
        assert (base["num_classes"], base["null_label"], base["cond_drop_prob"]) == (10, 10, 0.1)
        assert "guidance_range" not in base
        for stage in stages[1:]:
            assert load(folder, stage)["guidance_range"] == [0.0, 4.0]


def evaluation_rows():
    path = os.path.join(shipped("digits_cond"), "evaluation.csv")
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r["model"] == "distilled" and r["steps"] in ("4", "1")]


@pytest.mark.parametrize("steps", ["4", "1"])
def test_shipped_guided_students_accuracy_recomputed_from_their_samples(steps):
    """evaluate.py's accuracy of the 4- and 1-step guided students at every w: the same 1,000 images (image i asked
    for class i mod 10, noise from seed 0 and i) drawn here and classified by the digits classifier."""
    rows = [r for r in evaluation_rows() if r["steps"] == steps]
    assert {float(r["w"]) for r in rows} == {0.0, 0.5, 1.0, 2.0, 4.0}
    model, ckpt = load_model_from_checkpoint(digits_cond_u, os.path.join(ROOT, rows[0]["checkpoint"]), "cpu")
    model.to(memory_format=torch.channels_last)
    net, spec = guided_network(model, ckpt), SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})
    classifier = digits_cond_u.make_classifier()
    n = int(rows[0]["n_samples"])
    labels = torch.arange(n) % 10
    for row in rows:
        images = generate(net, spec_grid(spec, ckpt), spec, range(n), [1, 8, 8], 0,
                          extra_args={"y": labels, "w": float(row["w"])}, chunk_size=n, channels_last=True)
        with torch.no_grad():
            accuracy = (classifier(images.clamp(-1, 1)).argmax(1) == labels).double().mean().item()
        assert abs(accuracy - float(row["accuracy"])) <= 2 / n, (row["w"], accuracy, row["accuracy"])


EPS_CHAINS = {"base": ["original", "base_v"] + [f"base_{k}" for k in range(7)],
              "x": ["original", "x_x"] + [f"x_{k}" for k in range(4)]}


def eps_distil_commands():
    """{dname: argv} of the distillate.py commands of bench/reproduce_digits_eps.sh (its DISTIL array expanded)."""
    with open(os.path.join(ROOT, "bench", "reproduce_digits_eps.sh")) as f:
        text = f.read().replace("\\\n", " ")
    variables = {"$PY": "python", '"$RUN"': "digits_eps_run", "$RUN": "digits_eps_run",
                 '"$OUT"': "checkpoints/digits_eps", "$OUT": "checkpoints/digits_eps"}
    for name, value in variables.items():
        text = text.replace(name, value)
    distil = shlex.split(text.split("DISTIL=(", 1)[1].split(")", 1)[0])
    commands = {}
    for line in text.splitlines():
        if "distillate.py" not in line or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.replace('"${DISTIL[@]}"', "").rstrip("& "))
        words = words[1:] if words and words[0].startswith("OMP_NUM_THREADS=") else words
        if words[:2] == ["python", "distillate.py"]:
            words = distil + words[2:]
            commands[words[words.index("--dname") + 1]] = words
    return commands


# What does not change the change of prediction: the first stage of each chain may come from a run with other values
# (the v copy was trained in a run of its own, then continued by the script's command, which found it finished).
NOT_OF_THE_COPY = {"name", "num_stages", "teacher_steps", "num_iters"}


@pytest.mark.parametrize("dname", EPS_CHAINS)
def test_the_eps_teacher_chains_are_what_their_script_makes(dname):
    """The linear eps teacher (1000 steps) and each chain: the stored arguments are the script's, each stage is
    the finished student of the one before, on every other one of the points its teacher was sampled on (--halving_grid,
    --teacher_steps)."""
    argv = eps_distil_commands()[dname]
    expected = vars(distill_argument_parser("").parse_args(argv))
    base = load("digits_eps", "original")
    assert (base["prediction"], base["schedule"]["name"], base["n_timesteps"]) == ("eps", "linear", 1000)
    assert base["grid"] == list(range(999, -1, -1))
    stages = EPS_CHAINS[dname]
    for before, stage in zip(stages, stages[1:]):
        ckpt = load("digits_eps", stage)
        run = "digits_eps" if before == "original" else "digits_eps_run"  # the float16 teacher, then the run's files
        assert ckpt["teacher"]["path"] == f"checkpoints/{run}/{before}/checkpoint.pt"
        stored = ckpt["args"]
        ignored = NOT_OF_THE_COPY if stage == stages[1] else {"num_iters"}
        differing = {k: (stored[k], expected[k]) for k in stored.keys() & expected.keys()
                     if stored[k] != expected[k] and k not in ignored}
        assert not differing, (stage, differing)
        assert ckpt["step"] == (expected["prediction_num_iters"] if stage == stages[1] else expected["num_iters"])
        assert ckpt["prediction"] == dname if dname == "x" else ckpt["prediction"] == "v"
        assert torch.equal(ckpt["schedule"]["betas"], base["schedule"]["betas"])
        if stage == stages[1]:
            assert ckpt["grid"] == base["grid"]
        else:
            teacher = load("digits_eps", before)
            sampled = teacher["grid"]  # a student's teacher: all its points; the copy: --teacher_steps of them
            if before.endswith("_v") or before.endswith("_x"):
                grid = checkpoint_grid(teacher)
                spacing = {"cosine": "cosine", "trailing": "time"}[expected["halving_grid"]]
                steps = samplers.select_steps(grid, expected["teacher_steps"], spacing)
                sampled = [sampled[position] for position in grid_indices(len(grid), steps)]
            assert ckpt["grid"] == sampled[0::2], stage
