"""Sample from a trained run: `load` in a notebook, or from the command line.

    python sample.py --run models/DDPM_conditional --labels 3 7 --n 16 --cfg_scale 3 --out samples.png

In a notebook:

    from sample import load
    model, diffusion = load("models/DDPM_conditional")
    x = diffusion.sample(model, 10, labels=torch.arange(10), sampler="ddim")
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

import ddpm
import ddpm_conditional
from ddpm_conditional import CFG_SCALE, add_guidance_args
from modules import UNet, UNet_conditional
from devices import autocast, autocast_dtype, pick_device, seed_everything
from runs import add_runtime_args, ArgumentParser, load_checkpoint, Pickled, real, run_main, whole, writable_folder
from utils import save_images, square_nrow, UserError


FIRST_CONV = "inc.double_conv.0.weight"  # every UNet of this project and of the original has it: where one begins


def tensors_of(obj, prefix: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in a loaded checkpoint by its dotted path: through dicts, and through a pickled module's
    parameters, buffers and sub-modules, named as its state_dict would name them."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            tensors_of(value, f"{prefix}{key}.", out)
    elif isinstance(obj, Pickled) and isinstance(obj.state, dict):
        transient = obj.state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for key, value in (obj.state.get(group) or {}).items():
                if value is not None and key not in transient:
                    out[prefix + key] = value
        for key, value in (obj.state.get("_modules") or {}).items():
            tensors_of(value, f"{prefix}{key}.", out)
    return out


def unet_weights(obj, path: Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet state_dict in a checkpoint, and the prefix it was found under: at the top (a plain state_dict),
    under `module.` (DataParallel, DistributedDataParallel) or `_orig_mod.` (torch.compile), under a key of a dict
    ({"model": ..., "ema": ...}, resume.pt) or inside a pickled model. Of several, the EMA's (or with `ema` false,
    the other) when that picks one."""
    tensors = tensors_of(obj)
    n = len(FIRST_CONV)
    prefixes = sorted(k[:-n] for k in tensors if k.endswith(FIRST_CONV) and (len(k) == n or k[-n - 1] == "."))
    if not prefixes:
        top = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"'{path}' holds no UNet weights of this project or of the original (no key ends in "
                        f"{FIRST_CONV}; it holds: {top})")
    chosen = prefixes
    if len(prefixes) > 1:
        chosen = [p for p in prefixes if ("ema" in p.lower()) == ema]
        if len(chosen) != 1:
            names = ", ".join(p[:-1] or "(top)" for p in prefixes)
            raise UserError(f"'{path}' holds {len(prefixes)} networks ({names}) and none is marked ema: save the one "
                            f"to sample as a plain state_dict")
    prefix = chosen[0]
    inner = [p for p in prefixes if p != prefix and p.startswith(prefix)]  # another network inside this one's keys
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(tuple(inner))}
    return state, prefix


def architecture_of(state: dict) -> dict:
    """UNet arguments read off a state_dict's shapes and names (for bare checkpoints without run.json); the heads
    cannot be read off the weights: 4, the original's, unless run.json says otherwise."""
    try:
        width = state[FIRST_CONV].shape[0]
        args = dict(c_in=state[FIRST_CONV].shape[1], c_out=state["outc.weight"].shape[0],
                    time_dim=state["down1.emb_layer.1.weight"].shape[1], width=width,
                    input_skip="inc_skip.weight" in state,
                    channel_mult=[state[f"down{k}.emb_layer.1.weight"].shape[0] // width for k in (1, 2, 3)],
                    attention=sorted({factor for n, factor in enumerate((2, 4, 8, 4, 2, 1), start=1)
                                      if f"sa{n}.mha.in_proj_weight" in state}))
    except (KeyError, AttributeError, IndexError) as e:
        raise UserError(f"the weights are not a UNet of this project or of the original (no {e})")
    if "label_emb.weight" in state:
        args["num_classes"] = state["label_emb.weight"].shape[0]
    return args


def load(path: str | Path, ema: bool = True, device: str | torch.device | None = None, image_size: int | None = None,
         *, img_size: int | None = None, **model_args) -> tuple[nn.Module, ddpm.Diffusion]:
    """Rebuild (model, diffusion) from a run folder (models/<run>) or a checkpoint file.

    A run folder's run.json gives the architecture, image size and schedule; its EMA weights are
    used when present and `ema` is true. A bare checkpoint of the original (no run.json) loads
    too: the architecture is read off its shapes, `image_size` (default 64, the original's; `img_size`, the
    Diffusion's name for it, is accepted too) and `model_args` fill in the rest. Nothing in the file is executed
    (weights_only loading).
    """
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        names = (["ema_ckpt.pt"] if ema else []) + ["ckpt.pt"]
        found = [folder / n for n in names if (folder / n).is_file()]
        if not found:
            raise UserError(f"'{path}' holds no ckpt.pt: give a run folder under models/ or a checkpoint file")
        path = found[0]
    state, prefix = unet_weights(load_checkpoint(path, objects=True), path, ema)
    if prefix:
        print(f"{path}: the network under '{prefix[:-1]}'")

    config_file = folder / "run.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    arch = {**architecture_of(state), **config.get("model_args", {}), **model_args}
    diffusion_args = dict(config.get("diffusion_args", {}))
    diffusion_args.setdefault("img_size", 64)
    diffusion_args["c_in"] = arch["c_in"]
    image_size = image_size or img_size
    if image_size is not None:
        diffusion_args["img_size"] = image_size

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


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps and the guidance flags, as sample.py and evaluate.py take them: unless given,
    the run's recommended settings."""
    p.add_argument("--sampler", choices=ddpm.SAMPLERS, default=None,
                   help="ddim: Song et al. (eta 0: deterministic); ddpm: ancestral; dpmpp2m: DPM-Solver++(2M) "
                        f"(default: the run's, else {ddpm.DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=whole(0), default=None,
                   help="sampler steps = network evaluations; 0 = every step (the original's chain) "
                        f"(default: the run's, else {ddpm.DEFAULT_STEPS})")
    add_guidance_args(p)


def recommended(path: str | Path, model: nn.Module, conditional: bool | None = None) -> dict:
    """The sampling settings a run recommends: run.json's "sampling" (training writes its grids' sampler, steps,
    guidance scale and interval there), and for whatever it lacks the defaults for this network (a bare checkpoint
    of the original's network gets the ancestral chain, which works for it). The keyword arguments of
    `diffusion.sample` (sampler, steps; cfg_scale and guidance_interval when `conditional`, by default when the
    model takes labels)."""
    path = Path(path).expanduser()
    config_file = (path if path.is_dir() else path.parent) / "run.json"
    saved = json.loads(config_file.read_text()).get("sampling", {}) if config_file.is_file() else {}
    settings = ddpm.default_sampling(getattr(model, "inc_skip", None) is not None)
    if hasattr(model, "num_classes") if conditional is None else conditional:
        settings.update(cfg_scale=CFG_SCALE, guidance_interval=None)
    settings.update({k: v for k, v in saved.items() if k in settings})
    if settings.get("guidance_interval") is not None:
        settings["guidance_interval"] = tuple(settings["guidance_interval"])
    return settings


def fill_sampling(args: argparse.Namespace, model: nn.Module, conditional: bool) -> None:
    """Set each sampling flag not given on the command line to the run's recommendation; warn when a deterministic
    sampler is asked of the original's network."""
    for key, value in recommended(args.run, model, conditional).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sampler != "ddpm" and model.inc_skip is None:
        print(f"warning: {args.run} is the original's network (no input skip), on which deterministic samplers drift "
              f"(DDIM-50 drew the asked digit 16.5% of the time, docs/sampling.md): --sampler ddpm works",
              file=sys.stderr)


def class_indices(labels: list[str], model: nn.Module) -> list[int]:
    """--labels as class indices: each an index, -1, or one of the run's class names."""
    names = model.class_names or [str(k) for k in range(model.num_classes)]
    indices = []
    for label in labels:
        if label in names:
            indices.append(names.index(label))
        elif label.lstrip("-").isdigit() and -1 <= int(label) < model.num_classes:
            indices.append(int(label))
        else:
            classes = ", ".join(f"{k} {name}" for k, name in enumerate(names))
            raise UserError(f"--labels {label}: not a class of this run, whose classes are {classes} (or -1 for none)")
    return indices


def full_chain(steps: int, sampler: str, diffusion: ddpm.Diffusion) -> int | None:
    """--steps 0 means every step: the original's chain for ddpm (steps=None), all T-1 steps for the others."""
    if steps:
        return steps
    return None if sampler == "ddpm" else diffusion.noise_steps - 1


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser("Sample images from a trained run.")
    p.add_argument("--run", required=True, help="a run folder (models/<run_name>) or a checkpoint file")
    p.add_argument("--labels", nargs="*", default=None,
                   help="conditional runs: one grid row per class, given by index or by name (a folder's sub-folder "
                        "names), -1 for the unconditional model (default: every class)")
    p.add_argument("--n", type=whole(1), default=None,
                   help="images in all, as in sample(model, n): a conditional run's are split evenly over --labels, "
                        "a grid row each (default: 8 per label; unconditional: 8)")
    add_sampler_args(p)
    p.add_argument("--eta", type=real(0), default=None,
                   help="DDIM noise, in [0, 1]: 0 deterministic, 1 like DDPM (default: 0)")
    p.add_argument("--no_ema", action="store_true", help="use ckpt.pt even when ema_ckpt.pt exists")
    p.add_argument("--image_size", "--img_size", type=whole(8), default=None,
                   help="image size of a bare checkpoint without run.json (default: 64, the original's)")
    add_runtime_args(p)
    p.add_argument("--out", default="samples.png", help="the grid image")
    p.add_argument("--out_dir", default=None, help="also write every image as its own PNG here")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")

    writable_folder(Path(args.out).parent)  # before sampling, not after
    if args.out_dir:
        writable_folder(args.out_dir)
    model, diffusion = load(args.run, ema=not args.no_ema, device=args.device, image_size=args.image_size)
    conditional = isinstance(model, UNet_conditional)
    given = [f"--{k}" for k in ("labels", "cfg_scale", "guidance_interval") if getattr(args, k) is not None]
    if given and not conditional:
        raise UserError(f"{args.run} is an unconditional run: {', '.join(given)} need a class-conditional one")
    fill_sampling(args, model, conditional)
    if args.eta is not None and args.sampler != "ddim":
        raise UserError("--eta is the ddim sampler's noise: drop it, or use --sampler ddim")
    device = next(model.parameters()).device
    seed_everything(args.seed)
    kwargs = dict(sampler=args.sampler, steps=full_chain(args.steps, args.sampler, diffusion), eta=args.eta or 0.0)
    if conditional:
        classes = list(range(model.num_classes)) if args.labels is None else class_indices(args.labels, model)
        n = args.n or 8 * len(classes)
        if n % len(classes):
            raise UserError(f"--n {n} images do not split evenly over {len(classes)} labels: give a multiple of "
                            f"{len(classes)}")
        nrow = n // len(classes)
        labels = torch.tensor(classes).repeat_interleave(nrow)
        kwargs.update(labels=labels, cfg_scale=args.cfg_scale, guidance_interval=args.guidance_interval)
    else:
        n = args.n or 8
        nrow = square_nrow(n)
    try:
        with autocast(device, autocast_dtype(args.precision, device)):
            images = diffusion.sample(model, n, **kwargs)
    except ValueError as e:  # the sampler's checks: steps, eta, labels, guidance interval
        raise UserError(str(e))
    if conditional and model.class_names:
        print("rows:", ", ".join("(unconditional)" if c < 0 else model.class_names[c] for c in classes))
    save_images(images, args.out, nrow=nrow)
    print(f"wrote {args.out}")
    if args.out_dir:
        for k, image in enumerate(images):
            save_images(image[None], Path(args.out_dir) / f"{k:05d}.png", nrow=1, upscale=False)  # native size
        print(f"wrote {len(images)} images to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
