"""Beyond sampling: inpainting, image-to-image, inversion and interpolation with any trained run, no retraining.

The editing methods come first: functions of a Diffusion and its trained network, built on the Diffusion's own
steps (eps_at, ddpm_step, ddim_step, sample). Each cites its paper. Each works on a flow-matching run too (a
flow.Flow: its ODE's euler_step, heun_step, invert and sample), as its docstring says; there x_T, the noise end of
the path, is x_1. The command line below runs them on image files:

    python edit.py inpaint --run models/DDPM_conditional --images my_digits --box 0.5 0 1 1 --labels 3
    python edit.py img2img --run models/DDPM_conditional --images sketch.png --strength 0.6 --labels 7
    python edit.py invert --run models/DDPM_conditional --images my_digits
    python edit.py interpolate --run models/DDPM_conditional --seeds 1 2 --labels 4
    python edit.py interpolate --run models/DDPM_conditional --images a.png b.png   # between two inversions

--images takes image files and folders, read as a training folder is, at the run's size (resized, centre-cropped).
inpaint's --mask is any image, read by one rule (mask_from_image): with transparency its opaque part is filled,
without its white part, from half up. Every flag is checked against the command and the run before the work.
Each command writes one grid (--out): a column per image, with rows input / mask / result (inpaint), input /
result (img2img), input / x_T / decoded (invert), or the frames in a row per pair (interpolate).
`python -m tools.measure_edits` measures the edits for docs/editing.md.
"""
import argparse
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import flow
import sample
from ddpm_conditional import add_guidance_args
from ddpm import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, Diffusion
from flow import Flow
from devices import autocast, autocast_dtype, seed_everything
from files import UserError, writable_folder
from masks import MASK_RULE, coverage, load_mask
from runs import add_runtime_args, ArgumentParser, real, run_main, whole
from utils import (CHANNEL_MODES, check_image_file, checked_inputs, IMAGE_EXTENSIONS, inspect_image, open_image,
                   save_images, scan_folder, to_images, transforms)


# =========================================================================== the editing methods
# Each takes the Diffusion (or Flow) first and its trained network second, in the order of diffusion.sample(model,
# ...). Images go in and come out as uint8 (N, C, H, W), as the samplers return them. A conditional Diffusion also
# takes labels, cfg_scale and guidance_interval (**cond), passed on to its steps.

# The deterministic sampler whose steps invert() runs backwards, by objective (True: flow matching): what decodes an
# inversion unless told. A Flow's heun decodes one too: it solves the same ODE, more closely.
INVERSE = {False: "ddim", True: "euler"}


def sampling_default(diffusion: Diffusion | Flow) -> str:
    """sample.py's default sampler for the diffusion's objective: dpmpp2m, or heun for a Flow."""
    return flow.DEFAULT_SAMPLER if isinstance(diffusion, Flow) else DEFAULT_SAMPLER


def from_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images to float x in [-1, 1] on `device`. The inverse of to_images, exact on the 256 levels."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), as the samplers return them, got {images.dtype}")
    return images.to(device).float() / 127.5 - 1


# -------------------- inpainting: RePaint (Lugmayr et al. 2022, Algorithm 1 and eq. 8)

def repaint_path(k: int, jump: int, resample: int) -> list[int]:
    """RePaint's schedule over the positions of a chain of k steps: 0 is x_T, k the image.

    It goes down one position at a time. At every `jump`-th position it goes back up `jump` positions (in one
    move) and down again, `resample` - 1 times.
    """
    path = [0]
    for p in range(1, k + 1):
        path.append(p)
        if resample > 1 and p % jump == 0 and p >= jump and p < k:
            for _ in range(resample - 1):
                path += [p - jump, *range(p - jump + 1, p + 1)]
    return path


@torch.inference_mode()
def inpaint(diffusion: Diffusion | Flow, model: nn.Module, images: torch.Tensor, mask: torch.Tensor,
            sampler: str | None = None, steps: int = 50, eta: float = 0.0, jump: int = 10, resample: int = 1,
            progress: bool = True, **cond) -> torch.Tensor:
    """Fill the masked part of uint8 `images` (N, C, H, W) and keep the rest exactly.

    `mask` is 1 (True) where to generate. It is (1 or N, 1 or C, H, W) and broadcasts over the images.
    Each step of the reverse chain denoises x_t (eq. 8b). Then the known part is put back, noised to the same
    level: x_{t-1}^known = sqrt(alpha_hat_{t-1}) x_0 + sqrt(1 - alpha_hat_{t-1}) eps (eq. 8a). The two parts
    combine as m * known + (1 - m) * unknown (eq. 8c, with m = 1 - mask).
    With `resample` > 1, after every `jump` steps the chain goes back up `jump` steps and down again,
    `resample` - 1 times. Going up draws x_{t+j} ~ q(x_{t+j} | x_t) in closed form. This lets the generated part
    agree with the known part (section 4.2).
    `sampler` is "ddpm" (RePaint's ancestral chain, the default) or "ddim", over `steps` evenly spaced steps.
    A Flow is inpainted the same way on its path: each step of the ODE (`sampler` "euler", or "heun", the default)
    moves the whole image from t to s, then the known part is put back as x_s^known = (1 - s) x_0 + s eps. Going
    back up from s to t draws x_t = a x_s + sqrt(t^2 - a^2 s^2) z, a = (1 - t) / (1 - s): given x_0 it is
    (1 - t) x_0 + t eps', as on the path, so resampling carries over.
    The mask's values lie in [0, 1], read as the mask files are: 0.5 and up generates, below keeps (a soft mask is
    not blended: the kept pixels come back exactly). A mask that leaves an image nothing to generate is refused.
    """
    flow_run = isinstance(diffusion, Flow)
    sampler = sampler or (flow.DEFAULT_SAMPLER if flow_run else "ddpm")
    diffusion.check_sampler(sampler, steps, eta)
    if sampler == "dpmpp2m":
        raise ValueError("inpainting takes the ddpm or ddim sampler: DPM-Solver++'s multistep history does "
                         "not survive the known part's replacement")
    if jump < 1 or resample < 1:
        raise ValueError(f"jump and resample must be at least 1, got {jump} and {resample}")
    device = next(model.parameters()).device
    x0 = from_images(images, device)
    mask = binary_mask(mask, tuple(x0.shape)).to(device)
    _, cond = checked_inputs(diffusion, model, len(x0), None, cond)
    # the time of each position on the chain (0 is x_T, the last the image), the move back up and the step down
    at, up, down = flow_moves(diffusion, model, sampler, steps, cond) if flow_run else \
        ddpm_moves(diffusion, model, sampler, steps, eta, cond)

    def known(t: int | float) -> torch.Tensor:  # eq. 8a: the known part, noised to level t
        return diffusion.noise_images(x0, torch.full((len(x0),), t, device=device))[0]

    keep = mask == 0  # torch.where, not m * a + (1 - m) * b: the kept part stays exact even if the rest overflows
    noise = torch.randn_like(x0)
    x = torch.where(keep, known(at[0]), noise)
    path = repaint_path(len(at) - 1, jump, resample)
    for a, b in tqdm(list(zip(path[:-1], path[1:])), desc="inpainting", leave=False, disable=not progress):
        if b < a:  # back up the chain
            x = up(x, at[a], at[b])
            continue
        x = down(x, at[a], at[b])  # eq. 8b
        x = torch.where(keep, known(at[b]), x)  # eq. 8c
    return to_images(torch.where(keep, x0, x))


def ddpm_moves(diffusion: Diffusion, model: nn.Module, sampler: str, steps: int, eta: float, cond: dict):
    """inpaint's chain on a DDPM: its timesteps, the move up from i to j and the sampler's step down."""
    diffusion._to(next(model.parameters()).device)
    alpha_hat = diffusion.alpha_hat

    def up(x: torch.Tensor, i: int, j: int) -> torch.Tensor:  # q(x_j | x_i) = N(sqrt(ratio) x_i, (1 - ratio) I)
        ratio = alpha_hat[j] / alpha_hat[i]
        return ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn_like(x)

    def down(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        eps = diffusion.eps_at(model, x, i, bool((alpha_hat[j] / alpha_hat[i]).sqrt() > 10), **cond)
        if sampler == "ddpm":  # the respaced step and its posterior variance, as sample's
            alpha = alpha_hat[i] / alpha_hat[j]
            return diffusion.ddpm_step(x, eps, i, alpha, (1 - alpha_hat[j]) / (1 - alpha_hat[i]) * (1 - alpha),
                                       j == 0)
        return diffusion.ddim_step(x, eps, i, j, eta, j == 0)
    return diffusion.timesteps(steps).tolist() + [0], up, down


def flow_moves(diffusion: Flow, model: nn.Module, sampler: str, steps: int, cond: dict):
    """inpaint's chain on a Flow: the ODE's times 1 .. 0, the move up from s to t and the sampler's step down."""
    def up(x: torch.Tensor, s: float, t: float) -> torch.Tensor:  # the path's marginals kept: see inpaint
        a = (1 - t) / (1 - s)
        return a * x + (t ** 2 - (a * s) ** 2) ** 0.5 * torch.randn_like(x)

    def down(x: torch.Tensor, t: float, s: float) -> torch.Tensor:  # as Flow.sample steps
        return diffusion.step(sampler, model, x, t, s, **cond)
    return diffusion.times(steps), up, down


def binary_mask(mask, shape: tuple[int, ...]) -> torch.Tensor:
    """inpaint's `mask` checked against images of `shape` (N, C, H, W), as float 0/1: 1 where the value is at least
    0.5, the rule of the mask files (mask_from_image)."""
    mask = torch.as_tensor(mask).float()
    if mask.dim() != 4 or mask.shape[-2:] != shape[-2:] or mask.shape[0] not in (1, shape[0]) \
            or mask.shape[1] not in (1, shape[1]):
        raise ValueError(f"mask must be (1 or N, 1 or C, H, W) for images {shape}, got {tuple(mask.shape)}")
    low, high = mask.min().item(), mask.max().item()
    if not 0 <= low <= high <= 1:  # nan too
        got = f"values up to {high:g}" + (": divide by 255" if high <= 255 else "") if high > 1 else \
            f"values down to {low:g}" if low < 0 else "nan"
        raise ValueError(f"mask must be 0/1 (1 = generate), got {got}")
    mask = (mask >= 0.5).float()
    if empty := (mask.flatten(1).sum(1) == 0).nonzero().flatten().tolist():
        which = "" if mask.shape[0] == 1 else f" for image(s) {', '.join(map(str, empty))} of {shape[0]}"
        raise ValueError(f"mask selects nothing to generate{which}: no value is at least 0.5 (1 = generate)")
    return mask


# -------------------- image-to-image: SDEdit (Meng et al. 2022, Algorithm 1 and eq. 4)

@torch.inference_mode()
def img2img(diffusion: Diffusion | Flow, model: nn.Module, images: torch.Tensor, strength: float,
            sampler: str | None = None, steps: int | None = DEFAULT_STEPS, noise: torch.Tensor | None = None,
            **kwargs) -> torch.Tensor:
    """Noise uint8 `images` part of the way up the chain, then denoise them with any sampler.

    `strength` in [0, 1] says how far: to t0, the sampler's first timestep at or below strength * (T - 1).
    There x_t0 = sqrt(alpha_hat_t0) x_0 + sqrt(1 - alpha_hat_t0) z (eq. 4), with z = `noise` (default N(0, I)).
    The sampler (default: sampling's, dpmpp2m; heun for a Flow) then runs its `steps` from t0 down (None: the
    sampler's own default, as in sample).
    A Flow's t0 is the first of its ODE's times at or below strength itself: there x_t0 = (1 - t0) x_0 + t0 z
    (Flow.noise_images), and Flow.sample integrates the ODE from it (start=t0).
    Strength 0 returns the images. Strength 1 starts from pure noise z and equals sample(noise=z).
    A conditional model takes labels and guidance, and pulls the images towards the class asked.
    """
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    flow_run = isinstance(diffusion, Flow)
    sampler = sampler or sampling_default(diffusion)
    steps = flow.DEFAULT_STEPS if flow_run and steps is None else steps  # the ODE's times need a number
    diffusion.check_sampler(sampler, steps)
    device = next(model.parameters()).device
    x0 = from_images(images, device)
    z = torch.randn_like(x0) if noise is None else noise.to(device)
    if flow_run:
        t0 = diffusion.times(steps, strength)[0]
        if t0 == 0:  # too weak to reach the ODE's first step
            return images.clone()
        x = diffusion.noise_images(x0, torch.full((len(x0),), t0, device=device), z)[0]
        return diffusion.sample(model, len(x0), sampler=sampler, steps=steps, noise=x, start=t0, **kwargs)
    diffusion._to(device)
    alpha_hat = diffusion.alpha_hat
    chain = diffusion.timesteps(50 if sampler != "ddpm" and steps is None else steps, log_snr=sampler == "dpmpp2m")
    chain = chain[chain <= round(strength * (diffusion.noise_steps - 1))]  # sample's chain (ddim: 50 unless told)
    if not len(chain):  # too weak to reach the chain's first step
        return images.clone()
    t0 = chain[0].item()
    # eq. 4 with this z; from T-1 the chain starts at pure noise, as sampling does
    x = z if t0 == diffusion.noise_steps - 1 else alpha_hat[t0].sqrt() * x0 + (1 - alpha_hat[t0]).sqrt() * z
    return diffusion.sample(model, len(x0), sampler=sampler, steps=steps, noise=x, start=t0, **kwargs)


# -------------------- inversion: DDIM run backwards (Song et al. 2021, eq. 12 at sigma = 0, the ODE of eq. 13)

@torch.inference_mode()
def invert(diffusion: Diffusion | Flow, model: nn.Module, images: torch.Tensor, steps: int = 50,
           progress: bool = True, **cond) -> torch.Tensor:
    """The x_T from which sample(sampler="ddim", steps=steps, noise=x_T) gives back uint8 `images`; for a Flow,
    the x_1 from which sample(sampler="euler", steps=steps, noise=x_1) does.

    DDIM's deterministic update runs from t = 0 up the same timesteps:
    x_next = sqrt(alpha_hat_next) x0_pred + sqrt(1 - alpha_hat_next) eps.
    eps is predicted at the current, less noisy x_t rather than at x_next. This approximation keeps it to one
    evaluation a step; its error shrinks as the steps get smaller.
    A Flow's ODE runs forwards instead, from t = 0 to 1 in the same Euler steps (Flow.invert, no progress bar):
    x_{t+h} = x_t + h v(x_t, t), v predicted at the start of each step as DDIM's eps is. sampler="heun" decodes
    x_1 too, more closely: it solves the same ODE to second order, at twice the evaluations.
    Returns float x_T. A conditional model takes labels; guidance 1 (cfg_scale=1) gives the closest round trip.
    """
    flow_run = isinstance(diffusion, Flow)
    diffusion.check_sampler(INVERSE[flow_run], steps)
    device = next(model.parameters()).device
    if flow_run:
        return diffusion.invert(model, from_images(images, device), steps, **cond)
    diffusion._to(device)
    alpha_hat = diffusion.alpha_hat
    x = from_images(images, device)
    _, cond = checked_inputs(diffusion, model, len(x), None, cond)
    up = [0] + diffusion.timesteps(steps).flip(0).tolist()
    for i, j in tqdm(list(zip(up[:-1], up[1:])), desc="inverting", leave=False, disable=not progress):
        eps = diffusion.eps_at(model, x, i, **cond)
        x = alpha_hat[j].sqrt() * diffusion.predict_x0(x, eps, i) + (1 - alpha_hat[j]).sqrt() * eps
    return x


# -------------------- interpolation: slerp (Shoemake 1985) between two x_T, decoded

def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between a and b, one result for each weight in `w`.

    slerp = sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the angle between a and b.
    Gaussian noise keeps its norm along this arc. A straight line would pass through x_T of low norm, which the
    model never saw. w = 0 gives a exactly, and w = 1 gives b.
    """
    theta = torch.arccos((a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1))
    w = w.to(a.dtype).view(-1, *[1] * a.dim())
    if theta < 1e-4:  # parallel: the straight line
        return (1 - w) * a + w * b
    # the weights first: sin(theta) / sin(theta) is exactly 1, so the ends are exactly a and b
    return torch.sin((1 - w) * theta) / torch.sin(theta) * a + torch.sin(w * theta) / torch.sin(theta) * b


@torch.inference_mode()
def interpolate(diffusion: Diffusion | Flow, model: nn.Module, noise_a: torch.Tensor, noise_b: torch.Tensor,
                frames: int = 8, sampler: str | None = None, steps: int | None = None, **kwargs) -> torch.Tensor:
    """`frames` images along the slerp from x_T = noise_a to x_T = noise_b, decoded by a deterministic sampler.

    `sampler` is ddim (the default, 50 steps unless told) or dpmpp2m; for a Flow, whose ODE is deterministic,
    euler or heun (the default, 8 steps unless told: Flow.sample's).
    noise_a and noise_b are (C, H, W): two draws of N(0, I), or two inversions.
    The first and last frames are the samples of noise_a and noise_b.
    A conditional model takes labels: one for every frame, or one each.
    """
    if sampler == "ddpm" and not isinstance(diffusion, Flow):  # a Flow's sample refuses DDPM's samplers itself
        raise ValueError("interpolation needs a deterministic sampler (ddim or dpmpp2m): the ancestral chain "
                         "adds fresh noise at every step")
    if frames < 2:
        raise ValueError(f"frames must be at least 2 (the two ends), got {frames}")
    shape = (diffusion.c_in, diffusion.img_size, diffusion.img_size)
    if tuple(noise_a.shape) != shape or tuple(noise_b.shape) != shape:
        raise ValueError(f"noise_a and noise_b must each be one x_T of shape {shape}, got {tuple(noise_a.shape)} "
                         f"and {tuple(noise_b.shape)}")
    x = slerp(noise_a, noise_b, torch.linspace(0, 1, frames))
    if isinstance(diffusion, Flow):
        sampler = sampler or flow.DEFAULT_SAMPLER  # and steps None: Flow.sample's default
    else:  # 50 steps checked against the chain, as a given number is
        sampler, steps = sampler or "ddim", 50 if steps is None else steps
    return diffusion.sample(model, frames, sampler=sampler, steps=steps, noise=x, **kwargs)


# =========================================================================== the command line

# --------------------------------------------------------------------------- inputs

def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders' images as a training folder's (sorted, litter left out); each checked readable."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"'{path}' does not exist: give image files or folders of images")
        found = [p for p, _ in scan_folder(path).samples] if path.is_dir() else [path]
        if not found:
            raise UserError(f"'{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
    for file in files:
        if isinstance(info := inspect_image(file), str):
            raise UserError(f"'{file}' is not a readable image ({info})")
    return files


def load_inputs(files: list[Path], channels: int, size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """uint8 (N, C, size, size): each file resized (shorter side) and centre-cropped, as evaluate.py's real images;
    and each file's own size. A colour image for a grayscale run is refused: its colour would be lost."""
    T = transforms()
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    for file in files:
        if inspect_image(file).colour and channels == 1:
            raise UserError(f"'{file}' is in colour and the run is grayscale (1 channel): give a grayscale image")
    images = [open_image(file, CHANNEL_MODES[channels]) for file in files]
    return torch.stack([transform(im) for im in images]), [im.size for im in images]


def label_kwargs(args: argparse.Namespace, model, diffusion: Diffusion | Flow, n: int, guided: bool = True) -> dict:
    """The conditioning for n images: --labels (one each, or one for all; -1, the unconditional model, unless
    given) and the guidance flags (the run's, else the original's; unguided for a deterministic round trip)."""
    if not hasattr(model, "num_classes"):
        if given := [f"--{k}" for k in ("labels", "cfg_scale", "guidance_interval") if getattr(args, k) is not None]:
            raise UserError(f"{args.run} is an unconditional run: {', '.join(given)} need a class-conditional one")
        return {}
    labels = sample.class_indices(args.labels, model) if args.labels else [-1]
    if len(labels) not in (1, n):
        each = f", or one for each of the {n} images" if n > 1 else f" ({args.command} keeps one class throughout)"
        raise UserError(f"--labels: give one label{each}, got {len(labels)}")
    settings = sample.recommended(args.run, model)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else settings["cfg_scale"] if guided else 1.0
    if args.guidance_interval:
        (lo, hi), top = args.guidance_interval, diffusion.noise_steps - 1
        if not lo <= hi <= top:
            raise UserError(f"--guidance_interval {lo} {hi}: give timesteps LO <= HI of this run's 0..{top}")
        if cfg_scale == 1 or cfg_scale <= 0:
            why = (f"--cfg_scale {cfg_scale:g} is no guidance" if args.cfg_scale is not None else
                   f"{args.command} is unguided (cfg_scale 1) unless --cfg_scale is given")
            raise UserError(f"--guidance_interval: {why}, so there is no guidance to limit: give --cfg_scale above "
                            f"1 too, or drop --guidance_interval")
    interval = args.guidance_interval or (settings["guidance_interval"] if guided else None)
    return dict(labels=torch.tensor(labels).expand(n), cfg_scale=cfg_scale, guidance_interval=interval)


def steps_of(args: argparse.Namespace, diffusion: Diffusion | Flow, default: int) -> int:
    """--steps, checked against the run's chain; unless given, `default`, or the whole chain if it is shorter. A
    Flow's ODE has no chain: any number of steps."""
    if isinstance(diffusion, Flow):
        return args.steps or default
    if (args.steps or 0) >= diffusion.noise_steps:
        raise UserError(f"--steps {args.steps}: this run has {diffusion.noise_steps} noise steps: give at most "
                        f"{diffusion.noise_steps - 1}")
    return args.steps or min(default, diffusion.noise_steps - 1)


# --------------------------------------------------------------------------- the flags, checked before the work

def check_flags(args: argparse.Namespace) -> None:
    """The flags against the command, each other and the run's objective, before anything but its run.json is read."""
    command, sampler, images, seeds = args.command, args.sampler, args.images, getattr(args, "seeds", None)
    flow_run = sample.run_config(args.run).get("diffusion_args", {}).get("objective") == "flow"  # as load reads it
    if sampler is not None:  # first: the checks below name the samplers of the run's objective
        sample.check_objective(sampler, args.run, flow_run)
    if command == "inpaint":
        if sampler == "dpmpp2m":
            raise UserError("--sampler dpmpp2m: inpainting takes ddpm or ddim (DPM-Solver++'s multistep history "
                            "does not survive the known part's replacement)")
        if args.box and not (0 <= args.box[0] < args.box[2] <= 1 and 0 <= args.box[1] < args.box[3] <= 1):
            raise UserError(f"--box {' '.join(f'{v:g}' for v in args.box)}: give LEFT TOP RIGHT BOTTOM as fractions "
                            f"of the image, 0 <= LEFT < RIGHT <= 1 and 0 <= TOP < BOTTOM <= 1")
        if args.jump is not None and (args.resample or 1) == 1:
            raise UserError(f"--jump {args.jump}: RePaint jumps back only when it resamples: give --resample 2 or "
                            f"more too, or drop --jump")
    if command == "img2img" and not 0 <= args.strength <= 1:
        raise UserError(f"--strength must be in [0, 1], got {args.strength:g}: 0 keeps the images, 1 samples afresh")
    if command == "invert" and not flow_run and sampler not in (None, "ddim"):
        raise UserError(f"--sampler {sampler}: invert runs DDIM both ways (the inversion is DDIM's): drop --sampler")
    if command == "interpolate" and sampler == "ddpm":
        raise UserError("--sampler ddpm: interpolation decodes with a deterministic sampler, ddim or dpmpp2m (the "
                        "ancestral chain adds fresh noise at every step)")
    if images is not None and seeds is not None:
        raise UserError("--seeds with --images: the two ends are the images' inversions, or two seeds' noise: give "
                        "one of the two")
    if command == "interpolate" and images is not None and sampler == "dpmpp2m":
        raise UserError("--sampler dpmpp2m with --images: the ends are DDIM inversions, which only DDIM decodes back "
                        "into the images: drop --sampler")
    if seeds is not None and seeds[0] == seeds[1]:
        raise UserError(f"--seeds {seeds[0]} {seeds[1]}: the two ends are one x_T, and every frame the same image: "
                        f"give two seeds")
    if command in ("invert", "interpolate") and args.seed is not None:
        ends = ": the two x_T come from --seeds (or --images)" if command == "interpolate" else ""
        raise UserError(f"--seed: {command} draws no noise (its sampler is deterministic){ends}: drop --seed")


def check_inputs(args: argparse.Namespace, files: list[Path]) -> None:
    """The number of images, and the mask file: before the run is loaded."""
    if args.command == "interpolate" and args.images is not None:
        if len(files) != 2:
            raise UserError(f"interpolate takes two end points: --images A B, or --seeds A B: {len(files)} given")
        if files[0].resolve() == files[1].resolve():
            raise UserError(f"--images gives {files[0]} twice: the two ends would be one image")
    if getattr(args, "mask", None):
        if not (path := Path(args.mask)).is_file():
            raise UserError(f"--mask {path}: {'a folder' if path.is_dir() else 'no such file'}: give one image")
        if isinstance(info := inspect_image(path), str):
            raise UserError(f"--mask {path} is not a readable image ({info})")


def output_file(args: argparse.Namespace, files: list[Path]) -> Path:
    """--out, checked: a format Pillow writes, not one of the inputs, in a writable folder."""
    out = Path(args.out or f"edit_{args.command}.png")
    check_image_file(out, flag="--out")
    inputs = files + ([Path(args.mask)] if getattr(args, "mask", None) else [])
    if out.exists() and out.resolve() in {f.resolve() for f in inputs}:
        raise UserError(f"--out {out} is one of the inputs, which the grid would overwrite: give another name")
    writable_folder(out.parent)
    return out


# --------------------------------------------------------------------------- the commands

def run(args: argparse.Namespace) -> None:
    check_flags(args)  # everything that can be checked before the work is checked before it, cheapest first
    files = image_files(args.images) if args.images else []
    check_inputs(args, files)
    out = output_file(args, files)
    model, diffusion = sample.load_from_flags(args.run, args.no_ema, args.device, args.image_size)  # each checked
    check_image_file(out, diffusion.c_in, flag="--out")
    work = prepare(args, model, diffusion, files)
    device = next(model.parameters()).device
    seed_everything(args.seed or 0)
    with autocast(device, autocast_dtype(args.precision, device)):
        rows, nrow = work()
    save_images(torch.cat([row.cpu() for row in rows]), out, nrow=nrow)
    print(f"wrote {out}")


def prepare(args, model, diffusion: Diffusion | Flow, files: list[Path]):
    """The checks that need the run (loaded: cheap), then the command's work as a function that returns the grid's
    rows and the images a row. inpaint and img2img first say in one line what they will do."""
    size, n, command = diffusion.img_size, len(files), args.command
    inverse = INVERSE[isinstance(diffusion, Flow)]
    x, sizes = load_inputs(files, diffusion.c_in, size) if files else (None, [])
    steps = steps_of(args, diffusion, DEFAULT_STEPS if command == "img2img" else 50)
    cond = label_kwargs(args, model, diffusion, n if files and command != "interpolate" else 1,
                        guided=command in ("inpaint", "img2img"))
    if command == "inpaint":
        jump, resample = args.jump or 10, args.resample or 1
        if resample > 1 and jump >= steps:
            raise UserError(f"--resample {resample}: the chain jumps back every --jump {jump} steps before its end, "
                            f"and {steps} steps have no such point: give a --jump below --steps")
        mask, how = load_mask(args, sizes, files, size)
        print(coverage(mask, how))

        def work():
            filled = inpaint(diffusion, model, x, mask, sampler=args.sampler, steps=steps, jump=jump,
                             resample=resample, **cond)
            return [x, (x * (1 - mask)).to(torch.uint8), (mask.expand_as(x.float()) * 255).to(torch.uint8), filled], n
    elif command == "img2img":
        sampler = args.sampler or sampling_default(diffusion)
        print(img2img_line(args.strength, diffusion, sampler, steps))

        def work():
            return [x, img2img(diffusion, model, x, args.strength, sampler=sampler, steps=steps, **cond)], n
    elif command == "invert":
        sampler = args.sampler or inverse

        def work():
            x_T = invert(diffusion, model, x, steps=steps, **cond)
            decoded = diffusion.sample(model, n, sampler=sampler, steps=steps, noise=x_T, progress=False, **cond)
            error = (decoded.float() - x.float()).abs().mean().item()
            print(f"decoded from x_T: mean absolute error {error:.2f} of 255 ({steps} "
                  f"{'DDIM' if sampler == 'ddim' else sampler} steps)")
            return [x, to_images(x_T / 3), decoded], n  # x_T shown at a third of its scale: N(0, 1) within [-1, 1]
    else:  # interpolate: between two seeds' noise, or two inversions, along one class
        cond = {**cond, "labels": cond["labels"][0]} if cond else {}

        def work():
            if files:
                ends = invert(diffusion, model, x, steps=steps, **cond)
            else:
                ends = torch.stack([torch.randn((diffusion.c_in, size, size), generator=torch.Generator()
                                                .manual_seed(s)) for s in args.seeds or (0, 1)])
            # between inversions the sampler that inverts them, else interpolate's default
            return [interpolate(diffusion, model, ends[0], ends[1], args.frames,
                                sampler=args.sampler or (inverse if files else None), steps=steps, **cond)], args.frames
    return work


def img2img_line(strength: float, diffusion: Diffusion | Flow, sampler: str, steps: int) -> str:
    """What img2img will do: how far `strength` noises the images, and how many of the sampler's steps follow."""
    if isinstance(diffusion, Flow):
        times = diffusion.times(steps, strength)
        t0, top, k, lowest = f"{times[0]:.3g}", 1, len(times) - 1, f"{1 / steps:.3g}"
    else:
        top = diffusion.noise_steps - 1
        chain, t0 = diffusion.timesteps(steps, log_snr=sampler == "dpmpp2m"), round(strength * top)
        k, lowest = int((chain <= t0).sum()), chain[-1].item()
    return f"img2img: strength {strength:g} " + (f"noises each image to t = {t0} of {top}, then {k} of the {steps} "
                                                  f"{sampler} steps denoise it" if k else f"reaches none of the "
                                                  f"{steps} {sampler} steps (the lowest at t = {lowest}): the images "
                                                  f"come back unchanged")


# --------------------------------------------------------------------------- the flags

def build_parser() -> ArgumentParser:
    p = ArgumentParser("Inpaint, image-to-image, invert and interpolate with a trained run.",
                       epilog="Each command's flags: python edit.py COMMAND --help. Every flag is checked against the "
                              "command and the run before the work. The edits' measurements: python -m "
                              "tools.measure_edits --help.")
    commands = p.add_subparsers(dest="command", required=True)
    helps = {"inpaint": "fill a masked part of each image (RePaint)",
             "img2img": "noise each image part of the way and denoise it (SDEdit)",
             "invert": "find the x_T that DDIM (flow matching: Euler) decodes into each image, and decode it",
             "interpolate": "decode the slerp between two x_T (two seeds, or two inverted images)"}
    samplers = {"inpaint": "ddpm (RePaint's ancestral chain) or ddim (default: ddpm); a flow-matching run's: euler or "
                           "heun (default: heun)",
                "img2img": f"any of the run's (default: {DEFAULT_SAMPLER}; a flow-matching run's: "
                           f"{flow.DEFAULT_SAMPLER})",
                "invert": "ddim only: the inversion is DDIM's; a flow-matching run's, to decode: euler (default: "
                          "the inversion's own steps) or heun (closer, at twice the evaluations)",
                "interpolate": "decoding: ddim or dpmpp2m; with --images ddim only (default: ddim); a flow-matching "
                               "run's: euler or heun (default: heun; with --images euler, as invert)"}
    for name, help_text in helps.items():
        c = commands.add_parser(name, help=help_text, description=help_text)
        c.add_argument("--run", required=True, help="a run folder (models/<run_name>) or a checkpoint file")
        add_runtime_args(c)
        if name in ("invert", "interpolate"):  # deterministic: a --seed would change nothing, and is refused
            c.set_defaults(seed=None)
        c.add_argument("--images", nargs="+", default=None, required=name != "interpolate",
                       help="image files or folders" + (" (two: between their inversions)" if name == "interpolate"
                                                        else ""))
        c.add_argument("--labels", nargs="+", default=None,
                       help="conditional runs: a class (index or name) for all images, or one each; -1 = none "
                            "(default: -1)")
        add_guidance_args(c)
        c.add_argument("--sampler", choices=SAMPLERS + flow.SAMPLERS, default=None, help=samplers[name])
        c.add_argument("--steps", type=whole(1), default=None,
                       help=f"sampler steps, below the run's noise steps (default: "
                            f"{DEFAULT_STEPS if name == 'img2img' else 50}, or all if the run has fewer); a "
                            f"flow-matching run's ODE takes any number")
        c.add_argument("--no_ema", action="store_true", help="use ckpt.pt even when ema_ckpt.pt exists")
        c.add_argument("--image_size", type=whole(8), default=None, help="a bare checkpoint's image size (64)")
        c.add_argument("--out", default=None, help=f"the grid image, a format Pillow writes (default: edit_{name}.png)")
        if name == "inpaint":
            where = c.add_mutually_exclusive_group(required=True)
            where.add_argument("--box", type=real(0), nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                               help="the region to fill, as fractions of the image (0.5 0 1 1: the right half); "
                                    "every pixel it touches is filled")
            where.add_argument("--mask", default=None, help=f"an image of the input images' size (resized and "
                                                            f"cropped as they are) or of the run's: {MASK_RULE}")
            c.add_argument("--jump", type=whole(1), default=None,
                           help="with --resample: steps between resamplings, below --steps (default: 10)")
            c.add_argument("--resample", type=whole(1), default=None, help="RePaint's resamplings (default: 1, none)")
        if name == "img2img":
            c.add_argument("--strength", type=real(0), required=True,
                           help="how far the image is noised, in [0, 1]: 0 returns it, 1 samples afresh")
        if name == "interpolate":
            c.add_argument("--seeds", type=whole(), nargs=2, default=None,
                           help="the two x_T's seeds, without --images (default: 0 1)")
            c.add_argument("--frames", type=whole(2), default=8, help="images from one end to the other")
    return p


def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
