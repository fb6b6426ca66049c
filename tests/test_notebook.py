"""The learner's notebook runs top to bottom on a tiny generated data set, so it cannot rot."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import write_folder_dataset

pytestmark = pytest.mark.slow  # runs the whole notebook in a Jupyter kernel: not in `pytest -m "not slow"`

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="needs ipykernel (pip install -e '.[test]')")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "vit_from_scratch.ipynb"
KERNEL = "vitcraft-test-python"


def outputs_text(notebook) -> str:
    """Everything the code cells printed, joined."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)


def images_shown(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter (the venv's), found before any user-installed 'python3'."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "vitcraft tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched first
    return KERNEL


def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch, this_python_kernel):
    data = write_folder_dataset(tmp_path / "data", per_class=(8, 4), size=32)  # seed-tiny needs 32x32
    run_dir = tmp_path / "run"
    # the kernel inherits this environment (VITCRAFT_CACHE too, set by conftest)
    monkeypatch.setenv("VITCRAFT_NB_DATA", str(data))
    monkeypatch.setenv("VITCRAFT_NB_EPOCHS", "1")
    monkeypatch.setenv("VITCRAFT_NB_RUN_DIR", str(run_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name=this_python_kernel,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    text = outputs_text(notebook)
    per_head, fused = map(float, re.search(r"largest difference: outputs (\S+), probabilities (\S+)", text).groups())
    assert per_head < 1e-5 and fused < 1e-5  # MultiHeadAttention == FasterMultiHeadAttention
    assert float(re.search(r"largest difference from the library: (\S+)", text).group(1)) < 1e-6
    assert "patches  (4, 64, 48)" in text and "tokens               (4, 65, 48)" in text
    assert re.search(r"total +118,755 parameters \(3 classes\)", text)  # 119,098 - 7 x 49 for 3 classes
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert images_shown(notebook) == 5  # patches, curves, attention, rollout, rollout by hand


def test_stored_outputs_come_from_a_real_cifar10_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code_cells), "every code cell keeps its output"
    assert not [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    text = outputs_text(notebook)
    assert "training seed-tiny (119,098 parameters)" in text
    assert "50,000 train / 10,000 test images" in text
    assert images_shown(notebook) == 5
    assert NOTEBOOK.stat().st_size < 2_000_000  # the figures only, no bulky outputs
