"""The notebooks run top to bottom on the CPU with small parameters (TQ_NB_SMALL=1), and the
committed copies carry no bulky outputs.

Each notebook is executed with nbclient in a fresh kernel, in the notebooks/ folder (they read
results/ relative to it). Any error in any cell fails the test. Part of the normal `pytest` run.
"""

from __future__ import annotations

import json
import os
import time

import pytest

NB_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "notebooks"))
NOTEBOOKS = ("01_quickstart.ipynb", "02_accuracy.ipynb", "03_speed_memory.ipynb")
CELL_TIMEOUT = 300  # seconds per cell; all three notebooks take about 20-40 s on 2 CPU cores
MAX_COMMITTED_OUTPUT = 20_000  # bytes of outputs a committed notebook may carry in all

nbformat = pytest.importorskip("nbformat")


def _read(name):
    return nbformat.read(os.path.join(NB_DIR, name), as_version=4)


def test_all_notebooks_are_tested():
    assert sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_small_and_parameterised(name):
    nb = _read(name)
    nbformat.validate(nb)
    out_bytes = sum(len(json.dumps(c.get("outputs", []))) for c in nb.cells if c.cell_type == "code")
    assert out_bytes <= MAX_COMMITTED_OUTPUT, f"{name} carries {out_bytes} bytes of outputs (strip them)"
    code = [c for c in nb.cells if c.cell_type == "code"]
    params = code[0]
    assert "parameters" in params.metadata.get("tags", []), "the first code cell must be the tagged parameters cell"
    assert 'os.environ.get("TQ_NB_SMALL")' in params.source, "the parameters cell must read TQ_NB_SMALL"


@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("TQ_NB_SMALL", "1")
    monkeypatch.setenv("TQ_NB_FIGDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One OpenMP thread in the kernel: the small models gain nothing from more, and on a busy CI box
    # torch's spinning worker threads made these notebooks up to 7x slower (21 s vs 160 s measured).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("TQ_NB_MODEL", "TQ_NB_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    nb = _read(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    figures = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    expected = {"01_quickstart.ipynb": 0, "02_accuracy.ipynb": 4, "03_speed_memory.ipynb": 4}[name]
    assert len(figures) == expected, figures
    print(f"{name}: {elapsed:.1f} s")
