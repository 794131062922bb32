"""evaluate.py's report: the table it prints, its plots, and the block of a markdown file it rewrites (the Results
of docs/results.md, or any page's block).

    python evaluate.py --run models/DDPM_conditional --n 1000 --sweep steps --guidance_interval 400 999 \\
        --readme docs/results.md

The block (between `<!-- NAME:start -->` and `<!-- NAME:end -->`, `--readme_block NAME`, default `results`) gets the
command that wrote it, the judge's accuracy and the floor, the images each figure rests on, a row per setting, each
sampler's quality against its network evaluations (a steps sweep), and the figures, copied to assets/. A figure of
fewer images than its minimum (evaluate.py's MIN_ constants, in report["figures"]) is marked unreliable: "?" after it
in the rows, the reason in words beside the judge's accuracy and the floor, and once under the rows.
"""
import shutil
from pathlib import Path

import torch

import ddpm
import flow
from files import atomic_write, load_checkpoint
from utils import as_posix_relative, grid_array
from tools.readme import update_readme_block

SAMPLERS = ddpm.SAMPLERS + flow.SAMPLERS  # the order of the tables and plots

NAMES = {"accuracy": "accuracy", "class_entropy": "class entropy", "fd": "FD", "kid": "KID", "nn_ratio": "NN ratio",
         "inception_fid": "Inception FID"}


def setting_name(s: dict) -> str:
    name = f"{s['sampler']}-{s['steps'] or 'all'}"
    if s["cfg_scale"] is not None:
        name += f" cfg {s['cfg_scale']:g}"
    if s.get("guidance_interval"):
        name += " t {}-{}".format(*s["guidance_interval"])
    return name + (" exact" if s.get("denoiser") == "exact" else "")


def shown(value: float | None, fmt: str, percent: bool = False, kid: bool = False) -> str:
    """A figure as text: n/a where it could not be computed; a KID at or below 0 as ~0 (no measurable difference:
    its unbiased estimate scatters around 0, below it as often as above)."""
    if value is None:
        return "n/a"
    if kid and value <= 0:
        return "~0"
    return format(100 * value, fmt) + "%" if percent else format(value, fmt)


def mark(figure: dict | None) -> str:
    """'?' after a figure of too few images (evaluate.py's MIN_ constants)."""
    return "?" if figure is not None and not figure["reliable"] else ""


def note(figure: dict | None) -> str:
    return f" (unreliable: {figure['why']})" if figure is not None and not figure["reliable"] else ""


def images_used(figures: dict, conditional: bool) -> list[str]:
    """Lines: the images each setting's row rests on, and the figures marked '?' for too few of them."""
    fd, nn = figures["fd"], figures["nn_ratio"]
    lines = [f"each setting: {fd['generated']} generated images, against the {fd['held_out']} held-out real images "
             f"(FD and KID, in the judge's features) and the {nn['training']} training images (NN ratio)"]
    keys = ["accuracy" if conditional else "class_entropy", "fd", "kid", "nn_ratio", "inception_fid"]
    short = [f"{NAMES[k]}: {figures[k]['why']}" for k in keys if k in figures and not figures[k]["reliable"]]
    return lines + ([f"? unreliable: {'; '.join(short)}"] if short else [])


def format_row(r: dict, conditional: bool, f: dict) -> str:
    """One setting's line of the table; `f` says which figures rest on too few images (marked ?)."""
    first = (f"acc {shown(r['accuracy'], '5.1f', percent=True)}{mark(f.get('accuracy'))}" if conditional
             else f"entropy {shown(r['class_entropy'], '.3f')}{mark(f.get('class_entropy'))}")
    return (f"{setting_name(r):20s} {first}  FD {shown(r['fd'], '8.3f')}{mark(f.get('fd'))}  "
            f"KID {shown(r['kid'], '8.4f', kid=True)}{mark(f.get('kid'))}  "
            f"NN ratio {shown(r['nn_ratio'], '.2f')}{mark(f.get('nn_ratio'))}"
            f"{' (MEMORISING)' if r['memorising'] else ''}  {r['seconds_per_image']:.3f} s/img")


def print_table(report: dict, conditional: bool) -> None:
    f = report["figures"]
    judge, floor = f["judge_accuracy"], f["floor_fd"]
    print(f"\njudge accuracy on the {judge['held_out']} held-out real images: "
          f"{shown(report['judge_accuracy_held_out'], '.1f', percent=True)}{note(judge)}")
    print(f"real-vs-real floor ({floor['training']} training images against the {floor['held_out']} held-out): "
          f"FD {shown(report['floor']['fd'], '.3f')}{note(floor)}  "
          f"KID {shown(report['floor']['kid'], '.4f', kid=True)}{note(f['floor_kid'])}")
    print("\n".join(images_used(f, conditional)))
    for r in report["results"]:
        print(format_row(r, conditional, f))
    fid = report["inception_fid"]
    print(f"Inception FID ({setting_name(report['results'][0])}): "
          f"{fid if isinstance(fid, str) else shown(fid, '.3f') + note(f['inception_fid'])}")


def training_record(run_dir: Path) -> dict | None:
    """What the run's training took (resume.pt's record): steps, minutes, device and precision."""
    path = run_dir / "resume.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if "train_seconds" not in state:  # runs from before the record
        return None
    return {"steps": state["step"], "minutes": state["train_seconds"] / 60, "device": state["device"],
            "precision": state["precision"]}


def sorted_by_label(images: torch.Tensor, conditional: bool, model) -> torch.Tensor:
    """Grid order: one row per class (the first rounds of the sample labels hold every class, 0..K-1). Fewer samples
    than classes are one round already, in class order."""
    k = getattr(model, "num_classes", 1)
    if not conditional or len(images) % k:
        return images
    return images.view(-1, k, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])


def write_readme(readme: Path, report: dict, conditional: bool, out_dir: Path, block: str = "results") -> None:
    """Replace the block `block` (between its markers) of a markdown file, the README or a page of docs/, with this
    report, copying the figures to assets/ (prefixed with the block's name unless it is the Results block)."""
    figures = [f for f in ("eval_samples.png", "eval_nearest.png", "sweep_cfg.png", "sweep_steps.png",
                           "sweep_steps_grids.png") if (out_dir / f).is_file()]
    prefix = "" if block == "results" else f"{block}_"
    metric, f = "accuracy" if conditional else "class_entropy", report["figures"]
    exact = any(r["denoiser"] == "exact" for r in report["results"])
    interval = report["results"][0]["guidance_interval"]
    flags = report.get("sampling_flags", "") + (f"--guidance_interval {interval[0]} {interval[1]} " if interval else "")
    flags += "--exact " if exact else ""
    flags += ("--no_ema " if report.get("no_ema", not report["ema"]) else "")
    flags += "" if block == "results" else f"--readme_block {block} "
    training = report.get("training")
    trained = (f" The run trained {training['steps']:,} steps in {training['minutes']:.1f} minutes "
               f"({training['device']}, {training['precision']})." if training else "")
    lines = ["", f"Generated by `python evaluate.py --run {report['run']} --n {report['n']} --sweep {report['sweep']} "
             f"{flags}--readme {as_posix_relative(readme)}` ({report['n']} samples per setting).{trained}", "",
             f"Judge accuracy on the {report['held_out']} held-out real images: "
             f"**{shown(report['judge_accuracy_held_out'], '.1f', percent=True)}**{note(f['judge_accuracy'])}. "
             f"Real-vs-real floor ({f['floor_fd']['training']} training images against the {report['held_out']} "
             f"held-out): FD {shown(report['floor']['fd'], '.2f')}{note(f['floor_fd'])}, "
             f"KID {shown(report['floor']['kid'], '.4f', kid=True)}{note(f['floor_kid'])}.", "",
             *[text for line in images_used(f, conditional) for text in (line[0].upper() + line[1:] + ".", "")],
             f"| sampler | cfg | {NAMES[metric]} | FD | KID | NN ratio | s/image |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        sampler = f"{r['sampler']}-{r['nfe']}{' (exact denoiser)' if r['denoiser'] == 'exact' else ''}"
        cfg = "-" if r["cfg_scale"] is None else f"{r['cfg_scale']:g}"
        if r["guidance_interval"]:
            cfg += " (t {}-{})".format(*r["guidance_interval"])
        lines.append(f"| {sampler} | {cfg} | {quality(r, conditional)}{mark(f[metric])} | "
                     f"{shown(r['fd'], '.2f')}{mark(f['fd'])} | {shown(r['kid'], '.4f', kid=True)}{mark(f['kid'])} | "
                     f"{shown(r['nn_ratio'], '.2f')}{mark(f['nn_ratio'])} | {r['seconds_per_image']:.3f} |")
    if report["sweep"] in ("steps", "all"):
        lines += steps_frontier(report, conditional)
    lines.append("")
    assets = Path("assets")
    lines += [f"![{f}]({as_posix_relative(assets / (prefix + f), readme.parent)})" for f in figures]
    lines.append("")
    update_readme_block(readme, block, lambda old: "\n".join(lines))
    assets.mkdir(exist_ok=True)
    for f in figures:
        shutil.copy(out_dir / f, assets / f"{prefix}{f}")


def quality(r: dict, conditional: bool) -> str:
    return shown(r["accuracy"], ".1f", percent=True) if conditional else shown(r["class_entropy"], ".3f")


def steps_frontier(report: dict, conditional: bool) -> list[str]:
    """Markdown lines: each sampler's quality and time per image against its network evaluations (the model's)."""
    main = report["results"][0]
    rows = [r for r in report["results"] if r["denoiser"] == "model" and r["cfg_scale"] == main["cfg_scale"]]
    nfes = sorted({r["nfe"] for r in rows})
    guidance = f"cfg {main['cfg_scale']:g}" if conditional else "unconditional"
    few = [NAMES[k] for k in ("accuracy" if conditional else "class_entropy", "fd")
           if not report["figures"][k]["reliable"]]
    lines = ["", f"Quality against network evaluations ({guidance}): "
             f"{'accuracy' if conditional else 'class entropy'}, FD, seconds per image"
             f"{' (unreliable, as above: ' + ' and '.join(few) + ')' if few else ''}.", "",
             "| sampler | " + " | ".join(map(str, nfes)) + " |", "|---" * (len(nfes) + 1) + "|"]
    for sampler in sorted({r["sampler"] for r in rows}, key=SAMPLERS.index):  # DDPM's samplers, or a flow run's
        cells = {r["nfe"]: f"{quality(r, conditional)}, {shown(r['fd'], '.2f')}, {r['seconds_per_image']:.3f} s"
                 for r in rows if r["sampler"] == sampler}
        lines.append(f"| {sampler} | " + " | ".join(cells.get(k, "-") for k in nfes) + " |")
    return lines


def plot_sweeps(report: dict, grids: dict, conditional: bool, model, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = report["results"][0]
    metric = "accuracy" if conditional else "class_entropy"

    def cfg_rows(denoiser: str) -> list[dict]:
        return sorted((r for r in report["results"] if r["denoiser"] == denoiser and r["sampler"] == main["sampler"]
                       and r["steps"] == main["steps"]), key=lambda r: r["cfg_scale"])

    step_rows = [r for r in report["results"] if r["denoiser"] == "model" and r["cfg_scale"] == main["cfg_scale"]]
    samplers = sorted({r["sampler"] for r in step_rows}, key=SAMPLERS.index)  # DDPM's, or a flow run's
    if conditional and len(cfg_rows("model")) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key in zip(axes, (metric, "fd", "kid")):
            for denoiser, label in (("model", "model"), ("exact", "exact denoiser")):
                if cfg_rows(denoiser):
                    ax.plot([r["cfg_scale"] for r in cfg_rows(denoiser)], [r[key] for r in cfg_rows(denoiser)], "o-",
                            label=label)
            if key != metric and report["floor"][key] is not None:
                ax.axhline(report["floor"][key], color="gray", ls="--", label="real vs real")
            ax.legend()
            ax.set_xlabel("cfg_scale")
            ax.set_title(key)
        fig.suptitle(f"guidance sweep ({setting_name({**main, 'cfg_scale': None})}, n={report['n']})")
        fig.tight_layout()
        atomic_write(out_dir / "sweep_cfg.png", lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        side_by_side([[(f"cfg {r['cfg_scale']:g}", grids[setting_name(r)]) for r in cfg_rows("model")]], model,
                     conditional, out_dir / "sweep_cfg_grids.png")
    if len(step_rows) >= 2:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
        for ax, key in zip(axes, (metric, "fd", "kid", "seconds_per_image")):
            for sampler in samplers:
                rows = sorted((r for r in step_rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], "o-", label=sampler)
            if report["floor"].get(key) is not None:
                ax.axhline(report["floor"][key], color="gray", ls="--", label="real vs real")
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations")
            ax.set_title(key.replace("_", " "))
            ax.legend()
        guidance = f"cfg {main['cfg_scale']:g}" if conditional else "unconditional"
        fig.suptitle(f"sampler sweep ({guidance}, n={report['n']})")
        fig.tight_layout()
        atomic_write(out_dir / "sweep_steps.png", lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        side_by_side([[(f"{r['sampler']}-{r['nfe']}", grids[setting_name(r)])
                       for r in sorted(step_rows, key=lambda r: r["nfe"]) if r["sampler"] == sampler]
                      for sampler in samplers], model, conditional, out_dir / "sweep_steps_grids.png")


def side_by_side(rows: list[list[tuple[str, torch.Tensor]]], model, conditional: bool, path: Path) -> None:
    """Rows of titled sample grids (one row per class in each grid)."""
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row]
    columns = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.6 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax_row, row in zip(axes, rows):
        for ax, (title, images) in zip(ax_row, row):
            ax.imshow(grid_array(sorted_by_label(images, conditional, model)[:100], nrow=10), cmap="gray")
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
