"""The Python half of tools/gpu_check.sh: the checks a shell cannot make, and the results file.

    python -m tools.gpu_check env --device cuda                # the machine, and what --precision auto picks
    python -m tools.gpu_check precision --json p.json -- --device cuda --limit 512   # every precision, resumes
    python -m tools.gpu_check folder data                      # a small folder of digit images in two classes
    python -m tools.gpu_check results WORK OUT_DIR             # OUT_DIR/results.json, and the numbers to print
"""
import argparse
import json
import math
import platform
import tempfile
from contextlib import chdir
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import benchmark
import ddpm_conditional
from devices import autocast_dtype, precision_name
from files import load_checkpoint, save_json
from runs import run_main
from utils import load_dataset, save_images

# One run, resumed in every precision in turn, one epoch each: the loss scaler's state appears
# (fp16), disappears (fp32) and has to start afresh (fp16 after fp32).
RESUME_CHAIN = ("auto", "bf16", "fp16", "fp32", "fp16")


def environment(device: str) -> dict:
    """Versions, the GPU and its compute capability, and what --precision auto picks on `device`."""
    d = torch.device(device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device, "auto_precision": precision_name(autocast_dtype("auto", d))}
    if d.type == "cuda":
        major, minor = torch.cuda.get_device_capability(d)
        info.update(gpu=torch.cuda.get_device_name(d), capability=f"{major}.{minor}", gpus=torch.cuda.device_count())
    return info


def check_precisions(flags: list[str]) -> list[dict]:
    """Train one epoch in each precision of RESUME_CHAIN, each resuming the last, in a temporary folder.

    Raises AssertionError when a loss is not finite, the loss scaler is on without fp16 or off with
    it, an epoch does not move the weights, or a resumed run does not continue at the right step.
    """
    segments = []
    with tempfile.TemporaryDirectory() as tmp, chdir(tmp):
        for epoch, precision in enumerate(RESUME_CHAIN, start=1):
            argv = [*flags, "--precision", precision, "--epochs", str(epoch), "--log_every", "1", "--sample_every", "1",
                    "--run_name", "chain"]
            trainer = ddpm_conditional.Trainer(ddpm_conditional.parse_args(argv + (["--resume"] if epoch > 1 else [])))
            before = load_checkpoint("models/chain/ckpt.pt") if epoch > 1 else trainer.model.state_dict()
            before = {k: v.detach().cpu().clone() for k, v in before.items()}
            trainer.fit()
            moved = max((v.cpu() - before[k]).abs().max().item() for k, v in trainer.model.state_dict().items())
            done = sum(len(s["losses"]) for s in segments)
            losses = [e.value for e in EventAccumulator("runs/chain").Reload().Scalars("MSE")][done:]
            dtype = precision_name(trainer.run.amp_dtype)
            assert trainer.run.step == len(losses) * epoch, f"{precision}: step {trainer.run.step} after epoch {epoch}"
            assert all(map(math.isfinite, losses)), f"{precision}: losses {losses}"
            assert (dtype == "fp16") == trainer.scaler.is_enabled(), f"{precision}: loss scaler on with {dtype}"
            assert moved > 0, f"{precision}: no step of epoch {epoch} changed the weights"
            segments.append({"precision": precision, "dtype": dtype, "losses": losses, "largest_weight_change": moved,
                             "loss_scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None})
    return segments


def write_folder(folder: Path, per_class: int = 32) -> None:
    """`per_class` embedded digits of the classes 0 and 1 as PNG files in folder/0 and folder/1."""
    images, labels, *_ = load_dataset("digits")
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images[labels == label][:per_class]):
            save_images(image[None], folder / str(label) / f"{k}.png", nrow=1)


def speedups(rows: dict[str, dict]) -> list[str]:
    """How much faster this repository trains than the original's own behaviour, at the same batch."""
    lines = []
    for original in (r for r in rows.values() if r["config"]["original"]):
        same = {k: v for k, v in original["config"].items() if k not in ("original", "compile")}
        for r in rows.values():
            if not r["config"]["original"] and {k: r["config"][k] for k in same} == same:
                speedup = r["train_images_per_s"] / original["train_images_per_s"]
                compiled = ", compiled" if r["config"]["compile"] else ""
                lines.append(f"{r['precision']}{compiled} against the original (batch {same['batch_size']}): "
                             f"{speedup:.2f}x the images/s")
    return lines


def results(work: Path, out: Path) -> None:
    """Merge the steps' JSON files (work/json/NAME.json) into out/results.json and print the numbers."""
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((work / "json").glob("*.json"))}
    steps = [dict(zip(("step", "status", "seconds", "note"), line.split("\t")))
             for line in (work / "steps.tsv").read_text().splitlines()]
    save_json({"steps": steps, **parts}, out / "results.json")
    if "env" in parts:
        print("machine: " + ", ".join(f"{k} {v}" for k, v in parts["env"].items()))
    for segment in parts.get("precision", []):
        scale = f", loss scale {segment['loss_scale']:g}" if segment["loss_scale"] else ""
        print(f"--precision {segment['precision']}: trained in {segment['dtype']}, "
              f"last loss {segment['losses'][-1]:.4f}{scale}")
    for name, r in parts.items():
        if name.startswith("sampling"):
            print(f"{name}: " + ", ".join(f"{k} {1 / v:.1f} images/s" for k, v in r["sample_s_per_image"].items()))
    rows = {k: v for k, v in parts.items() if k.startswith("bench")}
    print(*speedups(rows), sep="\n")
    if rows:
        print("\nREADME rows (benchmark.py's table):", *benchmark.README_HEADER,
              *map(benchmark.readme_row, rows.values()), sep="\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The checks of tools/gpu_check.sh.")
    sub = p.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print the machine and what --precision auto picks, as JSON")
    env.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    env.add_argument("--json", default=None)
    precision = sub.add_parser("precision", help="train in every precision and resume across them (in a new folder)")
    precision.add_argument("--json", required=True)
    precision.add_argument("flags", nargs=argparse.REMAINDER, help="-- then ddpm_conditional.py's flags for every run")
    folder = sub.add_parser("folder", help="write a small image folder of two classes")
    folder.add_argument("path", type=Path)
    merge = sub.add_parser("results", help="merge the steps' JSON into OUT_DIR/results.json and print the numbers")
    merge.add_argument("work", type=Path)
    merge.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "env":
        info = environment(args.device)
        print(json.dumps(info))
        if args.json:
            save_json(info, args.json)
    elif args.command == "precision":
        save_json(check_precisions(args.flags[1:] if args.flags[:1] == ["--"] else args.flags), args.json)
    elif args.command == "folder":
        write_folder(args.path)
    else:
        results(args.work, args.out)


if __name__ == "__main__":
    run_main(main)
