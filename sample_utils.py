"""Drawing images from a model as the scripts do (sample.py, evaluate.py, demo.py, the training logs)."""
import torch
import torchvision


def trajectory_grid(diffusion, noise, captures=5, bgr=False, **sample_kwargs):
    """Sample from `noise`; return a CHW grid in [0, 1] with one row per captured step, the last row
    the final images (the original's visualisation). bgr=True flips channels for display."""
    n = diffusion.num_timesteps
    capture_at = {round(k * (n - 1) / (captures - 1)) for k in range(captures - 1)} if captures > 1 else set()
    rows = []

    def callback(i, x):
        if n - 1 - i in capture_at and i != 0:
            rows.append(x.float().cpu())

    final = diffusion.p_sample_loop(noise, callback=callback, **sample_kwargs)
    images = torch.cat(rows + [final.float().cpu()], dim=0)
    if bgr and images.shape[1] == 3:
        images = images.flip(1)
    return torchvision.utils.make_grid((images.clamp(-1, 1) + 1) / 2, nrow=noise.shape[0], padding=1)
