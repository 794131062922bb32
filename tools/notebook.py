"""Execute sampling.ipynb in place against the default run, so that it is committed with its pictures.

    python ddpm_conditional.py && python -m tools.notebook

The notebook samples models/DDPM_conditional (its RUN): run this from the repository root once that run exists.
Progress bars (stderr) are left out of the saved outputs.
"""
import argparse
import os
from pathlib import Path

from files import UserError
from runs import run_main

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Execute a notebook in place, keeping its outputs.")
    p.add_argument("--notebook", default=str(ROOT / "sampling.ipynb"), help="the notebook to execute")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = p.parse_args(argv)
    import nbformat
    from nbclient import NotebookClient

    if not Path("models/DDPM_conditional/run.json").is_file():
        raise UserError("no models/DDPM_conditional here: train it first (python ddpm_conditional.py), from the "
                        "repository root")
    path = Path(args.notebook)
    notebook = nbformat.read(path, as_version=4)
    os.environ["PYTHONPATH"] = str(ROOT)  # the kernel imports sample.py and utils.py
    NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                   resources={"metadata": {"path": os.getcwd()}}).execute()
    for cell in notebook.cells:  # the progress bars are noise in a rendered notebook
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(path)  # never a half-written notebook
    print(f"wrote {path} with its outputs")


if __name__ == "__main__":
    run_main(main)
