"""Sample from a trained run: `load` in a notebook, or from the command line.

    python sample.py --run models/DDPM_conditional --labels 3 7 --n 16 --cfg_scale 3 --out samples.png

In a notebook:

    from sample import load
    model, diffusion = load("models/DDPM_conditional")
    x = diffusion.sample(model, 10, labels=torch.arange(10), sampler="ddim")
"""
import argparse
import json
import numbers
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

import ddpm
import ddpm_conditional
import flow
from ddpm_conditional import CFG_SCALE, add_guidance_args, check_guidance_interval
from modules import UNet, UNet_conditional
from devices import autocast, autocast_dtype, pick_device, seed_everything
from files import load_checkpoint, Pickled, UserError, writable_folder
from runs import add_runtime_args, ArgumentParser, real, run_main, whole
from utils import check_image_file, save_images, square_nrow


FIRST_CONV = "inc.double_conv.0.weight"  # every UNet of this project and of the original has it: where one begins


class ArgumentError(UserError, ValueError):
    """A wrong argument of the Python API (`load`), worded in Python; `flag_message` words the same problem for
    the command line, whose scripts translate it (`flag_errors`)."""

    def __init__(self, message: str, flag_message: str):
        super().__init__(message)
        self.flag_message = flag_message


@contextmanager
def flag_errors():
    """Around `load` in a script: its ArgumentErrors name the script's flags instead of load's arguments."""
    try:
        yield
    except ArgumentError as e:
        raise UserError(e.flag_message) from None


def run_config(path: str | Path) -> dict:
    """The run.json of a run folder, or of the folder that holds a checkpoint file ({} without one)."""
    path = Path(path).expanduser()
    config_file = (path if path.is_dir() else path.parent) / "run.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


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


def network_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The prefixes under which `tensors` (tensors_of a checkpoint) hold a UNet: "" for a plain state_dict."""
    n = len(FIRST_CONV)
    return sorted(k[:-n] for k in tensors if k.endswith(FIRST_CONV) and (len(k) == n or k[-n - 1] == "."))


def unet_weights(obj, path: Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The UNet state_dict in a checkpoint, and the prefix it was found under: at the top (a plain state_dict),
    under `module.` (DataParallel, DistributedDataParallel) or `_orig_mod.` (torch.compile), under a key of a dict
    ({"model": ..., "ema": ...}, resume.pt) or inside a pickled model. Of several, the EMA's (or with `ema` false,
    the other) when that picks one."""
    tensors = tensors_of(obj)
    prefixes = network_prefixes(tensors)
    if not prefixes:
        top = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"'{path}' holds no UNet weights of this project or of the original (no key ends in "
                        f"{FIRST_CONV}; it holds: {top})")
    chosen = prefixes
    if len(prefixes) > 1:
        chosen = [p for p in prefixes if ("ema" in p.lower()) == ema]
        if len(chosen) != 1:
            names = ", ".join(p[:-1] or "(top)" for p in prefixes)
            if ema:
                which = f"{len(chosen)} are marked ema" if chosen else "none is marked ema"
            else:
                which = f"{len(chosen)} are not marked ema" if chosen else "every one is marked ema"
            raise UserError(f"'{path}' holds {len(prefixes)} networks ({names}) and {which}: save the one to sample "
                            f"as a plain state_dict")
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

    A run folder's run.json gives the architecture, image size and schedule; its EMA weights (ema_ckpt.pt) are
    used when present and `ema` is true, ckpt.pt otherwise. Of a file that holds two networks ({"model": ...,
    "ema": ...}, resume.pt) `ema` picks one; a file of one network has no other, so `ema=False` is refused there.
    A bare checkpoint of the original (no run.json) loads too: the architecture is read off its shapes,
    `image_size` (default 64, the original's; `img_size`, the Diffusion's name for it, is accepted too) and
    `model_args` fill in the rest. `image_size` also overrides a run's: its UNet draws any multiple of 8, though
    best the size it learned. Nothing in the file is executed (weights_only loading). A wrong argument raises
    ArgumentError, a ValueError that names it.
    """
    image_size = checked_image_size(image_size, img_size)
    try:
        device = pick_device(None if device is None else str(device))
    except UserError as e:  # devices.py words it for --device
        raise ArgumentError(str(e).replace("--device ", "device="), str(e)) from None
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"'{path}' does not exist: give a run folder (models/<run>) or a checkpoint file")
    a_file = not path.is_dir()
    folder = path.parent if a_file else path
    if not a_file:
        path = weights_file(folder, ema)
    checkpoint = load_checkpoint(path, objects=True)
    if a_file and not ema:
        check_ema_choice(checkpoint, path)
    state, prefix = unet_weights(checkpoint, path, ema)
    if prefix:
        print(f"{path}: the network under '{prefix[:-1]}'")

    config = run_config(folder)
    arch = {**architecture_of(state), **config.get("model_args", {}), **model_args}
    diffusion_args = dict(config.get("diffusion_args", {}))
    diffusion_args.setdefault("img_size", 64)
    diffusion_args["c_in"] = arch["c_in"]
    if image_size is not None:
        diffusion_args["img_size"] = image_size

    conditional = "num_classes" in arch
    model = (UNet_conditional if conditional else UNet)(**arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"'{path}' does not fit the architecture {arch}: {str(e).splitlines()[0]}")
    model = model.to(device).eval().requires_grad_(False)
    model.class_names = config.get("class_names")
    if diffusion_args.pop("objective", "ddpm") == "flow":
        diffusion = (ddpm_conditional.Flow if conditional else flow.Flow)(**diffusion_args, device=device)
    else:
        diffusion = (ddpm_conditional.Diffusion if conditional else ddpm.Diffusion)(**diffusion_args, device=device)
    return model, diffusion


def checked_image_size(image_size, img_size) -> int | None:
    """load's image size, given under either name: None, or a whole multiple of 8 (the UNet halves it 3 times)."""
    if image_size is not None and img_size is not None and image_size != img_size:
        raise ArgumentError(f"image_size={image_size!r} and img_size={img_size!r} are two names of one setting: "
                            f"give one", f"--image_size {image_size} and --img_size {img_size} are one flag: give one")
    name, size = ("image_size", image_size) if image_size is not None else ("img_size", img_size)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8 or size % 8:
        raise ArgumentError(f"{name} must be a positive multiple of 8 (the UNet halves it 3 times), got {size!r}",
                            f"--image_size {size} must be a positive multiple of 8 (the UNet halves it 3 times)")
    return int(size)


def weights_file(folder: Path, ema: bool) -> Path:
    """The checkpoint a run folder samples: ema_ckpt.pt when `ema` and present, else ckpt.pt."""
    ckpt, ema_ckpt = folder / "ckpt.pt", folder / "ema_ckpt.pt"
    if ema and ema_ckpt.is_file():
        return ema_ckpt
    if ckpt.is_file():
        return ckpt
    if ema_ckpt.is_file():
        why = f"'{folder}' holds only EMA weights (ema_ckpt.pt, no ckpt.pt)"
        raise ArgumentError(f"ema=False: {why}: drop ema=False", f"--no_ema: {why}: drop --no_ema")
    raise UserError(f"'{folder}' holds no ckpt.pt: give a run folder (models/<run>) or a checkpoint file")


def check_ema_choice(checkpoint, path: Path) -> None:
    """ema=False asks a file for its other network than the EMA's: refused where the file holds only one."""
    if len(network_prefixes(tensors_of(checkpoint))) != 1:
        return  # several: unet_weights chooses (or says why it cannot); none: unet_weights says so
    why = f"'{path}' holds one network, so there is no EMA to leave out"
    other = path.parent / "ckpt.pt"
    if path.name == "ema_ckpt.pt" and other.is_file():
        raise ArgumentError(f"ema=False: {why}: the run's other weights are '{other}' (or load the run folder "
                            f"'{path.parent}' with ema=False)",
                            f"--no_ema: {why}: give --run {other} (or --run {path.parent} --no_ema)")
    raise ArgumentError(f"ema=False: {why}: drop ema=False", f"--no_ema: {why}: drop --no_ema")


def load_from_flags(run: str, no_ema: bool = False, device: str | None = None, image_size: int | None = None,
                    warn: bool = True) -> tuple[nn.Module, ddpm.Diffusion]:
    """`load` for a script's --run, --no_ema, --device and --image_size: each flag checked against the run, and
    the errors naming the flags. --no_ema on a run folder without EMA weights would change nothing: refused. With
    `warn`, print size_warning's line."""
    path = Path(run).expanduser()
    if no_ema and path.is_dir() and (path / "ckpt.pt").is_file() and not (path / "ema_ckpt.pt").is_file():
        raise UserError(f"--no_ema would change nothing: {run} keeps no EMA weights (no ema_ckpt.pt; unconditional "
                        f"runs keep none), so it samples ckpt.pt without the flag: drop it")
    with flag_errors():
        model, diffusion = load(path, ema=not no_ema, device=device, image_size=image_size)
    if warn and (line := size_warning(run, image_size)):  # size_warning reads run.json: once
        print(line, file=sys.stderr)
    return model, diffusion


def size_warning(run: str, image_size: int | None) -> str | None:
    """The warning for --image_size other than the size the run learned (None for any other case): a UNet is
    convolutional, so it draws other sizes, but they are not what it was trained on."""
    if image_size is None:  # nothing to compare: run.json stays unread
        return None
    learned = run_config(run).get("diffusion_args", {}).get("img_size")
    if learned is None or image_size == learned:
        return None
    return (f"warning: {run} learned {learned}x{learned} images (run.json); --image_size {image_size} samples "
            f"another size, which its convolutional UNet draws, though not as well")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps and the guidance flags, as sample.py and evaluate.py take them: unless given,
    the run's recommended settings."""
    p.add_argument("--sampler", choices=ddpm.SAMPLERS + flow.SAMPLERS, default=None,
                   help="DDPM runs: ddim: Song et al. (eta 0: deterministic); ddpm: ancestral; dpmpp2m: "
                        "DPM-Solver++(2M); flow-matching runs: euler, or heun (2nd order) "
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
    if not Path(path).expanduser().exists():
        raise UserError(f"'{path}' does not exist: give the run folder or checkpoint file that load was given")
    saved = run_config(path).get("sampling", {})
    settings = ddpm.default_sampling(getattr(model, "inc_skip", None) is not None)
    if hasattr(model, "num_classes") if conditional is None else conditional:
        settings.update(cfg_scale=CFG_SCALE, guidance_interval=None)
    settings.update({k: v for k, v in saved.items() if k in settings})
    if settings.get("guidance_interval") is not None:
        settings["guidance_interval"] = tuple(settings["guidance_interval"])
    return settings


def fill_sampling(args: argparse.Namespace, model: nn.Module, conditional: bool, warn: bool = True) -> None:
    """Set each sampling flag not given on the command line to the run's recommendation; with `warn`, print
    drift_warning's line."""
    for key, value in recommended(args.run, model, conditional).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if warn and (line := drift_warning(args, model)):
        print(line, file=sys.stderr)


def drift_warning(args: argparse.Namespace, model: nn.Module) -> str | None:
    """The warning for a deterministic sampler asked of the original's network (None for any other case)."""
    if args.sampler in ("ddim", "dpmpp2m") and model.inc_skip is None:
        return (f"warning: {args.run} is the original's network (no input skip), on which deterministic samplers "
                f"drift (DDIM-50 drew the asked digit 16.5% of the time, docs/sampling.md): --sampler ddpm works")
    return None


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


def check_objective(sampler: str, run: str, flow_run: bool) -> None:
    """--sampler against the run's objective: DDPM's samplers for a DDPM run, the ODE's for a flow-matching one."""
    if (sampler in flow.SAMPLERS) != flow_run:
        kind, samplers = ("a flow-matching", flow.SAMPLERS) if flow_run else ("a DDPM", ddpm.SAMPLERS)
        raise UserError(f"--sampler {sampler} does not apply to {run}, {kind} run: use {' or '.join(samplers)}")


def sampler_steps(args: argparse.Namespace, given: set[str], diffusion: ddpm.Diffusion | flow.Flow) -> int | None:
    """--sampler checked against the run's objective, and --steps as the sampler's `steps`: 0 means every step, the
    original's chain for ddpm (steps=None) and all T-1 steps for the other DDPM samplers."""
    flow_run = isinstance(diffusion, flow.Flow)
    check_objective(args.sampler, args.run, flow_run)
    if flow_run:
        if args.steps == 0:
            raise UserError("--steps 0 (every step) is the DDPM chain's: a flow-matching run takes a number of ODE "
                            "steps, at least 1")
        return args.steps
    most = diffusion.noise_steps - 1
    if args.steps > most:
        if "steps" in given:
            raise UserError(f"--steps {args.steps}: {args.run} has T = {diffusion.noise_steps} noise levels, so a "
                            f"chain has at most {most} steps (--steps 0: all of them)")
        args.steps = most  # the run's recommendation is more than its chain has
    if args.steps:
        return args.steps
    return None if args.sampler == "ddpm" else most


def visited_times(diffusion: ddpm.Diffusion | flow.Flow, sampler: str, steps: int | None) -> list[float]:
    """The times at which a sampler asks the network, descending, as guidance compares them: timesteps, or for flow
    matching 1000 t, the first (t = 1) counted as T - 1."""
    if isinstance(diffusion, flow.Flow):
        times = diffusion.times(steps)
        asked = times[:-1] + ([] if sampler == "euler" else times[1:-1])  # heun: each step's end too, but the last
        return sorted((min(diffusion.noise_steps * t, diffusion.noise_steps - 1) for t in asked), reverse=True)
    return diffusion.timesteps(steps, log_snr=sampler == "dpmpp2m").tolist()


def check_guidance(args: argparse.Namespace, given: set[str], classes: list[int], steps: int | None,
                   diffusion: ddpm.Diffusion) -> None:
    """--cfg_scale and --guidance_interval against the labels, the scale and the sampler's timesteps: an interval
    outside 0..T-1 is refused, and so is a guidance flag that would change nothing."""
    interval, scale = args.guidance_interval, args.cfg_scale
    if "guidance_interval" in given:
        try:
            check_guidance_interval(interval, diffusion.noise_steps)
        except ValueError as e:
            raise UserError(f"--{e}")
    flags = [f"--{k}" for k in ("cfg_scale", "guidance_interval") if k in given]
    if flags and all(c == -1 for c in classes):
        raise UserError(f"{' and '.join(flags)} would change nothing: --labels -1 draws only the unconditional "
                        f"model, which guidance leaves as it is")
    if "guidance_interval" not in given:
        return
    lo, hi = interval
    if scale <= 0 or scale == 1:
        whose = "given" if "cfg_scale" in given else "the run's"
        raise UserError(f"--guidance_interval {lo} {hi} would change nothing: the guidance scale is {scale:g} "
                        f"({whose}), which does not guide (1, or 0 and below): give --cfg_scale too, or drop it")
    visited = visited_times(diffusion, args.sampler, steps)
    if not any(lo <= t <= hi for t in visited):
        shown = ", ".join(f"{t:g}" for t in visited[:8]) + (", ..." if len(visited) > 8 else "")
        raise UserError(f"--guidance_interval {lo} {hi} would change nothing: the {args.sampler} sampler's "
                        f"{len(visited)} steps visit none of those timesteps ({shown}): widen it, or drop it")


def main(argv: list[str] | None = None) -> None:
    """Every flag is checked against the run before sampling: one that the run cannot honour, or that would change
    nothing, is refused in one line; one that departs from what the run learned is done, with a warning."""
    p = ArgumentParser("Sample images from a trained run.")
    p.add_argument("--run", required=True, help="a run folder (models/<run_name>) or a checkpoint file")
    p.add_argument("--labels", nargs="+", default=None,
                   help="conditional runs: one grid row per class, given by index or by name (a folder's sub-folder "
                        "names), -1 for the unconditional model (default: every class)")
    p.add_argument("--n", type=whole(1), default=None,
                   help="images in all, as in sample(model, n): a conditional run's are split evenly over --labels, "
                        "a grid row each (default: 8 per label; unconditional: 8)")
    add_sampler_args(p)
    p.add_argument("--eta", type=real(0), default=None,
                   help="DDIM noise, in [0, 1]: 0 deterministic, 1 like DDPM (default: 0)")
    p.add_argument("--no_ema", action="store_true",
                   help="use ckpt.pt even when ema_ckpt.pt exists; of a file that holds two networks (resume.pt), "
                        "the one that is not the EMA")
    p.add_argument("--image_size", "--img_size", type=whole(8), default=None,
                   help="image size, a multiple of 8, of a bare checkpoint without run.json (default: 64, the "
                        "original's); another size than a run's own is drawn with a warning")
    add_runtime_args(p)
    p.add_argument("--out", default="samples.png", help="the grid image (its extension names the format)")
    p.add_argument("--out_dir", default=None, help="also write every image as its own PNG here")
    args = p.parse_args(argv)
    given = {k for k in ("labels", "cfg_scale", "guidance_interval", "steps") if getattr(args, k) is not None}

    # what needs no run: before loading it
    if args.eta is not None and args.eta > 1:  # past 1 DDIM's noise would exceed what its step leaves room for
        raise UserError(f"--eta must be in [0, 1], got {args.eta:g}")
    if args.eta is not None and args.sampler not in (None, "ddim"):
        raise UserError("--eta is the ddim sampler's noise: drop it, or use --sampler ddim")
    check_image_file(args.out, flag="--out")
    writable_folder(Path(args.out).parent)
    if args.out_dir:
        writable_folder(args.out_dir)

    model, diffusion = load_from_flags(args.run, args.no_ema, args.device, args.image_size, warn=False)
    conditional = isinstance(model, UNet_conditional)
    flags = [f"--{k}" for k in ("labels", "cfg_scale", "guidance_interval") if k in given]
    if flags and not conditional:
        raise UserError(f"{args.run} is an unconditional run: {', '.join(flags)} need a class-conditional one")
    fill_sampling(args, model, conditional, warn=False)
    if args.eta is not None and args.sampler != "ddim":
        raise UserError(f"--eta is the ddim sampler's noise, and {args.run} recommends {args.sampler}: drop --eta, "
                        f"or use --sampler ddim")
    steps = sampler_steps(args, given, diffusion)
    kwargs = dict(sampler=args.sampler, steps=steps, eta=args.eta or 0.0)
    if conditional:
        classes = list(range(model.num_classes)) if args.labels is None else class_indices(args.labels, model)
        n = args.n or 8 * len(classes)
        if n % len(classes):
            raise UserError(f"--n {n} images do not split evenly over {len(classes)} labels: give a multiple of "
                            f"{len(classes)}")
        check_guidance(args, given, classes, steps, diffusion)
        nrow = n // len(classes)
        labels = torch.tensor(classes).repeat_interleave(nrow)
        kwargs.update(labels=labels, cfg_scale=args.cfg_scale, guidance_interval=args.guidance_interval)
    else:
        n = args.n or 8
        nrow = square_nrow(n)
    check_image_file(args.out, diffusion.c_in, flag="--out")
    for warning in (size_warning(args.run, args.image_size), drift_warning(args, model)):  # once nothing is refused
        if warning:
            print(warning, file=sys.stderr)

    device = next(model.parameters()).device
    seed_everything(args.seed)
    try:
        with autocast(device, autocast_dtype(args.precision, device)):
            images = diffusion.sample(model, n, **kwargs)
    except ValueError as e:  # the sampler's own checks, should one still fail
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
