"""bench/training_time.py: a stage's minutes from its TensorBoard records, the steps before the first record
included at the stage's rate."""
import os
import sys

from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import training_time  # noqa: E402


def write_stage(folder, steps, seconds_per_step, every=50, start=1000.0):
    writer = SummaryWriter(os.path.join(folder, "tensorboard"))
    for step in range(every, steps + 1, every):
        writer.add_scalar("loss", 1.0 / step, step, walltime=start + step * seconds_per_step)
    writer.close()


def test_stage_time_covers_every_step_at_the_logged_rate(tmp_path):
    write_stage(tmp_path / "run" / "original", 500, 2.0)
    write_stage(tmp_path / "run" / "guided_w", 200, 0.5, every=20)
    # records at steps 50..500, 2 s a step: 900 s logged for 450 steps; the 500 steps took 1000 s
    assert training_time.stage_time(str(tmp_path / "run" / "original")) == (500, 1000.0)
    training_time.main(["--run", str(tmp_path / "run"), "--machine", "test", "--out", str(tmp_path / "out" / "t.md")])
    text = (tmp_path / "out" / "t.md").read_text()
    assert "| original | 5000 |" not in text and "| original | 500 | 16.7 | 0.50 |" in text
    assert "| guided_w | 200 | 1.7 | 2.00 |" in text
    assert text.index("| original |") < text.index("| guided_w |")
    assert "Base model: 16.7 minutes; every distillation stage together: 1.7 minutes." in text
