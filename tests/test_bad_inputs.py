"""User mistakes: every script answers with one line `error: ...`, a non-zero status, and touches nothing.

Table-driven: each Case is one mistake a user can make with train.py, distillate.py, sample.py,
prepare_data.py or a user module. For each we check that
  * the exit status is 2 (a usage error or a UserError; not a crash, not a signal),
  * there is no "Traceback" anywhere in stdout or stderr,
  * stderr's last non-empty line starts with "error:" and is the only error line (other stderr lines
    are allowed only where a case says so, e.g. a progress bar or "skipped FILE" notes),
  * the message names the problem (a keyword, case-insensitive),
  * every file and folder already in the run folder (a trained checkpoint with its run folder, an
    LMDB data set, an output image, the broken checkpoints themselves) is byte-for-byte unchanged and
    nothing was created (no checkpoint folder, no output file, no half-written data set).

Speed: importing torch costs ~3 s per process, and there are dozens of cases: the scripts run through
tests/fork_server.py, which imports the heavy libraries once and forks a child per run.
`test_fork_server_matches_a_real_process` checks that the fork server reports the same status and output as
a real `python script.py` run.
"""
import dataclasses
import hashlib
import os
import pickle
import random
import re
import shutil
import textwrap

import pytest
import torch
from PIL import Image

import fork_server
from conftest import ROOT

VALID = "checkpoints/toy/base/checkpoint.pt"  # a checkpoint trained by train.py, with its run folder
MARKER_NAME = "UNPICKLED_CODE_RAN"  # created if the crafted pickle's payload ever runs
CELEBA_DATA = os.path.join(ROOT, "data", "celeba_256")

# -- the fork server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    return fork_server.shared()


# -- the run folder every case starts from -----------------------------------------------------

USER_MODULES = {
    "no_model_u.py": "from toy_u import make_dataset  # forgot make_model\n",
    "no_dataset_u.py": "from toy_u import make_model  # forgot make_dataset\n",
    "no_size_u.py": """
        import torch
        from toy_u import make_dataset

        def make_model():
            return torch.nn.Linear(2, 2)  # no image_size attribute
        """,
    "not_a_module_u.py": """
        from toy_u import make_dataset

        def make_model():
            return {"hidden": 128}  # a config, not an nn.Module
        """,
    "empty_data_u.py": """
        import torch
        from toy_u import make_model

        def make_dataset():
            return torch.utils.data.TensorDataset(torch.zeros(0, 2, 1, 1), torch.zeros(0))
        """,
    "missing_dependency_u.py": """
        import nonexistent_package_xyz  # a package the user forgot to install
        from toy_u import make_dataset, make_model
        """,
}


class ArmedPickle:
    """Unpickling this calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path)


def write_run_folder(folder, server, logs, marker):
    """Train a tiny checkpoint and lay out the broken files, modules, images and data sets."""
    folder.mkdir()
    for name, text in USER_MODULES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    train = server.run("train.py", ["--module", "toy_u", "--name", "toy", "--dname", "base", "--num_timesteps", 8,
                                    "--num_iters", 2, "--batch_size", 4, "--num_workers", 0, "--device", "cpu"],
                       cwd=folder, logs=logs)
    assert train.returncode == 0, train.stdout + train.stderr
    valid = torch.load(folder / VALID, weights_only=True)
    g = valid["G"]
    assert valid["n_timesteps"] == 8 and valid["time_scale"] == 1
    ck = folder / "ck"
    save({"G": g, "n_timesteps": 3, "time_scale": 1, "time_labels": "aligned"}, ck / "odd3.pt")
    save({"G": g, "n_timesteps": 1, "time_scale": 8, "time_labels": "aligned"}, ck / "one_step.pt")
    save({"G": g, "n_timesteps": 4, "time_scale": 2, "time_labels": "aligned"}, ck / "student4.pt")
    (ck / "teacher_copy.pt").write_bytes((folder / VALID).read_bytes())  # the same teacher at another path
    linear = torch.linspace(1e-4, 0.02, 8, dtype=torch.float64)
    save({"G": g, "n_timesteps": 1, "time_scale": 8.0, "time_labels": "aligned", "noise_levels": "schedule_grid",
          "grid": [7], "schedule": {"name": "linear", "betas": linear}, "prediction": "v"}, ck / "one_step_grid.pt")
    save({"G": g, "n_timesteps": 8, "time_scale": 1, "time_labels": "aligned", "noise_levels": "schedule_grid",
          "grid": list(range(7, -1, -1)), "schedule": {"name": "linear", "betas": linear}, "prediction": "v"},
         ck / "linear8.pt")
    (ck / "betas_bad.txt").write_text("\n".join(["0.01"] * 7 + ["1.5"]) + "\n")
    (ck / "betas_short.txt").write_text("\n".join(["0.01"] * 5) + "\n")
    distil = server.run("distillate.py", DISTIL_DONE, cwd=folder, logs=logs)
    assert distil.returncode == 0, distil.stdout + distil.stderr
    save(g, ck / "state_dict_only.pt")  # torch.save(model.state_dict(), ...): not a checkpoint dict
    other = {k: torch.zeros([2 * v.shape[0]] + list(v.shape[1:])) if v.ndim else v for k, v in g.items()}
    save({"G": other, "n_timesteps": 8, "time_scale": 1}, ck / "other_model.pt")  # another architecture
    data = (folder / VALID).read_bytes()
    (ck / "truncated.pt").write_bytes(data[:len(data) // 2])
    (ck / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (ck / "notes.pt").write_text("learning rate 5e-5, batch 4: looked fine\n")
    (ck / "empty.pt").write_bytes(b"")
    save({"G": ArmedPickle(str(marker)), "n_timesteps": 8, "time_scale": 1}, ck / "armed.pt")
    # An existing sample grid that failed sample.py runs must leave alone.
    Image.new("RGB", (6, 6), (10, 200, 30)).save(folder / "out.png")
    (folder / "notes.txt").write_text("not a folder\n")
    # Image folders for prepare_data.py, and an existing complete LMDB data set.
    (folder / "images_empty").mkdir()
    (folder / "images_unreadable").mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / "images_unreadable" / name).write_bytes(b"this is not an image")
    (folder / "images_ok").mkdir()
    for name, color in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (12, 10), color).save(folder / "images_ok" / name)
    prepare = server.run("prepare_data.py", ["--size", 8, "--n_worker", 1, "--out", "data/points_lmdb", "images_ok"],
                         cwd=folder, logs=logs)
    assert prepare.returncode == 0, prepare.stdout + prepare.stderr


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, server):
    base = tmp_path_factory.mktemp("bad_inputs")
    marker = base / MARKER_NAME
    logs = base / "logs"
    logs.mkdir()
    folder = base / "template"
    write_run_folder(folder, server, logs, marker)
    # The crafted pickle is armed: plain unpickling runs its payload.
    probe = base / "probe_marker"
    pickle.loads(pickle.dumps({"G": ArmedPickle(str(probe))}))
    assert probe.exists()
    return folder, marker


def snapshot(folder):
    """Every folder and file under `folder`, with a hash of each file's bytes."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        state[rel + "/"] = "folder"
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                state[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return state


def describe_changes(before, after):
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"created {added}, removed {removed}, changed {changed}"


# -- the table -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    id: str
    script: str
    args: list
    keyword: object  # a string, or a tuple of acceptable alternatives (case-insensitive)
    allow: str = ""  # regex of further stderr lines that may come before the error line
    skip: str = ""  # reason to skip on this machine
    repo_absent: tuple = ()  # paths in the repository that must not be created


TRAIN = ["--name", "toy", "--dname", "again", "--num_timesteps", 8, "--num_iters", 2, "--batch_size", 4,
         "--num_workers", 0, "--device", "cpu"]
TOY_TRAIN = ["--module", "toy_u"] + TRAIN
DISTIL = ["--module", "toy_u", "--name", "toy", "--dname", "student", "--num_iters", 2, "--batch_size", 4,
          "--num_workers", 0, "--device", "cpu"]
DISTIL_DONE = ["--module", "toy_u", "--name", "toy", "--dname", "student_done", "--base_checkpoint", VALID,
               "--num_iters", 2, "--batch_size", 4, "--num_workers", 0, "--device", "cpu"]  # a finished stage
SAMPLE = ["--module", "toy_u", "--device", "cpu", "--batch_size", 2]
PREP = ["--n_worker", 1]
PROGRESS = r".*\d+%\|"  # a tqdm bar, should a script sample (or read images) before it fails
SKIPPED = r"skipped |" + PROGRESS  # prepare_data.py's notes on unreadable images
NOT_A_CHECKPOINT = ("not a pytorch checkpoint", "not a checkpoint", "corrupt", "truncated")

CASES = [
    # train.py: the user module
    Case("train_unknown_module", "train.py", ["--module", "no_such_module_u"] + TRAIN, "no user module"),
    Case("train_module_without_make_model", "train.py", ["--module", "no_model_u"] + TRAIN, "make_model"),
    Case("train_module_without_make_dataset", "train.py", ["--module", "no_dataset_u"] + TRAIN, "make_dataset"),
    Case("train_model_without_image_size", "train.py", ["--module", "no_size_u"] + TRAIN, "image_size"),
    Case("train_make_model_returns_no_module", "train.py", ["--module", "not_a_module_u"] + TRAIN, "nn.Module"),
    Case("train_module_missing_dependency", "train.py", ["--module", "missing_dependency_u"] + TRAIN,
         "nonexistent_package_xyz"),
    Case("train_empty_dataset", "train.py", ["--module", "empty_data_u"] + TRAIN, "empty"),
    Case("train_celeba_without_data", "train.py", ["--module", "celeba_u"] + TRAIN, "celeba_256",
         skip="data/celeba_256 exists in the repository" if os.path.exists(CELEBA_DATA) else "",
         repo_absent=(CELEBA_DATA,)),
    # train.py: the checkpoint to continue
    Case("train_continue_missing_file", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/nowhere.pt"],
         "does not exist"),
    Case("train_continue_from_a_folder", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "checkpoints/toy/base"],
         ("folder", "directory", "not a file", "does not exist")),
    Case("train_continue_truncated", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/truncated.pt"],
         "truncated"),
    Case("train_continue_random_bytes", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/random.pt"],
         NOT_A_CHECKPOINT),
    Case("train_continue_text_file", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/notes.pt"],
         NOT_A_CHECKPOINT),
    Case("train_continue_empty_file", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/empty.pt"],
         ("empty", "truncated")),
    Case("train_continue_code_running_pickle", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/armed.pt"],
         "refus"),
    Case("train_continue_other_model", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/other_model.pt"],
         "do not fit"),
    Case("train_continue_plain_state_dict", "train.py",
         TOY_TRAIN + ["--checkpoint_to_continue", "ck/state_dict_only.pt"], "n_timesteps"),
    Case("train_continue_other_num_timesteps", "train.py",
         ["--module", "toy_u", "--name", "toy", "--dname", "again", "--num_timesteps", 16, "--num_iters", 2,
          "--batch_size", 4, "--num_workers", 0, "--device", "cpu", "--checkpoint_to_continue", VALID], "num_timesteps"),
    Case("train_continue_distilled_model", "train.py", TOY_TRAIN + ["--checkpoint_to_continue", "ck/student4.pt"],
         "time scale"),
    # train.py: flags
    Case("train_batch_size_0", "train.py", TOY_TRAIN + ["--batch_size", 0], "batch_size"),
    Case("train_num_iters_negative", "train.py", TOY_TRAIN + ["--num_iters", -1], "num_iters"),
    Case("train_num_timesteps_0", "train.py", TOY_TRAIN + ["--num_timesteps", 0], "num_timesteps"),
    Case("train_compile_maybe", "train.py", TOY_TRAIN + ["--compile", "maybe"], "compile"),
    Case("train_unknown_scheduler", "train.py", TOY_TRAIN + ["--scheduler", "StrategyWarmRestarts"], "scheduler"),
    Case("train_unknown_diffusion", "train.py", TOY_TRAIN + ["--diffusion", "GaussianDiffusionV2"], "diffusion"),
    Case("train_device_cuda_without_gpu", "train.py", TOY_TRAIN + ["--device", "cuda"], "cuda",
         skip="this machine has CUDA" if torch.cuda.is_available() else ""),
    Case("train_unknown_device", "train.py", TOY_TRAIN + ["--device", "gpu0"], "device"),
    Case("train_without_name", "train.py", ["--module", "toy_u", "--dname", "again", "--device", "cpu"], "--name"),
    Case("train_lr_0", "train.py", TOY_TRAIN + ["--lr", 0], "--lr"),
    Case("train_lr_nan", "train.py", TOY_TRAIN + ["--lr", "nan"], "--lr"),
    Case("train_ema_decay_1", "train.py", TOY_TRAIN + ["--ema_decay", 1], "--ema_decay"),
    Case("train_grad_clip_negative", "train.py", TOY_TRAIN + ["--grad_clip", -1], "--grad_clip"),
    Case("train_warmup_negative", "train.py", TOY_TRAIN + ["--warmup", -100], "--warmup"),
    Case("train_weight_decay_negative", "train.py", TOY_TRAIN + ["--weight_decay", -0.01], "--weight_decay"),
    Case("train_log_interval_0", "train.py", TOY_TRAIN + ["--log_interval", 0], "--log_interval"),
    Case("train_ckpt_interval_negative", "train.py", TOY_TRAIN + ["--ckpt_interval", -30], "--ckpt_interval"),
    Case("train_save_every_negative", "train.py", TOY_TRAIN + ["--save_every", -1], "--save_every"),
    Case("train_keep_last_negative", "train.py", TOY_TRAIN + ["--keep_last", -2], "--keep_last"),
    Case("train_stop_at_negative", "train.py", TOY_TRAIN + ["--stop_at", -5], "--stop_at"),
    Case("train_num_workers_minus_2", "train.py", TOY_TRAIN + ["--num_workers", -2], "--num_workers"),
    Case("train_seed_beyond_64_bits", "train.py", TOY_TRAIN + ["--seed", 2 ** 64], "--seed"),
    Case("train_one_cycle_with_warmup", "train.py", TOY_TRAIN + ["--scheduler", "StrategyOneCycle", "--warmup", 100],
         "--warmup"),
    Case("train_cosine_annel_with_weight_decay", "train.py",
         TOY_TRAIN + ["--scheduler", "StrategyCosineAnnel", "--weight_decay", 0.01], "--weight_decay"),
    Case("train_continue_adamw_run_with_sgd", "train.py",
         TOY_TRAIN + ["--checkpoint_to_continue", VALID, "--scheduler", "StrategyOneCycle"], "SGD"),
    # distillate.py
    Case("distil_odd_step_teacher", "distillate.py", DISTIL + ["--base_checkpoint", "ck/odd3.pt"], "even"),
    Case("distil_one_step_teacher", "distillate.py", DISTIL + ["--base_checkpoint", "ck/one_step.pt"], "even"),
    Case("distil_missing_base_checkpoint", "distillate.py", DISTIL + ["--base_checkpoint", "ck/nowhere.pt"],
         "does not exist"),
    Case("distil_no_base_checkpoint_flag", "distillate.py", DISTIL, "base_checkpoint"),
    Case("distil_continue_steps_mismatch", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--checkpoint_to_continue", VALID], "student"),
    Case("distil_teacher_of_another_model", "distillate.py", DISTIL + ["--base_checkpoint", "ck/other_model.pt"],
         "do not fit"),
    Case("distil_code_running_pickle", "distillate.py", DISTIL + ["--base_checkpoint", "ck/armed.pt"], "refus"),
    Case("distil_truncated_teacher", "distillate.py", DISTIL + ["--base_checkpoint", "ck/truncated.pt"], "truncated"),
    Case("distil_num_stages_0", "distillate.py", DISTIL + ["--base_checkpoint", VALID, "--num_stages", 0],
         "num_stages"),
    Case("distil_gamma_with_truncated_snr", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--weighting", "truncated_snr", "--gamma", 1], "--gamma"),
    Case("distil_gamma_nan", "distillate.py", DISTIL + ["--base_checkpoint", VALID, "--gamma", "nan"], "--gamma"),
    Case("distil_ema_decay_negative", "distillate.py", DISTIL + ["--base_checkpoint", VALID, "--ema_decay", -0.9],
         "--ema_decay"),
    Case("distil_rerun_stage_with_another_teacher_file", "distillate.py",
         DISTIL_DONE[:DISTIL_DONE.index("--base_checkpoint")] + ["--base_checkpoint", "ck/teacher_copy.pt"]
         + DISTIL_DONE[DISTIL_DONE.index("--base_checkpoint") + 2:], "student of"),
    Case("distil_rerun_stage_with_a_teacher_of_other_steps", "distillate.py",
         DISTIL_DONE[:DISTIL_DONE.index("--base_checkpoint")] + ["--base_checkpoint", "ck/student4.pt"]
         + DISTIL_DONE[DISTIL_DONE.index("--base_checkpoint") + 2:], "student of"),
    Case("distil_plain_gaussian_diffusion", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--diffusion", "GaussianDiffusion"], "diffusion"),
    # schedules and parameterisations
    Case("train_unknown_schedule", "train.py", TOY_TRAIN + ["--schedule", "quadratic"], "schedule"),
    Case("train_beta_end_below_beta_start", "train.py",
         TOY_TRAIN + ["--schedule", "linear", "--beta_start", 0.02, "--beta_end", 0.01], "beta_start"),
    Case("train_beta_of_1_5_in_the_table", "train.py", TOY_TRAIN + ["--schedule", "table", "--betas", "ck/betas_bad.txt"],
         "(0, 1)"),
    Case("train_beta_table_of_the_wrong_length", "train.py",
         TOY_TRAIN + ["--schedule", "table", "--betas", "ck/betas_short.txt"], "holds 5 betas"),
    Case("train_table_without_betas", "train.py", TOY_TRAIN + ["--schedule", "table"], "--betas"),
    Case("train_betas_with_a_named_schedule", "train.py", TOY_TRAIN + ["--betas", "ck/betas_short.txt"], "--betas"),
    Case("train_beta_start_with_cosine", "train.py", TOY_TRAIN + ["--beta_start", 0.001], "beta_start"),
    Case("train_unknown_prediction", "train.py", TOY_TRAIN + ["--prediction", "noise"], "prediction"),
    Case("train_zero_terminal_snr_with_eps", "train.py",
         TOY_TRAIN + ["--schedule", "linear", "--zero_terminal_snr", "True", "--prediction", "eps"], "eps"),
    Case("train_continue_with_another_schedule", "train.py",
         TOY_TRAIN + ["--checkpoint_to_continue", VALID, "--schedule", "linear"], "schedule"),
    Case("train_continue_with_another_prediction", "train.py",
         TOY_TRAIN + ["--checkpoint_to_continue", VALID, "--prediction", "eps"], "predicts"),
    Case("distil_schedule_contradicting_the_record", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--schedule", "linear"], "schedule"),
    Case("distil_teacher_prediction_contradicting_the_record", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--teacher_prediction", "eps"], "records"),
    Case("distil_betas_without_schedule", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--betas", "ck/betas_short.txt"], "--schedule"),
    Case("distil_unrecorded_linear_teacher_that_is_a_student", "distillate.py",
         DISTIL + ["--base_checkpoint", "ck/student4.pt", "--schedule", "linear"], "base model"),
    Case("distil_a_one_step_grid_teacher", "distillate.py", DISTIL + ["--base_checkpoint", "ck/one_step_grid.pt"],
         "at least 2"),
    Case("distil_no_stage_at_all", "distillate.py", DISTIL + ["--base_checkpoint", VALID, "--num_stages", 0],
         "nothing to do"),
    Case("distil_teacher_steps_not_a_power_of_two", "distillate.py",
         DISTIL + ["--base_checkpoint", "ck/linear8.pt", "--teacher_steps", 6], "power of two"),
    Case("distil_teacher_steps_above_the_teachers", "distillate.py",
         DISTIL + ["--base_checkpoint", "ck/linear8.pt", "--teacher_steps", 16], "teacher's 8 steps"),
    Case("distil_teacher_steps_of_an_own_table_teacher", "distillate.py",
         DISTIL + ["--base_checkpoint", VALID, "--teacher_steps", 4], "own cosine table"),
    # sample.py
    Case("sample_time_scale_not_dividing", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png", "--time_scale", 3], "time_scale"),
    Case("sample_time_scale_0", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png", "--time_scale", 0], "time_scale"),
    Case("sample_batch_size_0", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png", "--batch_size", 0], "batch_size"),
    Case("sample_missing_checkpoint", "sample.py", SAMPLE + ["--checkpoint", "ck/nowhere.pt", "--out_file", "out.png"],
         "does not exist"),
    Case("sample_clipped_sampling_maybe", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png", "--clipped_sampling", "maybe"], "clipped_sampling"),
    Case("sample_no_output_requested", "sample.py", SAMPLE + ["--checkpoint", VALID], "out_file"),
    Case("sample_checkpoint_of_another_model", "sample.py",
         SAMPLE + ["--checkpoint", "ck/other_model.pt", "--out_file", "out.png"], "do not fit"),
    Case("sample_code_running_pickle", "sample.py", SAMPLE + ["--checkpoint", "ck/armed.pt", "--out_file", "out.png"],
         "refus"),
    Case("sample_random_bytes", "sample.py", SAMPLE + ["--checkpoint", "ck/random.pt", "--out_file", "out.png"],
         NOT_A_CHECKPOINT),
    Case("sample_unknown_channel_order", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png", "--channel_order", "GBR"], "channel_order"),
    Case("sample_out_file_inside_a_file", "sample.py",
         SAMPLE + ["--checkpoint", VALID, "--out_file", "out.png/grid.png"], "out.png", allow=PROGRESS),
    Case("sample_out_file_without_extension", "sample.py", SAMPLE + ["--checkpoint", VALID, "--out_file", "grid"],
         ("extension", "format", ".png"), allow=PROGRESS),
    # prepare_data.py
    Case("prepare_missing_folder", "prepare_data.py", PREP + ["--size", 8, "--out", "data/new_lmdb", "no_images"],
         "not found"),
    Case("prepare_empty_folder_over_existing_data", "prepare_data.py",
         PREP + ["--size", 8, "--out", "data/points_lmdb", "--overwrite", "True", "images_empty"], "no images"),
    Case("prepare_size_0", "prepare_data.py", PREP + ["--size", 0, "--out", "data/new_lmdb", "images_unreadable"],
         "size"),
    Case("prepare_size_not_a_number", "prepare_data.py",
         PREP + ["--size", "128,big", "--out", "data/new_lmdb", "images_unreadable"], "size"),
    Case("prepare_size_negative", "prepare_data.py", PREP + ["--size", -8, "--out", "data/new_lmdb", "images_ok"],
         "size"),
    Case("prepare_n_worker_negative", "prepare_data.py",
         ["--n_worker", -1, "--size", 8, "--out", "data/new_lmdb", "images_ok"], "n_worker"),
    Case("prepare_overwrite_maybe", "prepare_data.py",
         PREP + ["--size", 8, "--out", "data/points_lmdb", "--overwrite", "maybe", "images_ok"], "overwrite"),
    Case("prepare_n_worker_0", "prepare_data.py",
         ["--n_worker", 0, "--size", 8, "--out", "data/new_lmdb", "images_unreadable"], "n_worker"),
    Case("prepare_out_is_a_file", "prepare_data.py", PREP + ["--size", 8, "--out", "notes.txt", "images_unreadable"],
         "not a folder"),
    Case("prepare_existing_data_without_overwrite", "prepare_data.py",
         PREP + ["--size", 8, "--out", "data/points_lmdb", "images_unreadable"], "overwrite"),
    Case("prepare_only_unreadable_images_into_new_out", "prepare_data.py",
         PREP + ["--size", 8, "--out", "data/new_lmdb", "images_unreadable"], "could be read", allow=SKIPPED),
    Case("prepare_only_unreadable_images_over_existing_data", "prepare_data.py",
         PREP + ["--size", 8, "--out", "data/points_lmdb", "--overwrite", "True", "images_unreadable"],
         "could be read", allow=SKIPPED),
]


def check_one_line_error(case, result):
    """Return the error line, after checking the status and the shape of the output."""
    output = f"status {result.returncode}\n--- stdout:\n{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, f"expected exit status 2, got {output}"
    assert "Traceback" not in result.stdout + result.stderr, f"a traceback instead of a one-line error:\n{output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, f"nothing on stderr:\n{output}"
    error = lines[-1]
    assert error.startswith("error:"), f"stderr's last line is not 'error: ...':\n{output}"
    others = lines[:-1]
    if case.allow:
        others = [line for line in others if not re.match(case.allow, line)]
    assert not others, f"the error takes more than one line of stderr:\n{output}"
    return error


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, server, run_folder, tmp_path):
    if case.skip:
        pytest.skip(case.skip)
    template, marker = run_folder
    cwd = tmp_path / "run"
    shutil.copytree(template, cwd)
    before = snapshot(cwd)

    result = server.run(case.script, case.args, cwd=cwd, logs=tmp_path)

    error = check_one_line_error(case, result)
    keywords = case.keyword if isinstance(case.keyword, tuple) else (case.keyword,)
    assert any(k.lower() in error.lower() for k in keywords), f"{error!r} names none of {keywords}"
    after = snapshot(cwd)
    assert after == before, f"files on disk changed: {describe_changes(before, after)}"
    assert not marker.exists(), "the crafted checkpoint's code ran while it was loaded"
    for path in case.repo_absent:
        assert not os.path.exists(path), f"{path} was created"


def test_there_are_enough_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 50
    assert {c.script for c in CASES} == {"train.py", "distillate.py", "sample.py", "prepare_data.py"}


def test_fork_server_matches_a_real_process(server, run, tmp_path):
    """The fork server reports what `python script.py ...` reports (status, stderr); and it shows tracebacks."""
    args = ["--module", "toy_u", "--checkpoint", "x.pt", "--out_file", "out.png", "--time_scale", "0"]
    real = run("sample.py", *args, check=False, fresh=True)
    forked = server.run("sample.py", args, cwd=tmp_path, logs=tmp_path)
    assert (forked.returncode, forked.stderr, forked.stdout) == (real.returncode, real.stderr, real.stdout)
    assert real.returncode == 2 and real.stderr.startswith("error:")
    crash = tmp_path / "crash.py"
    crash.write_text("raise RuntimeError('boom')\n")
    forked = server.run(str(crash), [], cwd=tmp_path, logs=tmp_path)
    assert forked.returncode == 1 and "Traceback" in forked.stderr and "RuntimeError: boom" in forked.stderr
