"""Every notebook executed as a notebook: a Jupyter kernel (nbclient + ipykernel) runs its
cells in order, as Colab would, and each code cell must finish without an error output.
The install cell is guarded: where llada_jax is importable (here, CI) it installs nothing."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.heavy
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # the kernel inherits this environment: one CPU device, this checkout's package
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("LLADA_NOTEBOOK_WORKDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any(c.outputs for c in code), "a notebook that shows nothing"
    assert "pip" in code[0].source and "find_spec" in code[0].source, "the first code cell installs llada_jax (guarded)"
