"""docs/quickstart.ipynb runs top to bottom in a fresh kernel of this Python (nbclient + ipykernel)."""

import json
import pathlib
import sys
import time

import nbclient
import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "docs" / "quickstart.ipynb"
KERNEL = "jaxllm-quickstart-test"


def _kernelspec(root: pathlib.Path) -> None:
    """A kernelspec that runs ipykernel with exactly this interpreter (the venv's), whatever else is installed."""
    d = root / "kernels" / KERNEL
    d.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxllm test (this interpreter)",
        "language": "python",
    }
    (d / "kernel.json").write_text(json.dumps(spec))


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(not c.outputs and c.execution_count is None for c in code)
    # Nothing forces a backend: the same notebook must run on a Colab CPU, GPU or TPU runtime.
    text = "\n".join(c.source for c in code)
    for banned in ("xla_force_host_platform_device_count", "JAX_PLATFORMS", "jax_platforms"):
        assert banned not in text


def test_quickstart_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    _kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before user/system dirs
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JAXLLM_DATA_DIR", str(tmp_path / "tfds"))  # prepare the corpus afresh, here
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's mkdtemp workdir
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_cells = len(nb.cells)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import resource, sys; r = resource.getrusage(resource.RUSAGE_SELF)\n"
            "print('KERNEL_PYTHON=' + sys.executable); print(f'KERNEL_CPU_S={r.ru_utime + r.ru_stime:.1f}')"
        )
    )
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first cell that fails
    elapsed = time.perf_counter() - t0
    print(f"quickstart notebook executed in {elapsed:.1f}s wall")

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    out = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    last = text(nb.cells[n_cells])
    assert f"KERNEL_PYTHON={sys.executable}" in last  # the kernel ran this interpreter (the venv's)
    print(last.splitlines()[-1])  # the kernel's CPU time: the notebook's cost without contention
    assert "already installed; nothing to do" in out  # the install cell was a no-op
    assert "impl='chunk' (chunk)" in out and "impl='auto' is" in out
    assert "trained 6 steps" in out and "'val_loss'" in out
    assert "identical to the trained ones" in out
    assert "heads eval loss" in out and out.count("'def ") >= 2  # two AutoDeco samples
