"""What a training run reports: the scalar log kept on the device between two writes (LossLog), the
TensorBoard writer, the sample grids of the model being trained, and messages from the main process."""
import os
import time

import torch
from tqdm import tqdm

import seeding
from sample_utils import preview_extra_args, trajectory_grid


class LossLog:
    """Sums of the logged quantities between two scalar logs, kept on the device (read by the host at a log only):
    the loss and its quartiles of the time t/N (improved-diffusion's habit: one sees where a student fails) over
    the applied updates, the gradient norm over the finite ones (fp16's scaler skips the others, which are
    counted apart), images per second, and the share of the wall time spent waiting for data. Beside them, the
    updates skipped by the guard since the host last looked (take_skipped)."""

    def __init__(self, device):
        self.device = device
        self.skipped = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.steps, self.loss, self.grad_steps, self.grad_norm = zeros(), zeros(), zeros(), zeros()
        self.q_sum, self.q_count = zeros(4), zeros(4)
        self.images, self.data_s, self.start = 0, 0.0, time.monotonic()

    def add(self, loss, grad_norm, losses, times, finite, data_s):
        """One step: its mean loss, gradient norm and per-sample losses (device tensors), the time fractions of
        its samples, whether its update was applied (a bool tensor) and the seconds it waited for its batch."""
        applied = finite.to(torch.float64)
        self.steps += applied
        self.skipped += 1 - applied
        self.loss += torch.where(finite, loss.double(), 0.0)
        finite_grad = finite & torch.isfinite(grad_norm)
        self.grad_steps += finite_grad.to(torch.float64)
        self.grad_norm += torch.where(finite_grad, grad_norm.double(), 0.0)
        quartile = (times.to(self.device) * 4).long().clamp(0, 3)
        self.q_sum.index_add_(0, quartile, torch.where(finite, losses.double(), 0.0))
        self.q_count.index_add_(0, quartile, applied.expand(quartile.shape[0]))
        self.images, self.data_s = self.images + losses.shape[0], self.data_s + data_s

    def take_skipped(self):
        """The updates skipped since the last call (one host sync)."""
        count = int(self.skipped)
        self.skipped.zero_()
        return count

    def write(self, writer, step, lr, bad_steps, bar, world_size):
        if writer is not None:
            steps, loss, grad_steps, grad_norm = (float(x) for x in torch.stack([self.steps, self.loss, self.grad_steps,
                                                                               self.grad_norm]).tolist())
            elapsed = max(time.monotonic() - self.start, 1e-9)
            stats = {"images_per_sec": self.images / elapsed, "data_wait_fraction": self.data_s / elapsed,
                     "fp16_overflow_steps": steps - grad_steps, "lr": lr, "skipped_steps_in_a_row": bad_steps}
            if steps:
                stats["loss"] = loss / steps
            if grad_steps:
                stats["grad_norm"] = grad_norm / grad_steps
            for q, (total, count) in enumerate(zip(self.q_sum.tolist(), self.q_count.tolist())):
                if count > 0:
                    stats[f"loss_by_time_quartile/q{q}"] = total / count
            for key, value in stats.items():
                writer.add_scalar(key, value, step)
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4g}", img_s=f"{stats['images_per_sec'] * world_size:.1f}")
        self.reset()


def tensorboard(directory, step):
    from torch.utils.tensorboard import SummaryWriter
    # On resume, events logged after the checkpoint's step (by the run that was cut short) are dropped.
    return SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=step or None)


def preview(writer, model, stage, args, ctx, step):
    """A grid of --log_images samples and their trajectory in TensorBoard; a conditional model is asked for
    class i mod K and a w-input model for its largest w, so guidance shows as it is learnt."""
    count = args.log_images
    noise = seeding.image_randn(range(count), model.image_size[1:], args.seed, "start", device=ctx.device)
    extra_args = preview_extra_args(stage.make_extra_args, stage.conditioning, count, ctx.device)
    grid = trajectory_grid(model, stage.grid, noise, extra_args=extra_args, bgr=stage.meta.get("channel_order") == "BGR",
                           prediction=stage.meta.get("prediction", "v"))
    writer.add_image("samples", grid, step)
    writer.flush()


def say(ctx, message, bar=False):
    if ctx.is_main:
        (tqdm.write if bar else print)(message)
