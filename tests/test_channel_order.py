"""Channel orders end to end (SPEC "The user-module protocol" and "Checkpoints").

The data's order is the user module's CHANNEL_ORDER ("RGB" by default); a checkpoint without a record is the
original's (BGR). Every network sees images in its own recorded order: the batch is flipped on the way in
where the orders differ; a student keeps its teacher's order, a continued run its file's.

Each script-level test runs one file three times with tests/colour_u.py (a UNet with random weights that
notices swapped channels, and RGB images with a red cast):
  A  the file without a record (BGR) on the RGB data: the scripts must flip every batch;
  B  the same file on the same images stored as BGR, CHANNEL_ORDER = "BGR": nothing to flip;
  C  the same weights recorded as RGB on the RGB data: what A would do without the flip.
A and B must write the same weights and record BGR; C must differ from A (so A = B is not luck).
"""
import os

import pytest
import torch

import colour_u
from cli import UserError
from conftest import REFERENCE
from user_modules import data_channel_order, to_channel_order

BGR_MODULE = '''"""tests/colour_u.py with its images stored as BGR."""
import colour_u
from colour_u import make_model

CHANNEL_ORDER = "BGR"


def make_dataset():
    return [(x.flip(0), y) for x, y in colour_u.make_dataset()]
'''
FAST = ["--num_workers", "0", "--device", "cpu", "--batch_size", 4, "--num_iters", 2, "--lr", 1e-3, "--seed", 3]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny networks: a second thread only waits (and much longer on a busy machine)


def reference_weights():
    case = torch.load(os.path.join(REFERENCE, "unet_tiny_cases.pt"), weights_only=True)[0]
    assert case["name"] == "a" and case["config"] == colour_u.CONFIG
    return case["G"]


@pytest.fixture
def files(tmp_path):
    """colour_bgr_u.py, original.pt (8 steps, no records: the original's, BGR) and rgb.pt (recorded RGB)."""
    (tmp_path / "colour_bgr_u.py").write_text(BGR_MODULE)
    weights = reference_weights()
    torch.save({"G": weights, "n_timesteps": 8, "time_scale": 1}, tmp_path / "original.pt")
    torch.save({"G": weights, "n_timesteps": 8, "time_scale": 1, "time_labels": "aligned", "channel_order": "RGB"},
               tmp_path / "rgb.pt")
    return tmp_path


def load(tmp_path, dname):
    return torch.load(tmp_path / "checkpoints" / "c" / dname / "checkpoint.pt", weights_only=True)


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_three_runs(tmp_path, key):
    a, b, c = (load(tmp_path, dname) for dname in "abc")
    assert (a["channel_order"], b["channel_order"], c["channel_order"]) == ("BGR", "BGR", "RGB")
    assert max_difference(a[key], b[key]) < 1e-6  # A's network saw exactly B's BGR batches
    assert max_difference(a[key], c[key]) > 1e-4  # fed RGB instead, it learns something else


def test_distilling_an_unrecorded_teacher_feeds_it_and_its_student_bgr(run, files):
    for dname, module, teacher in (("a", "colour_u", "original.pt"), ("b", "colour_bgr_u", "original.pt"),
                                   ("c", "colour_u", "rgb.pt")):
        run("distillate.py", "--module", module, "--name", "c", "--dname", dname, "--base_checkpoint", teacher, *FAST,
            env_extra=ONE_THREAD)
    check_three_runs(files, "G")  # the student (no EMA: G holds its raw weights) keeps its teacher's order


def test_continuing_an_unrecorded_file_keeps_bgr(run, files):
    for dname, module, source in (("a", "colour_u", "original.pt"), ("b", "colour_bgr_u", "original.pt"),
                                  ("c", "colour_u", "rgb.pt")):
        run("train.py", "--module", module, "--name", "c", "--dname", dname, "--num_timesteps", 8,
            "--checkpoint_to_continue", source, *FAST, env_extra=ONE_THREAD)
    check_three_runs(files, "model")  # the raw weights; G is their EMA
    check_three_runs(files, "G")


def test_a_new_run_records_the_data_order(run, files):
    run("train.py", "--module", "colour_bgr_u", "--name", "c", "--dname", "new", "--num_timesteps", 8, *FAST,
        env_extra=ONE_THREAD)
    assert load(files, "new")["channel_order"] == "BGR"


def test_to_channel_order_flips_three_channel_images_only():
    rgb = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    bgr = to_channel_order(rgb, "RGB", "BGR")
    assert torch.equal(bgr[:, 0], rgb[:, 2]) and torch.equal(bgr[:, 1], rgb[:, 1]) and torch.equal(bgr[:, 2], rgb[:, 0])
    assert torch.equal(to_channel_order(bgr, "BGR", "RGB"), rgb)
    assert to_channel_order(rgb, "RGB", "RGB") is rgb and to_channel_order(rgb, "BGR", "BGR") is rgb
    for channels in (1, 2, 4):
        other = torch.randn(2, channels, 2, 2)
        assert to_channel_order(other, "RGB", "BGR") is other


def test_data_channel_order_defaults_to_rgb_and_checks_the_value():
    class Module:
        __name__ = "m"

    assert data_channel_order(Module()) == "RGB"
    for order in ("RGB", "BGR"):
        Module.CHANNEL_ORDER = order
        assert data_channel_order(Module()) == order
    Module.CHANNEL_ORDER = "rgb"
    with pytest.raises(UserError, match="m.CHANNEL_ORDER is 'rgb'"):
        data_channel_order(Module())
