"""Sample from a trained run: `load` in a notebook, or from the command line.

    python sample.py --run models/DDPM_conditional --labels 3 3 7 --n 16 --cfg_scale 3 --out samples.png

In a notebook:

    from sample import load
    model, diffusion = load("models/DDPM_conditional")
    x = diffusion.sample(model, 10, labels=torch.arange(10), sampler="ddim")
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

import ddpm
import ddpm_conditional
from modules import UNet, UNet_conditional
from utils import (PRECISION_HELP, UserError, autocast_dtype, load_checkpoint, pick_device, run_main, save_images,
                   seed_everything)


def architecture_of(state: dict) -> dict:
    """UNet arguments read off a state_dict's shapes (for bare checkpoints without run.json)."""
    try:
        args = dict(c_in=state["inc.double_conv.0.weight"].shape[1], c_out=state["outc.weight"].shape[0],
                    time_dim=state["down1.emb_layer.1.weight"].shape[1], width=state["inc.double_conv.0.weight"].shape[0],
                    input_skip="inc_skip.weight" in state)
    except (KeyError, AttributeError, IndexError):
        raise UserError("the file holds no UNet state_dict of this project (or of the original)")
    if "label_emb.weight" in state:
        args["num_classes"] = state["label_emb.weight"].shape[0]
    return args


def load(path: str | Path, ema: bool = True, device: str | torch.device | None = None, img_size: int | None = None,
         **model_args) -> tuple[nn.Module, ddpm.Diffusion]:
    """Rebuild (model, diffusion) from a run folder (models/<run>) or a checkpoint file.

    A run folder's run.json gives the architecture, image size and schedule; its EMA weights are
    used when present and `ema` is true. A bare checkpoint of the original (no run.json) loads
    too: the architecture is read off its shapes, `img_size` (default 64, the original's) and
    `model_args` fill in the rest. Nothing in the file is executed (weights_only loading).
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        names = (["ema_ckpt.pt"] if ema else []) + ["ckpt.pt"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UserError(f"'{path}' holds no ckpt.pt: give a run folder under models/ or a checkpoint file")
        path = found[0]
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' is not a model state_dict (optim.pt and resume files hold no weights)")

    config_file = folder / "run.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    arch = {**architecture_of(state), **config.get("model_args", {}), **model_args}
    diffusion_args = dict(config.get("diffusion_args", {}))
    diffusion_args.setdefault("img_size", 64)
    diffusion_args["c_in"] = arch["c_in"]
    if img_size is not None:
        diffusion_args["img_size"] = img_size

    device = pick_device(None if device is None else str(device))
    conditional = "num_classes" in arch
    model = (UNet_conditional if conditional else UNet)(**arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"'{path}' does not fit the architecture {arch}: {str(e).splitlines()[0]}")
    model = model.to(device).eval().requires_grad_(False)
    model.class_names = config.get("class_names")
    diffusion = (ddpm_conditional.Diffusion if conditional else ddpm.Diffusion)(**diffusion_args, device=device)
    return model, diffusion


def full_chain(steps: int, sampler: str, diffusion: ddpm.Diffusion) -> int | None:
    """--steps 0 means every step: the original's chain for ddpm (steps=None), all T-1 steps for ddim."""
    if steps:
        return steps
    return None if sampler == "ddpm" else diffusion.noise_steps - 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Sample images from a trained run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (models/<run_name>) or a checkpoint file")
    p.add_argument("--labels", type=int, nargs="*", default=None,
                   help="conditional runs: one grid row per label (default: every class)")
    p.add_argument("--n", type=int, default=8, help="images per label (unconditional: images in all)")
    p.add_argument("--cfg_scale", type=float, default=3.0, help="guidance scale (1 = none)")
    p.add_argument("--guidance_interval", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at timesteps LO..HI, plain conditional elsewhere (default: every step)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="ddim: Song et al. (eta 0: deterministic); ddpm: ancestral")
    p.add_argument("--steps", type=int, default=50, help="sampler steps; 0 = every step (the original's chain)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    p.add_argument("--no_ema", action="store_true", help="use ckpt.pt even when ema_ckpt.pt exists")
    p.add_argument("--img_size", type=int, default=None, help="image size of a bare checkpoint without run.json")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help=PRECISION_HELP)
    p.add_argument("--out", default="samples.png", help="the grid image")
    p.add_argument("--out_dir", default=None, help="also write every image as its own PNG here")
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")

    model, diffusion = load(args.run, ema=not args.no_ema, device=args.device, img_size=args.img_size)
    device = next(model.parameters()).device
    seed_everything(args.seed)
    kwargs = dict(sampler=args.sampler, steps=full_chain(args.steps, args.sampler, diffusion), eta=args.eta)
    dtype = autocast_dtype(args.precision, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        if isinstance(model, UNet_conditional):
            classes = list(range(model.num_classes)) if args.labels is None else args.labels
            labels = torch.tensor(classes).repeat_interleave(args.n)
            try:
                images = diffusion.sample(model, len(labels), labels, args.cfg_scale, args.guidance_interval,
                                          **kwargs)
            except ValueError as e:
                raise UserError(str(e))
            nrow = args.n
            if model.class_names:
                print("rows:", ", ".join(model.class_names[c] for c in classes))
        else:
            images = diffusion.sample(model, args.n, **kwargs)
            nrow = max(1, round(args.n ** 0.5))
    save_images(images, args.out, nrow=nrow)
    print(f"wrote {args.out}")
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            save_images(image[None], out_dir / f"{k:05d}.png", nrow=1)
        print(f"wrote {len(images)} images to {out_dir}")


if __name__ == "__main__":
    run_main(main)
