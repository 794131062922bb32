"""Quality against training minutes: a grid of real training runs, each evaluated at n samples.

    python -m tools.frontier --name digits --epochs 20 40 --variant all= \\
        --variant original="--prediction eps --loss_weight none --ema_power 0" --readme docs/training.md

Every (variant, epochs, seed) is its own run of `ddpm_conditional.py` (models/frontier-...), with the
recipe's defaults and the variant's flags, evaluated by `evaluate.py` at the run's recommended sampling
settings, or at the settings --eval_flags gives every run (an ablation of training options at one setting;
the report goes to results/<run>/<the flags>/, beside the run's own). A run that is already trained and
evaluated is reused, so an interrupted grid continues where it stopped. Writes results/frontier_NAME.json,
assets/frontier_NAME.png (and _best.png, the samples of the lowest FD) and, with --readme FILE, the block
`frontier_NAME` of FILE (docs/training.md and docs/objectives.md hold them); --block renames those three, for
another view of the same runs. Run it alone on the machine: its minutes are wall-clock.
"""
import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from files import atomic_write, load_checkpoint, save_json, UserError
from runs import HelpFormatter, run_main, whole
from utils import as_posix_relative
from tools.readme import update_readme_block

ROOT = Path(__file__).resolve().parents[1]


def run_name(name: str, variant: str, epochs: int, seed: int, precision: str) -> str:
    return f"frontier-{name}-{variant}-{epochs}ep-{precision}-s{seed}"


def run_point(args: argparse.Namespace, variant: str, flags: str, epochs: int, seed: int) -> dict:
    """Train and evaluate one point (or read it back), returning its row."""
    run = run_name(args.name, variant, epochs, seed, args.precision)
    report_dir = Path("results") / run
    if args.eval_flags:  # not the run's own report: one folder per setting
        report_dir /= re.sub(r"[^\w.]+", "_", args.eval_flags).strip("_")
    report_file = report_dir / "eval.json"
    resume = Path("models") / run / "resume.pt"
    log = Path("results") / f"{run}.log"
    done = resume.is_file() and load_checkpoint(resume)["epoch"] >= epochs
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    # a report from before the samples followed the data's class mix (no samples_per_class) is evaluated again
    if not (done and "samples_per_class" in report):
        train = [sys.executable, str(ROOT / "ddpm_conditional.py"), "--dataset", args.dataset, "--epochs", str(epochs),
                 "--run_name", run, "--seed", str(seed), "--precision", args.precision, *shlex.split(flags)]
        train += ["--resume"] if resume.is_file() else []
        evaluate = [sys.executable, str(ROOT / "evaluate.py"), "--run", f"models/{run}", "--n", str(args.n),
                    "--out_dir", str(report_dir), *shlex.split(args.eval_flags)]
        evaluate += ["--judge_epochs", str(args.judge_epochs)] if args.judge_epochs else []
        log.parent.mkdir(parents=True, exist_ok=True)
        for command in ([] if done else [train]) + [evaluate]:
            print("$", shlex.join(command[1:]), flush=True)
            with open(log, "a") as f:
                if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode:
                    raise UserError(f"'{shlex.join(command[1:])}' failed: see {log}")
        report = json.loads(report_file.read_text())
    main = report["results"][0]
    guidance = (f", cfg {main['cfg_scale']:g}" + (" at t {}..{}".format(*main["guidance_interval"])
                                                  if main["guidance_interval"] else "")) if main["cfg_scale"] else ""
    return {"variant": variant, "flags": flags, "epochs": epochs, "seed": seed, "run": run,
            "steps": report["training"]["steps"], "minutes": report["training"]["minutes"],
            "precision": report["training"]["precision"], "accuracy": main["accuracy"],
            "judge_accuracy": report["judge_accuracy_held_out"], "fd": main["fd"], "floor": report["floor"]["fd"],
            "nn_ratio": main["nn_ratio"], "n": report["n"], "setting": f"{main['sampler']}-{main['nfe']}{guidance}",
            "samples": as_posix_relative(report_dir / "eval_samples.png")}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["variant"] == variant})
        for seed in seeds:  # a line joins the epochs of one seed; seeds are repeats, not a trend
            points = sorted((r for r in rows if (r["variant"], r["seed"]) == (variant, seed)), key=lambda r: r["minutes"])
            minutes, label = [r["minutes"] for r in points], variant if len(seeds) == 1 else f"{variant}, seed {seed}"
            acc.plot(minutes, [100 * r["accuracy"] for r in points], "o-", label=label)
            fd.plot(minutes, [r["fd"] / r["floor"] for r in points], "o-", label=label)
    acc.axhline(100 * rows[0]["judge_accuracy"], color="gray", ls="--", lw=1, label="judge, real images")
    fd.axhline(3, color="gray", ls="--", lw=1, label="3x the floor")
    acc.set(xlabel="training minutes", ylabel="judged the asked class (%)", title=title)
    fd.set(xlabel="training minutes", ylabel="FD / real-vs-real floor", yscale="log", title=title)
    fd.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fd.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    acc.legend()
    fd.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def readme_lines(args: argparse.Namespace, rows: list[dict], figure: Path) -> list[str]:
    variants = " ".join(f"--variant {shlex.quote(f'{v}={f}')}" for v, f in args.variant)
    eval_flags = f"--eval_flags {shlex.quote(args.eval_flags)} " if args.eval_flags else ""
    eval_flags += f"--judge_epochs {args.judge_epochs} " if args.judge_epochs else ""
    block = f"--block {args.block} " if args.block != f"frontier_{args.name}" else ""
    command = (f"python -m tools.frontier --name {args.name} {block}--dataset {args.dataset} "
               f"--precision {args.precision} "
               f"--epochs {' '.join(map(str, args.epochs))} --seeds {' '.join(map(str, args.seeds))} {variants} "
               f"{eval_flags}--readme {as_posix_relative(args.readme)}")
    settings = "the sampling settings below" if args.eval_flags else "each run's recommended sampling settings"
    lines = ["", f"Generated by `{command}`: every row is its own run, evaluated at n = {rows[0]['n']} with "
             f"{settings}.", "",
             "| variant | epochs | seed | steps | minutes | precision | sampling | accuracy (judge's) | FD (floor) "
             "| FD / floor | NN ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['epochs']} | {r['seed']} | {r['steps']:,} | {r['minutes']:.1f} | "
                     f"{r['precision']} | {r['setting']} | {100 * r['accuracy']:.1f}% ({100 * r['judge_accuracy']:.1f}%) | "
                     f"{r['fd']:.2f} ({r['floor']:.2f}) | {r['fd'] / r['floor']:.1f}x | {r['nn_ratio']:.2f} |")
    best = min(rows, key=lambda r: r["fd"] / r["floor"])
    grid = figure.with_name(f"{figure.stem}_best.png")
    atomic_write(grid, lambda f: f.write(Path(best["samples"]).read_bytes()))
    return lines + ["", f"![{figure.name}]({as_posix_relative(figure, Path(args.readme).parent)})", "",
                    f"The lowest FD, {best['variant']} (seed {best['seed']}, epochs {best['epochs']}): its samples, a "
                    f"row per class.", "", f"![{grid.name}]({as_posix_relative(grid, Path(args.readme).parent)})", ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Quality against training minutes, from real runs.",
                                formatter_class=HelpFormatter)
    p.add_argument("--name", required=True, help="names the runs, the results file and the README block")
    p.add_argument("--block", default=None,
                   help="names the results file, the figures and the README block instead: another view of the "
                        "same runs, e.g. at other --eval_flags (default: frontier_NAME)")
    p.add_argument("--dataset", default="digits", help="the training scripts' --dataset")
    p.add_argument("--epochs", type=int, nargs="+", required=True, help="one run per value (per variant and seed)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME=FLAGS",
                   help="a name and the training flags it adds to the recipe; repeat for more (default: default=)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--precision", default="auto", help="the training runs' --precision")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--eval_flags", default="",
                   help="more flags for evaluate.py, e.g. one sampling setting for every run (default: none, each "
                        "run at its recommended settings)")
    p.add_argument("--judge_epochs", type=whole(1), default=None,
                   help="evaluate.py's --judge_epochs: the epochs of each run's judge, trained once and kept in the "
                        "run (default: evaluate.py's)")
    p.add_argument("--readme", default=None,
                   help="rewrite the block frontier_NAME of this markdown file (README.md or a page of docs/)")
    args = p.parse_args(argv)
    args.block = args.block or f"frontier_{args.name}"
    args.variant = [v.split("=", 1) if "=" in v else (v, "") for v in args.variant or ["default="]]

    rows = [run_point(args, variant, flags, epochs, seed)
            for variant, flags in args.variant for seed in args.seeds for epochs in args.epochs]
    save_json(rows, Path("results") / f"{args.block}.json")
    figure = Path("assets") / f"{args.block}.png"
    plot(rows, figure, f"{args.dataset}, {rows[0]['precision']}")
    for r in rows:
        print(f"{r['variant']:>12} {r['epochs']:>4} ep  seed {r['seed']}  {r['minutes']:5.1f} min  "
              f"acc {100 * r['accuracy']:5.1f}%  FD {r['fd']:.2f} ({r['fd'] / r['floor']:.1f}x floor)  "
              f"NN {r['nn_ratio']:.2f}")
    if args.readme:
        update_readme_block(args.readme, args.block, lambda old: "\n".join(readme_lines(args, rows, figure)))


if __name__ == "__main__":
    run_main(main)
