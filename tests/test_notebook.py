"""celeba_u_script.ipynb end to end: its parameters cell swapped for a tiny configuration (the MLP user module
tests/toy_u.py, 16 base steps, three halvings), executed with nbclient in a scratch folder that looks like
the repository root (its scripts linked in), on the CPU."""
import ast
import json
import os
import sys

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import ROOT, TESTS

NOTEBOOK = os.path.join(ROOT, "celeba_u_script.ipynb")
NAME = "nbtest"  # not the notebook's "celeba", so that a stray write into the repository would be noticed
TINY_PARAMETERS = f"""
import sys

MODULE = "toy_u"
NAME = {NAME!r}
BASE_STEPS = 16
BATCH_SIZE = 8
NUM_WORKERS = 0
TRAIN_ITERS = 20
DISTILL_ITERS = [5] * 3
N_STAGES = 3
DEVICE = "cpu"
LOG_INTERVAL = 5
SAMPLE_BATCH = 2
PYTHON = sys.executable
"""
KERNEL_NAME = "diffusion-distiller-test"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def test_notebook_is_stored_clean_with_the_originals_parameters():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is parameters_cell(nb), "the parameters cell is the first code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "store the notebook without outputs"
        assert "!python" not in cell.source and "%run" not in cell.source
    values = {}
    exec(parameters_cell(nb).source, {}, values)
    assert values["PYTHON"] == sys.executable
    expected = dict(MODULE="celeba_u", NAME="celeba", BASE_STEPS=1024, BATCH_SIZE=1, NUM_WORKERS=4,
                    TRAIN_ITERS=150000, DISTILL_ITERS=[5000, 5000, 5000, 5000, 10000, 10000, 10000],
                    N_STAGES=7, DEVICE="auto", LOG_INTERVAL=5, SAMPLE_BATCH=1)
    assert {k: values[k] for k in expected} == expected
    for cell in code:  # every code cell parses
        ast.parse(cell.source)
    assert "tensorboard --logdir ./checkpoints" in nb.cells[-1].source


def install_kernel(base):
    """A kernelspec of this interpreter (whatever kernels the machine has) that puts tests/ and the root on
    the path of the scripts the notebook starts. Returns the folder for JUPYTER_PATH."""
    spec_dir = base / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "diffusion_distiller tests", "language": "python",
            "env": {"PYTHONPATH": os.pathsep.join([TESTS, ROOT]), "OMP_NUM_THREADS": "2"}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return base


def test_notebook_runs_end_to_end_on_a_tiny_configuration(tmp_path, monkeypatch):
    work = tmp_path / "repo"
    work.mkdir()
    for name in os.listdir(ROOT):  # the scripts and modules, as if the notebook sat in the repository root
        if name.endswith(".py"):
            (work / name).symlink_to(os.path.join(ROOT, name))
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernel(jupyter)))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))

    nb = read_notebook()
    parameters_cell(nb).source = TINY_PARAMETERS.strip()
    client = NotebookClient(nb, timeout=300, kernel_name=KERNEL_NAME, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # for a look after a failure

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "train.py --module toy_u" in text and "--dname base_2" in text  # the helper echoes its commands
    assert "Training a 16-step base model" in text  # and the scripts' own output reaches the notebook
    assert text.count("Finished.") >= 4 and "Distilling ./checkpoints/nbtest/base_1/checkpoint.pt" in text

    expected = {"original": (16, 1), "base_0": (8, 2), "base_1": (4, 4), "base_2": (2, 8)}
    for dname, (steps, scale) in expected.items():
        ckpt = torch.load(work / "checkpoints" / NAME / dname / "checkpoint.pt", weights_only=True)
        assert (ckpt["n_timesteps"], ckpt["time_scale"]) == (steps, scale), dname
    for picture in (f"{NAME}_u_2.png", f"{NAME}_u_2_clipped.png", f"{NAME}_original_ts8.png"):
        path = work / "images" / picture
        assert path.is_file() and path.stat().st_size > 0, picture
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing was written into the repository
    assert not os.path.exists(os.path.join(ROOT, "checkpoints", NAME))
    assert not [f for f in os.listdir(os.path.join(ROOT, "images")) if f.startswith(NAME)]


def test_a_failing_step_stops_the_notebook(tmp_path, monkeypatch):
    """The helper runs the scripts with check=True: a script's failure is a cell error, not a warning."""
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernel(jupyter)))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    (tmp_path / "train.py").write_text("import sys\nprint('train.py: failing on purpose')\nsys.exit(3)\n")
    nb = read_notebook()
    parameters_cell(nb).source = TINY_PARAMETERS.strip()
    client = NotebookClient(nb, timeout=120, kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(Exception, match="returned non-zero exit status 3"):
        client.execute()
    train = next(c for c in nb.cells if 'run_script("train.py"' in c.source)
    assert "failing on purpose" in "".join(o.get("text", "") for o in train.outputs)
    assert not (tmp_path / "checkpoints" / NAME).exists()
