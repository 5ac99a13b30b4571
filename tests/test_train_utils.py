"""Pieces of the training: the learning rate as a function of the step (and the original's optimizers), the
resumable sampler, the EMA warm-up, the draws of a step, the loop (exact against the original's loop, resumed,
its guard against non-finite losses, fp16's gradient scaler, the logs and the sample previews), flags, layering."""
import argparse
import ast
import glob
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import nn

import cond_toy_u
from checkpoints import clean_state_dict, load_checkpoint
from cli import UserError, str2bool
from conftest import ROOT
from diffusion import make_beta_schedule, model_grid
from lr_schedules import get_lr
from original import one_cycle
from runtime import RunContext
from train_flags import distill_argument_parser, train_argument_parser
from train_log import LossLog, preview, tensorboard
from train_utils import EMA, Stage, draw_step, train
from training_data import InfiniteShardSampler, make_loader


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


# -- the loop on a tiny regression -------------------------------------------------------------------

LOOP_ARGS = ["--module", "toy_u", "--name", "n", "--dname", "d", "--device", "cpu", "--num_workers", "0",
             "--channels_last", "False", "--log_images", "0", "--ema_decay", "0", "--grad_clip", "0",
             "--batch_size", "8", "--log_every", "1"]


def loop_args(*flags):
    return train_argument_parser("").parse_args(LOOP_ARGS + [str(f) for f in flags])


def pairs(n=20, scale=1.0):
    """A data set of items (x in R^3, y in R^2): the loop's (image, label), y the regression target."""
    g = torch.Generator().manual_seed(5)
    return list(zip(scale * torch.randn(n, 3, generator=g), scale * torch.randn(n, 2, generator=g)))


def target_args(images, labels, device):
    return {"target": labels.to(device)}


def regression(net, images, draws, extra_args):
    return ((net(images).float() - extra_args["target"]) ** 2).mean(1)


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def stage_of(directory, loss=regression, model=None):
    return Stage(model if model is not None else linear(), loss, 4, torch.float32, {}, target_args, None,
                 str(directory), {"n_timesteps": 4, "time_scale": 1})


def run_loop(directory, args, loss=regression, model=None, dataset=None, resume=None, ctx=None):
    stage = stage_of(directory, loss, model)
    status = train(args, ctx or RunContext(args), stage, dataset or pairs(), resume)
    return stage.model, status


def checkpoint(directory):
    path = os.path.join(str(directory), "checkpoint.pt")
    return load_checkpoint(path), path


def scalars(directory):
    """{tag: {step: value}} of the TensorBoard events under directory/tensorboard."""
    out = {}
    for f in glob.glob(os.path.join(str(directory), "tensorboard", "*")):
        for event in EventFileLoader(f).Load():
            for value in event.summary.value:
                number = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
                out.setdefault(value.tag, {})[event.step] = number
    return out


def originals_loop(scheduler, args, steps=12, lr=5e-5):
    """The original's DiffusionDistillation loop with its strategies.py (no gradient clipping), on the batches
    the loader gives."""
    model = linear()
    if scheduler == "StrategyOneCycle":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=min(1e-5, 0.5 * lr / 10))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps + 2)
    elif scheduler == "StrategyCosineAnnel":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=min(1e-5, lr / 10))
        schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=100, T_mult=2, eta_min=0.01)
    else:  # StrategyLinearLR: AdamW with torch's default weight decay 0.01
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1, end_factor=0, total_iters=steps)
    batches = iter(make_loader(pairs(), args, 0, 1, 0, torch.device("cpu")))
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()
        schedule.step()
    return model


@pytest.mark.parametrize("scheduler,flags", [("StrategyOneCycle", ()), ("StrategyCosineAnnel", ()),
                                             ("StrategyLinearLR", ("--weight_decay", 0.01))])
def test_the_originals_strategies_train_as_its_loop_did_and_resume_exactly(tmp_path, scheduler, flags):
    args = loop_args("--scheduler", scheduler, "--lr", 5e-5, "--num_iters", 12, *flags)
    expected = originals_loop(scheduler, args)
    whole, status = run_loop(tmp_path / "whole", args)
    assert status == "done"
    exact = scheduler != "StrategyLinearLR"  # torch's LinearLR multiplies factors step by step: ~1 ulp apart
    for got, want in zip(whole.parameters(), expected.parameters()):
        assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.equal(expected.weight, originals_loop(scheduler, args, steps=0).weight)  # it did train

    stopped = loop_args("--scheduler", scheduler, "--lr", 5e-5, "--num_iters", 12, "--stop_at", 5, *flags)
    _, status = run_loop(tmp_path / "halves", stopped)
    assert status == "stopped" and checkpoint(tmp_path / "halves")[0]["step"] == 5
    resumed, status = run_loop(tmp_path / "halves", args, model=linear(seed=1), resume=checkpoint(tmp_path / "halves"))
    assert status == "done"
    for got, want in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(got, want)
    whole_ckpt, resumed_ckpt = checkpoint(tmp_path / "whole")[0], checkpoint(tmp_path / "halves")[0]
    assert resumed_ckpt["step"] == whole_ckpt["step"] == 12
    assert str(resumed_ckpt["optimizer"]) == str(whole_ckpt["optimizer"])
    assert all(torch.equal(resumed_ckpt["G"][k], whole_ckpt["G"][k]) for k in whole_ckpt["G"])


def test_continuing_with_another_optimizer_is_refused(tmp_path):
    run_loop(tmp_path, loop_args("--scheduler", "linear", "--num_iters", 2))
    with pytest.raises(UserError, match="AdamW.*SGD"):
        run_loop(tmp_path, loop_args("--scheduler", "StrategyOneCycle", "--num_iters", 4), resume=checkpoint(tmp_path))


def test_tensorboard_drops_the_events_after_the_resumed_step(tmp_path):
    """On resume the writer starts with a SessionLog START at the checkpoint's step (purge_step), which
    TensorBoard uses to drop the events the cut-short run logged after it."""
    sessions = {}
    for step in (0, 5):
        writer = tensorboard(str(tmp_path / str(step)), step)
        writer.add_scalar("loss", 1.0, step + 1)
        writer.close()
        events = [e for f in glob.glob(str(tmp_path / str(step) / "tensorboard" / "*"))
                  for e in EventFileLoader(f).Load()]
        sessions[step] = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert sessions == {0: [], 5: [5]}


# -- the guard against non-finite steps, and fp16's gradient scaler ---------------------------------

class InfiniteGradient(torch.autograd.Function):
    """The identity with an infinite gradient: a finite loss whose backward pass overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class FaultyLoss:
    """The regression loss that records, at each call (one per step, from step `first` on), the weights it
    sees, the draws and its loss, and turns faulty at the chosen steps: "nan" (the loss), "inf_grad" (a finite
    loss with an infinite gradient), "overflow" (the loss times 1e6: finite, but its fp16 gradient overflows)."""

    def __init__(self, faults=None, first=0, always=None):
        self.faults, self.first, self.always, self.calls = faults or {}, first, always, []

    def __call__(self, net, images, draws, extra_args):
        step = self.first + len(self.calls)
        losses = regression(net, images, draws, extra_args)
        fault = self.always or self.faults.get(step)
        if fault == "nan":
            losses = losses * float("nan")
        elif fault == "inf_grad":
            losses = InfiniteGradient.apply(losses)
        elif fault == "overflow":
            losses = losses * 1e6
        self.calls.append({"step": step, "weights": [p.detach().clone() for p in net.parameters()], "draws": draws,
                           "images": images.clone(), "loss": losses.detach().float().mean().item()})
        return losses


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))


def test_non_finite_steps_are_skipped_and_the_run_goes_on(tmp_path, capsys):
    loss = FaultyLoss({3: "nan", 4: "inf_grad"})
    _, status = run_loop(tmp_path, loop_args("--num_iters", 7, "--lr", 1e-2, "--scheduler", "constant"), loss)
    assert status == "done"
    calls = loss.calls
    assert [c["step"] for c in calls] == list(range(7))
    assert math.isnan(calls[3]["loss"]) and math.isfinite(calls[4]["loss"])  # step 4: a finite loss
    assert same_weights(calls[3], calls[4]) and same_weights(calls[4], calls[5])  # steps 3 and 4: no update
    for k in (0, 1, 2, 5):
        assert not same_weights(calls[k], calls[k + 1])  # the other steps update
    out = capsys.readouterr().out
    assert "Step 3: non-finite loss or gradient, 1 update skipped since the last check (1 in a row)." in out
    assert "Step 4: non-finite loss or gradient, 1 update skipped since the last check (2 in a row)." in out
    saved, _ = checkpoint(tmp_path)
    assert saved["step"] == 7 and saved["bad_steps"] == 0
    assert all(torch.isfinite(v).all() for v in saved["G"].values())
    # every step's draws are draw_step's of (seed, rank 0, step)
    for c in calls:
        expected = draw_step(0, 0, c["step"], c["images"], 4, {})
        assert torch.equal(c["draws"].t, expected.t) and torch.equal(c["draws"].eps, expected.eps)
    # the log (every step) holds the loss of each updated step, and nothing of the skipped ones
    logged = scalars(tmp_path)
    assert sorted(logged["loss"]) == [1, 2, 3, 6, 7]
    for step, value in logged["loss"].items():
        assert value == pytest.approx(calls[step - 1]["loss"], rel=1e-6)
    assert all(math.isfinite(v) for v in logged["grad_norm"].values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_and_resume_keeps_the_count(tmp_path):
    fresh = tmp_path / "fresh"
    always = FaultyLoss(always="nan")
    with pytest.raises(UserError, match=r"^3 non-finite losses in a row at step 2: training diverged"):
        run_loop(fresh, loop_args("--num_iters", 10, "--max_bad_steps", 3), always)
    assert len(always.calls) == 3 and all(same_weights(always.calls[0], c) for c in always.calls)
    assert not os.path.exists(fresh / "checkpoint.pt")  # nothing saved from a diverged run

    # a run that ends in a streak of two saves the count; the resumed run's first bad step is the third
    run_loop(tmp_path, loop_args("--num_iters", 4, "--max_bad_steps", 3), FaultyLoss({2: "nan", 3: "nan"}))
    saved = checkpoint(tmp_path)
    assert (saved[0]["step"], saved[0]["bad_steps"]) == (4, 2)
    again = FaultyLoss({4: "nan"}, first=4)
    with pytest.raises(UserError, match=r"^3 non-finite losses in a row at step 4"):
        run_loop(tmp_path, loop_args("--num_iters", 8, "--max_bad_steps", 3), again, resume=saved)
    assert len(again.calls) == 1 and checkpoint(tmp_path)[0]["step"] == 4


def test_fp16_overflow_is_skipped_by_the_scaler_and_never_logged_as_the_grad_norm(tmp_path, capsys):
    """Real fp16 autocast on the CPU (its Linear runs in half precision): at step 3 the loss is finite but its
    gradient, scaled by GradScaler's 2^16, overflows fp16. The scaler skips that update and halves its scale;
    the loop's guard lets the scaler handle it (no skipped-step message, no bad-step count); TensorBoard's
    grad_norm averages the finite steps only, and fp16_overflow_steps counts the overflowing one."""
    args = loop_args("--num_iters", 6, "--amp", "fp16", "--lr", 1e-2, "--scheduler", "constant")
    ctx = RunContext(args)
    assert ctx.amp_dtype == torch.float16
    loss = FaultyLoss({3: "overflow"})
    run_loop(tmp_path, args, loss, dataset=pairs(scale=0.3), ctx=ctx)
    calls = loss.calls
    assert all(math.isfinite(c["loss"]) for c in calls)
    assert same_weights(calls[3], calls[4])  # the overflowing step changed nothing
    for k in (0, 1, 2, 4):
        assert not same_weights(calls[k], calls[k + 1])
    assert "non-finite" not in capsys.readouterr().out
    saved, _ = checkpoint(tmp_path)
    scaler = torch.amp.GradScaler("cpu")  # the defaults: scale 2^16, halved at an overflow
    assert saved["scaler"]["scale"] == scaler.get_scale() * scaler.get_backoff_factor()
    assert saved["bad_steps"] == 0
    logged = scalars(tmp_path)
    assert sorted(logged["grad_norm"]) == [1, 2, 3, 5, 6]  # no grad_norm from the overflowing step 3 (logged at 4)
    assert all(math.isfinite(v) and v > 0 for v in logged["grad_norm"].values())
    assert logged["fp16_overflow_steps"] == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}
    assert logged["loss"][4] == pytest.approx(calls[3]["loss"], rel=1e-6)


class FakeWriter:
    def __init__(self):
        self.scalars, self.images = {}, []

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, image, step):
        self.images.append((tag, image, step))

    def flush(self):
        pass


class FakeBar:
    def set_postfix(self, **values):
        self.postfix = values


def test_loss_log_averages_the_grad_norm_of_finite_steps_and_counts_the_others():
    log = LossLog(torch.device("cpu"))
    add = lambda loss, grad, losses, times, applied=True, waited=0.0: log.add(
        torch.tensor(loss), torch.tensor(grad), torch.tensor(losses), torch.tensor(times), torch.tensor(applied), waited)
    add(1.0, 2.0, [1.0, 1.0], [0.1, 0.9])
    add(3.0, float("inf"), [2.0, 4.0], [0.3, 0.6])
    add(5.0, 4.0, [5.0, 5.0], [0.2, 0.55])
    add(float("nan"), float("nan"), [float("nan"), 1.0], [0.1, 0.3], applied=False, waited=0.5)  # skipped by the guard
    add(7.0, float("nan"), [7.0, 7.0], [0.8, 0.99])
    log.start -= 10.0  # ten seconds of wall time, half a second of it waiting for data
    writer = FakeWriter()
    log.write(writer, 40, 0.5, 0, FakeBar(), 1)
    values = {tag: value for tag, (value, step) in writer.scalars.items()}
    assert {step for _, step in writer.scalars.values()} == {40}
    assert values["loss"] == 4.0  # (1 + 3 + 5 + 7) / 4: every step that updated
    assert values["grad_norm"] == 3.0  # (2 + 4) / 2: the finite ones only
    assert values["fp16_overflow_steps"] == 2
    assert values["data_wait_fraction"] == pytest.approx(0.05, rel=1e-3)
    assert values["images_per_sec"] == pytest.approx(1.0, rel=1e-3)  # 10 images in 10 s
    # quartiles of t/N: [0, .25) holds 1, 5; [.25, .5) 2; [.5, .75) 4, 5; [.75, 1) 1, 7, 7
    assert values["loss_by_time_quartile/q0"] == 3.0 and values["loss_by_time_quartile/q1"] == 2.0
    assert values["loss_by_time_quartile/q2"] == 4.5 and values["loss_by_time_quartile/q3"] == 5.0
    assert log.take_skipped() == 1 and log.take_skipped() == 0
    only_overflow = LossLog(torch.device("cpu"))
    only_overflow.add(torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor([1.0]), torch.tensor([0.5]),
                      torch.tensor(True), 0.0)
    writer = FakeWriter()
    only_overflow.write(writer, 1, 0.5, 0, FakeBar(), 1)
    assert "grad_norm" not in writer.scalars and writer.scalars["fp16_overflow_steps"][0] == 1


# -- the draws of a step ----------------------------------------------------------------------------

RECORD = {"num_classes": 3, "null_label": 3, "cond_drop_prob": 0.3, "guidance_range": [0.5, 2.0]}


def test_draws_are_a_function_of_seed_rank_and_step_alone():
    images = torch.zeros(64, 1, 4, 4)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = draw_step(7, 0, 5, images, 10, RECORD)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither read nor moved
    torch.manual_seed(2)
    b = draw_step(7, 0, 5, torch.randn(64, 1, 4, 4), 10, RECORD)  # other pixels, another global state
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    others = [draw_step(7, 0, 6, images, 10, RECORD), draw_step(7, 1, 5, images, 10, RECORD),
              draw_step(8, 0, 5, images, 10, RECORD)]
    for other in others:
        assert not any(torch.equal(x, y) for x, y in zip(a, other))  # t, eps, drop and w all change
    # no collision between (rank 1, step s) and (rank 0, step s + 1)
    assert not torch.equal(draw_step(7, 1, 0, images, 10, {}).eps, draw_step(7, 0, 1, images, 10, {}).eps)
    assert a.eps.shape == images.shape and a.eps.dtype == torch.float32
    assert draw_step(7, 0, 5, images, 10, {}, torch.float64).eps.dtype == torch.float64
    assert a.t.dtype == torch.long and a.drop.dtype == torch.bool and a.w.shape == (64,)


def test_step_indices_are_uniform_over_the_levels_and_the_noise_standard_normal():
    n, levels = 50_000, 10
    draws = draw_step(3, 0, 0, torch.zeros(n, 2), levels, {})
    assert draws.drop is None and draws.w is None
    assert draws.t.min() == 0 and draws.t.max() == levels - 1
    counts = torch.bincount(draws.t, minlength=levels)
    assert len(counts) == levels
    p = 1 / levels
    assert ((counts - n * p).abs() < 4 * (n * p * (1 - p)) ** 0.5).all()  # four binomial standard deviations
    eps = draws.eps.flatten().double()
    m = eps.numel()
    assert abs(eps.mean()) < 4 / m ** 0.5 and abs(eps.var() - 1) < 4 * (2 / m) ** 0.5


# -- the TensorBoard preview --------------------------------------------------------------------------

class KwargsRecorder(nn.Module):
    """A model that records the keyword arguments of each call (and predicts v = 0)."""

    def __init__(self):
        super().__init__()
        self.image_size = [1, 1, 2, 2]
        self.calls = []

    def forward(self, z, label, **kwargs):
        self.calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return torch.zeros_like(z)


@pytest.mark.parametrize("record", [{}, {"num_classes": 3, "null_label": 3, "cond_drop_prob": 0.1},
                                    {"num_classes": 3, "null_label": 3, "cond_drop_prob": 0.1,
                                     "guidance_range": [0.5, 2.5]}], ids=["unconditional", "conditional", "w-input"])
def test_preview_asks_a_conditional_model_for_class_i_mod_k_and_the_top_guidance_weight(record):
    args = loop_args("--log_images", 5)
    model = KwargsRecorder()
    grid = model_grid(make_beta_schedule("cosine", 4))
    stage = Stage(model, None, 4, torch.float32, record, cond_toy_u.make_extra_args, grid, "unused", {})
    writer = FakeWriter()
    preview(writer, model, stage, args, RunContext(args), 17)
    assert len(model.calls) == len(grid)  # one call per level
    for kwargs in model.calls:
        if "num_classes" not in record:
            assert kwargs == {}
            continue
        assert torch.equal(kwargs["y"], torch.tensor([0, 1, 2, 0, 1]))
        assert kwargs.get("w") == (2.5 if "guidance_range" in record else None)
    [(tag, image, step)] = writer.images
    assert (tag, step) == ("samples", 17) and image.ndim == 3 and 0 <= image.min() <= image.max() <= 1


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


TRAINING = ("train_utils", "training_data", "lr_schedules", "train_flags")  # the training code


def test_lmdb_is_imported_only_where_an_lmdb_is_read_or_written():
    """Importing a script (and the CelebA user module) loads lmdb only for prepare_data.py; sample.py loads
    no training code."""
    code = (f"TRAINING = {TRAINING!r}\n"
            "import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in TRAINING + ('lmdb', 'lmdb_data') if m in sys.modules))\n")

    def loaded(*modules):
        result = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert loaded("sample", "evaluate", "demo", "export_checkpoint", "celeba_u") == "[]"
    assert loaded("train", "distillate", "celeba_u") == str(sorted(TRAINING))
    assert loaded("prepare_data") == "['lmdb']"
