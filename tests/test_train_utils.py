"""Pieces of the training loop: the learning rate as a function of the step (and the original's
optimizers), the resumable sampler, the EMA warm-up, crash-safe saving helpers, flags, layering."""
import argparse
import ast
import glob
import io
import itertools
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from cli import UserError, str2bool
from conftest import ROOT
from runtime import RunContext
from script_utils import clean_state_dict
from train_utils import (EMA, InfiniteShardSampler, Trainer, distill_argument_parser, get_lr, one_cycle,
                         train_argument_parser)


def test_learning_rate_schedules():
    assert get_lr(0, 1.0, 100, "linear") == 1.0
    assert get_lr(50, 1.0, 100, "linear") == 0.5
    assert get_lr(99, 1.0, 100, "linear") == pytest.approx(0.01)
    assert get_lr(100, 1.0, 100, "linear") == 0.0
    assert get_lr(0, 1.0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert get_lr(9, 1.0, 100, "constant", warmup=10) == 1.0
    assert get_lr(50, 1.0, 100, "cosine") == pytest.approx(0.5)
    assert get_lr(100, 1.0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    # onecycle: from 1/25 up to 1 at 30% of the run, then half a cosine: 0.5 at 65%, 0 at the end
    assert get_lr(0, 1.0, 100, "onecycle") == pytest.approx(0.04)
    assert get_lr(30, 1.0, 100, "onecycle") == pytest.approx(1.0)
    assert get_lr(65, 1.0, 100, "onecycle") == pytest.approx(0.5)
    assert get_lr(100, 1.0, 100, "onecycle") == pytest.approx(0.0, abs=1e-12)
    for step in range(101):
        assert get_lr(step, 1.0, 100, "StrategyConstantLR") == get_lr(step, 1.0, 100, "constant") == 1.0
        assert get_lr(step, 1.0, 100, "StrategyLinearLR") == 1 - step / 100
    with pytest.raises(ValueError):
        get_lr(0, 1.0, 10, "bogus")


def test_sampler_resumes_where_it_stopped_and_ranks_share_out_each_epoch():
    whole = list(itertools.islice(iter(InfiniteShardSampler(10, seed=3)), 35))
    resumed = list(itertools.islice(iter(InfiniteShardSampler(10, seed=3, start=17)), 18))
    assert whole[17:] == resumed
    indices = [index for index, _ in whole]
    assert sorted(indices[:10]) == list(range(10)) and indices[:10] != indices[10:20]
    ranks = [[index for index, _ in itertools.islice(iter(InfiniteShardSampler(10, seed=3, rank=r, world_size=2)), 5)]
             for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


def test_ema_warm_up_follows_the_model_early_and_averages_later():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0)  # decay min(0.999, 1/10) = 0.1: mostly the new weights
    assert ema.model.weight.item() == pytest.approx(0.1 * 0.5 + 0.9 * 1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, 10 ** 6)  # decay 0.999
    assert ema.model.weight.item() == pytest.approx(0.999 * 0.95 + 0.001 * 2.0)


def test_state_dict_prefixes_are_removed():
    sd = {"module._orig_mod.a": 1, "module.b": 2, "c": 3}
    assert clean_state_dict(sd) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("text,value", [("True", True), ("false", False), ("1", True), ("no", False)])
def test_booleans_parse(text, value):
    assert str2bool(text) is value


def test_non_booleans_are_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


# -- the original's strategies -----------------------------------------------------------------

@pytest.mark.parametrize("total", [1, 7, 300])
def test_original_sgd_strategies_follow_torchs_schedulers(total):
    """Learning rate (and OneCycleLR's momentum) of each optimizer step, exactly as torch's schedulers set
    them in the original's loop: optimizer.step() then scheduler.step()."""
    param = torch.nn.Parameter(torch.zeros(1))
    one = torch.optim.SGD([param], lr=0.3)
    one_schedule = torch.optim.lr_scheduler.OneCycleLR(one, max_lr=0.3, total_steps=total + 2)
    cos = torch.optim.SGD([param], lr=2e-3)
    cos_schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(cos, T_0=100, T_mult=2, eta_min=0.01)
    for step in range(total):
        assert get_lr(step, 0.3, total, "StrategyOneCycle") == one.param_groups[0]["lr"]
        assert one_cycle(step, 0.3, total + 2)[1] == one.param_groups[0]["momentum"]
        assert get_lr(step, 2e-3, total, "StrategyCosineAnnel") == cos.param_groups[0]["lr"]
        for optimizer, schedule in ((one, one_schedule), (cos, cos_schedule)):
            optimizer.step()
            schedule.step()


def make_trainer(tmp_path, scheduler, *flags):
    args = train_argument_parser("").parse_args(
        ["--module", "toy_u", "--name", "n", "--dname", "d", "--device", "cpu", "--num_iters", "12", "--grad_clip", "0",
         "--ema_decay", "0", "--channels_last", "False", "--scheduler", scheduler, *map(str, flags)])
    torch.manual_seed(0)
    return Trainer(args, RunContext(args), torch.nn.Linear(3, 2), str(tmp_path), {})


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def run_steps(trainer, until):
    def loss_fn(x, y):
        return ((trainer.net(x) - y) ** 2).mean(1), torch.zeros(len(x))

    while trainer.step < until:
        trainer.train_step(*batch(trainer.step), loss_fn)
        trainer.step += 1


def originals_loop(scheduler, steps=12, lr=5e-5):
    """The original's DiffusionDistillation loop with its strategies.py (no gradient clipping)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    if scheduler == "StrategyOneCycle":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=min(1e-5, 0.5 * lr / 10))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps + 2)
    elif scheduler == "StrategyCosineAnnel":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=min(1e-5, lr / 10))
        schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=100, T_mult=2, eta_min=0.01)
    else:  # StrategyLinearLR: AdamW with torch's default weight decay 0.01
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1, end_factor=0, total_iters=steps)
    for step in range(steps):
        optimizer.zero_grad()
        x, y = batch(step)
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        schedule.step()
    return model


@pytest.mark.parametrize("scheduler,flags", [("StrategyOneCycle", ()), ("StrategyCosineAnnel", ()),
                                             ("StrategyLinearLR", ("--weight_decay", 0.01))])
def test_the_originals_strategies_train_as_its_loop_did_and_resume_exactly(tmp_path, scheduler, flags):
    expected = originals_loop(scheduler)
    whole = make_trainer(tmp_path, scheduler, "--lr", 5e-5, *flags)
    run_steps(whole, 12)
    exact = scheduler != "StrategyLinearLR"  # torch's LinearLR multiplies factors step by step: ~1 ulp apart
    for got, want in zip(whole.model.parameters(), expected.parameters()):
        assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.equal(expected.weight, originals_loop(scheduler, steps=0).weight)  # it did train

    first = make_trainer(tmp_path, scheduler, "--lr", 5e-5, *flags)
    run_steps(first, 5)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    second = make_trainer(tmp_path, scheduler, "--lr", 5e-5, *flags)
    second.restore(torch.load(io.BytesIO(saved.getvalue()), weights_only=True), "saved")
    run_steps(second, 12)
    for got, want in zip(second.model.parameters(), whole.model.parameters()):
        assert torch.equal(got, want)
    assert str(second.optimizer.state_dict()) == str(whole.optimizer.state_dict())


def test_continuing_with_another_optimizer_is_refused(tmp_path):
    adamw = make_trainer(tmp_path, "linear")
    run_steps(adamw, 2)
    with pytest.raises(UserError, match="AdamW.*SGD"):
        make_trainer(tmp_path, "StrategyOneCycle").restore(adamw.state_dict(), "file.pt")


def test_tensorboard_drops_the_events_after_the_resumed_step(tmp_path):
    """On resume the writer starts with a SessionLog START at the checkpoint's step (purge_step), which
    TensorBoard uses to drop the events the cut-short run logged after it."""
    sessions = {}
    for step in (0, 5):
        trainer = make_trainer(tmp_path / str(step), "constant")
        trainer.step = step
        writer = trainer._tensorboard()
        writer.add_scalar("loss", 1.0, step + 1)
        writer.close()
        events = [e for f in glob.glob(str(tmp_path / str(step) / "tensorboard" / "*"))
                  for e in EventFileLoader(f).Load()]
        sessions[step] = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert sessions == {0: [], 5: [5]}


# -- flags ---------------------------------------------------------------------------------------

TRAIN_ARGS = ["--module", "toy_u", "--name", "n", "--dname", "d"]


@pytest.mark.parametrize("flag,value", [
    ("--lr", 0), ("--lr", -1e-4), ("--lr", "nan"), ("--warmup", -1), ("--weight_decay", -0.1), ("--grad_clip", -1),
    ("--ema_decay", 1), ("--ema_decay", -0.5), ("--log_interval", 0), ("--ckpt_interval", -3), ("--save_every", -1),
    ("--keep_last", -2), ("--stop_at", -5), ("--num_workers", -2), ("--seed", -1), ("--seed", 2 ** 64),
    ("--log_every", 0), ("--max_bad_steps", 0), ("--num_iters", 0), ("--batch_size", 1.5)])
def test_numeric_flags_are_range_checked(flag, value, capsys):
    for parser in (train_argument_parser(""), distill_argument_parser("")):
        extra = ["--base_checkpoint", "x.pt"] if "--base_checkpoint" in parser.format_help() else []
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(TRAIN_ARGS + extra + [flag, str(value)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error:") and flag in error and "\n" not in error


@pytest.mark.parametrize("value", ["nan", "inf", "x"])
def test_gamma_must_be_a_finite_number(value, capsys):
    with pytest.raises(SystemExit):
        distill_argument_parser("").parse_args(TRAIN_ARGS + ["--base_checkpoint", "x.pt", "--gamma", value])
    assert "--gamma" in capsys.readouterr().err


def test_help_shows_each_scripts_own_defaults():
    train_help = " ".join(train_argument_parser("").format_help().split())
    distill_help = " ".join(distill_argument_parser("").format_help().split())
    for text, defaults in ((train_help, ["(default: StrategyConstantLR)", "(default: 5e-05)", "(default: 0.9999)",
                                         "(default: 100000)"]),
                           (distill_help, ["(default: StrategyLinearLR)", "(default: 1.5e-05)", "(default: 0.0)",
                                           "(default: 5000)", "(default: snr+1)"])):
        for default in defaults:
            assert default in text


# -- layering --------------------------------------------------------------------------------------

SCRIPTS = {"train", "distillate", "sample", "prepare_data", "evaluate", "demo", "export_checkpoint"}


def test_no_module_imports_a_script():
    """Scripts are the top floor: no module of the repository (bench/ included) imports one."""
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")):
        tree = ast.parse(open(path).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & SCRIPTS, f"{os.path.relpath(path, ROOT)} imports {imported & SCRIPTS}"


def test_lmdb_is_imported_only_where_an_lmdb_is_read_or_written():
    """Importing a script (and the CelebA user module) loads lmdb only for prepare_data.py; sample.py loads
    no training code."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('lmdb', 'lmdb_data', 'train_utils', 'losses') if m in sys.modules))\n")

    def loaded(*modules):
        result = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert loaded("sample", "evaluate", "demo", "export_checkpoint", "celeba_u") == "[]"
    assert loaded("train", "distillate", "celeba_u") == "['losses', 'train_utils']"
    assert loaded("prepare_data") == "['lmdb']"
