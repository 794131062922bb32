"""Beyond sampling: inpaint, image-to-image (SDEdit), invert and interpolate with any trained run, no retraining.

    python edit.py inpaint --run models/DDPM_conditional --images my_digits --box 0.5 0 1 1 --labels 3
    python edit.py img2img --run models/DDPM_conditional --images sketch.png --strength 0.6 --labels 7
    python edit.py invert --run models/DDPM_conditional --images my_digits
    python edit.py interpolate --run models/DDPM_conditional --seeds 1 2 --labels 4
    python edit.py interpolate --run models/DDPM_conditional --images a.png b.png   # between two inversions
    python edit.py measure --run models/DDPM_conditional --readme README.md         # the README's numbers

--images takes image files and folders, read as a training folder is, at the run's size (resized, centre-cropped).
Each command writes one grid (--out): a column per image, with rows input / mask / result (inpaint), input /
result (img2img), input / x_T / decoded (invert), or the frames in a row per pair (interpolate).
"""
import argparse
import time
from pathlib import Path

import torch

import evaluate
import sample
from ddpm_conditional import add_guidance_args
from ddpm import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, to_images
from devices import autocast, autocast_dtype, seed_everything
from runs import add_runtime_args, ArgumentParser, real, run_main, whole, writable_folder
from utils import CHANNEL_MODES, inspect_image, open_image, read_folder, save_images, transforms, UserError
from tools.readme import update_readme_block


# --------------------------------------------------------------------------- inputs

def image_files(paths: list[str]) -> list[Path]:
    """Files as given, folders' images as a training folder's (sorted, litter left out)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p, _ in read_folder(path, verbose=False)[0].samples]
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"'{path}' does not exist: give image files or folders of images")
    return files


def load_inputs(files: list[Path], channels: int, size: int) -> torch.Tensor:
    """uint8 (N, C, size, size): each file resized (shorter side) and centre-cropped, as evaluate.py's real images.
    A colour image for a grayscale run is refused: its colour would be lost."""
    T = transforms()
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    for file in files:
        info = inspect_image(file)
        if isinstance(info, str):
            raise UserError(f"'{file}' is not a readable image ({info})")
        if info.colour and channels == 1:
            raise UserError(f"'{file}' is in colour and the run is grayscale (1 channel): give a grayscale image")
    return torch.stack([transform(open_image(file, CHANNEL_MODES[channels])) for file in files])


def load_mask(args: argparse.Namespace, files: list[Path], size: int) -> torch.Tensor:
    """The region to fill, (1 or N, 1, size, size): --box as fractions of the image, or a --mask image (white =
    fill) of the input images' size, resized and cropped as they are."""
    if args.box:
        left, top, right, bottom = args.box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise UserError(f"--box {' '.join(f'{v:g}' for v in args.box)}: give LEFT TOP RIGHT BOTTOM as fractions "
                            f"of the image, 0 <= LEFT < RIGHT <= 1 and 0 <= TOP < BOTTOM <= 1")
        mask = torch.zeros(1, 1, size, size)
        mask[..., round(top * size):round(bottom * size), round(left * size):round(right * size)] = 1
        return mask
    mask_image = open_image(Path(args.mask), "L")
    for file in files:
        width, height = open_image(file, "L").size
        if (width, height) != mask_image.size:
            raise UserError(f"the mask {args.mask} is {mask_image.size[0]}x{mask_image.size[1]} and {file} is "
                            f"{width}x{height}: give a mask of the images' size")
    T = transforms()
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(size),
                           T.PILToTensor()])
    return (transform(mask_image)[None] > 127).float()


def label_kwargs(args: argparse.Namespace, model, n: int, guided: bool = True) -> dict:
    """The conditioning for n images: --labels (one each, or one for all; -1, the unconditional model, unless
    given) and the guidance flags (the run's, else the original's; unguided for a deterministic round trip)."""
    if not hasattr(model, "num_classes"):
        if args.labels or args.cfg_scale is not None:
            raise UserError(f"{args.run} is an unconditional run: --labels and --cfg_scale need a conditional one")
        return {}
    labels = sample.class_indices(args.labels, model) if args.labels else [-1]
    if len(labels) not in (1, n):
        each = f", or one for each of the {n} images" if n > 1 else ""
        raise UserError(f"--labels: give one label{each}, got {len(labels)}")
    settings = sample.recommended(args.run, model)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else settings["cfg_scale"] if guided else 1.0
    interval = args.guidance_interval or (settings["guidance_interval"] if guided else None)
    return dict(labels=torch.tensor(labels).expand(n), cfg_scale=cfg_scale, guidance_interval=interval)


# --------------------------------------------------------------------------- the commands

def run(args: argparse.Namespace) -> None:
    out = Path(args.out or f"edit_{args.command}.png")
    writable_folder(out.parent)  # before the work
    model, diffusion = sample.load(args.run, ema=not args.no_ema, device=args.device, image_size=args.image_size)
    device = next(model.parameters()).device
    seed_everything(args.seed)
    size, channels = diffusion.img_size, diffusion.c_in
    files = image_files(args.images) if args.images else []
    if args.command != "interpolate" and not files:
        raise UserError(f"{args.command} needs --images: image files or folders")
    x = load_inputs(files, channels, size) if files else None
    with autocast(device, autocast_dtype(args.precision, device)):
        try:
            rows, nrow = edit(args, model, diffusion, files, x)
        except ValueError as e:  # the methods' own checks: steps, eta, strength, labels
            raise UserError(str(e))
    save_images(torch.cat([row.cpu() for row in rows]), out, nrow=nrow)
    print(f"wrote {out}")


def edit(args, model, diffusion, files: list[Path], x: torch.Tensor | None) -> tuple[list[torch.Tensor], int]:
    """The command's rows of the grid, and the images a row."""
    size, n = diffusion.img_size, len(files)
    if args.command == "inpaint":
        mask = load_mask(args, files, size)
        filled = diffusion.inpaint(model, x, mask, sampler=args.sampler or "ddpm", steps=args.steps or 50,
                                   jump=args.jump, resample=args.resample, **label_kwargs(args, model, n))
        shown = ((x.float() * (1 - mask)).round().to(torch.uint8), (mask.expand_as(x.float()) * 255).to(torch.uint8))
        return [x, *shown, filled], n
    if args.command == "img2img":
        kwargs = dict(sampler=args.sampler or DEFAULT_SAMPLER, steps=args.steps or DEFAULT_STEPS)
        return [x, diffusion.img2img(model, x, args.strength, **kwargs, **label_kwargs(args, model, n))], n
    steps = args.steps or 50
    if args.command == "invert":
        cond = label_kwargs(args, model, n, guided=False)
        x_T = diffusion.invert(model, x, steps=steps, **cond)
        decoded = diffusion.sample(model, n, sampler="ddim", steps=steps, noise=x_T, progress=False, **cond)
        error = (decoded.float() - x.float()).abs().mean().item()
        print(f"decoded from x_T: mean absolute error {error:.2f} of 255 ({steps} DDIM steps)")
        return [x, to_images(x_T / 3), decoded], n  # x_T shown at a third of its scale: N(0, 1) within [-1, 1]
    # interpolate: between two seeds' noise, or two inversions
    if files and n != 2 or not files and len(args.seeds) != 2:
        raise UserError("interpolate takes two end points: --images A B, or --seeds A B")
    cond = label_kwargs(args, model, 1, guided=False)
    cond = {**cond, "labels": cond["labels"][0]} if cond else {}  # one class along the whole path
    if files:
        ends = diffusion.invert(model, x, steps=steps, **cond)
    else:
        shape = (diffusion.c_in, size, size)
        ends = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in args.seeds])
    frames = diffusion.interpolate(model, ends[0], ends[1], args.frames, sampler=args.sampler or "ddim", steps=steps,
                                   **cond)
    return [frames], args.frames


# --------------------------------------------------------------------------- the README's measurements

def measure(args: argparse.Namespace) -> None:
    """On held-out digits given their labels: the judge's accuracy on their right half inpainted, without and with
    RePaint's resampling, beside its accuracy on the real digits and on the left halves alone; the inversion's
    round-trip error against its steps; the seconds per image of each method."""
    import json

    run_dir = Path(args.run)
    config = json.loads((run_dir / "run.json").read_text())
    model, diffusion = sample.load(run_dir, device=args.device)
    device = next(model.parameters()).device
    x_train, y_train, x_held, y_held, classes = evaluate.real_images(config)
    judge, judge_accuracy = evaluate.cached_judge(run_dir, x_train, y_train, x_held, y_held, args.judge_epochs)
    reps = -(-args.n // len(x_held))
    images, labels = x_held.repeat(reps, 1, 1, 1)[:args.n], y_held.repeat(reps)[:args.n]
    size = diffusion.img_size
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 2:] = 1  # the right half
    settings = sample.recommended(run_dir, model)
    guidance = dict(cfg_scale=settings["cfg_scale"], guidance_interval=settings["guidance_interval"])
    rows = [("real held-out digits (the judge's own accuracy)", judge_accuracy, None)]
    blank = (images.float() * (1 - mask)).to(torch.uint8)
    rows.append(("left halves alone, right half black", accuracy(judge, blank, labels), None))
    seed_everything(args.seed)
    with autocast(device, autocast_dtype(args.precision, device)):
        for name, resample in (("inpainted, RePaint without resampling", 1),
                               (f"inpainted, RePaint resampling {args.resample}x every {args.jump} steps",
                                args.resample)):
            filled, seconds = timed(lambda batch, y: diffusion.inpaint(
                model, batch, mask, steps=args.steps, jump=args.jump, resample=resample, progress=False, labels=y,
                **guidance), images, labels)
            rows.append((name, accuracy(judge, filled, labels), seconds))
        inversion = []
        for steps in args.inversion_steps:
            cond = dict(cfg_scale=1.0)

            def round_trip(batch, y):
                x_T = diffusion.invert(model, batch, steps=steps, progress=False, labels=y, **cond)
                return diffusion.sample(model, len(batch), y, sampler="ddim", steps=steps, noise=x_T, progress=False,
                                        **cond)
            decoded, seconds = timed(round_trip, x_held, y_held)
            error = (decoded.float() - x_held.float()).abs()
            inversion.append((steps, error.mean().item(), (error > 32).flatten(1).any(1).float().mean().item(),
                              seconds))
    lines = edits_block(rows, inversion, args, len(x_held))
    print("\n".join(lines))
    if args.readme:
        update_readme_block(args.readme, "edits", lambda old: "\n".join(lines))


def timed(fn, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, float]:
    """fn over the images in batches; (its uint8 results, seconds per image)."""
    start, out = time.perf_counter(), []
    for i in range(0, len(images), batch):
        out.append(fn(images[i:i + batch], labels[i:i + batch]).cpu())
    return torch.cat(out), (time.perf_counter() - start) / len(images)


def accuracy(judge, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (judge.embed(images)[1] == labels).float().mean().item()


def edits_block(rows, inversion, args, held: int) -> list[str]:
    command = (f"`python edit.py measure --run {args.run} --n {args.n} --steps {args.steps} --jump {args.jump} "
               f"--resample {args.resample} --readme README.md`")
    lines = [f"Generated by {command} on {held} held-out digits (each inpainted {-(-args.n // held)} times: "
             f"n = {args.n}), given their labels, at the run's guidance; the judge is evaluate.py's.", "",
             "| right half of held-out digits | the judge: asked digit | seconds per image |", "|---|---|---|"]
    lines += [f"| {name} | {100 * acc:.1f}% | {'' if s is None else f'{s:.3f}'} |" for name, acc, s in rows]
    lines += ["", f"DDIM inversion then DDIM decoding of the {held} held-out digits, guidance 1 (no guidance), "
                  "error in grey levels of 255:", "",
              "| steps | mean absolute error | images with a pixel off by more than 32 | seconds per image (both "
              "ways) |", "|---|---|---|---|"]
    lines += [f"| {steps} | {err:.2f} | {100 * far:.1f}% | {s:.3f} |" for steps, err, far, s in inversion]
    return lines


# --------------------------------------------------------------------------- command line

def build_parser() -> ArgumentParser:
    p = ArgumentParser("Inpaint, image-to-image, invert and interpolate with a trained run.")
    commands = p.add_subparsers(dest="command", required=True)
    helps = {"inpaint": "fill a masked part of each image (RePaint)",
             "img2img": "noise each image part of the way and denoise it (SDEdit)",
             "invert": "find the x_T that DDIM decodes into each image, and decode it",
             "interpolate": "decode the slerp between two x_T (two seeds, or two inverted images)",
             "measure": "the README's measurements on the digits' held-out images"}
    for name, help_text in helps.items():
        c = commands.add_parser(name, help=help_text, description=help_text)
        c.add_argument("--run", required=True, help="a run folder (models/<run_name>) or a checkpoint file")
        add_runtime_args(c)
        if name == "measure":
            c.add_argument("--n", type=whole(10), default=1000, help="inpaintings (the held-out digits, cycled)")
            c.add_argument("--steps", type=whole(1), default=50, help="steps of the inpainting chain (ddpm)")
            c.add_argument("--jump", type=whole(1), default=10, help="RePaint's jump length of the resampled run")
            c.add_argument("--resample", type=whole(2), default=5, help="RePaint's resamplings of the resampled run")
            c.add_argument("--inversion_steps", type=whole(1), nargs="+", default=[10, 20, 50, 100],
                           help="DDIM steps of the inversion round trips")
            c.add_argument("--judge_epochs", type=whole(1), default=15, help="training epochs of the judge (cached)")
            c.add_argument("--readme", default=None, help="rewrite this markdown file's edits block")
            continue
        c.add_argument("--images", nargs="+" if name != "interpolate" else "*", default=None,
                       help="image files or folders" + (" (two: interpolate between their inversions)"
                                                        if name == "interpolate" else ""))
        c.add_argument("--labels", nargs="+", default=None,
                       help="conditional runs: a class (index or name) for all images, or one each; -1 = none "
                            "(default: -1)")
        add_guidance_args(c)
        c.add_argument("--sampler", choices=SAMPLERS, default=None,
                       help={"inpaint": "ddpm (RePaint's ancestral chain) or ddim (default: ddpm)",
                             "img2img": f"any (default: {DEFAULT_SAMPLER})", "invert": "decoding: ddim",
                             "interpolate": "decoding: ddim or dpmpp2m (default: ddim)"}[name])
        c.add_argument("--steps", type=whole(1), default=None,
                       help=f"sampler steps (default: {DEFAULT_STEPS} for img2img, else 50)")
        c.add_argument("--no_ema", action="store_true", help="use ckpt.pt even when ema_ckpt.pt exists")
        c.add_argument("--image_size", type=whole(8), default=None, help="a bare checkpoint's image size (64)")
        c.add_argument("--out", default=None, help="the grid image (default: edit_<command>.png)")
        if name == "inpaint":
            where = c.add_mutually_exclusive_group(required=True)
            where.add_argument("--box", type=real(0), nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                               help="the region to fill, as fractions of the image (0.5 0 1 1: the right half)")
            where.add_argument("--mask", default=None, help="an image of the images' size, white where to fill")
            c.add_argument("--jump", type=whole(1), default=10,
                           help="RePaint's jump length (steps between resamplings)")
            c.add_argument("--resample", type=whole(1), default=1, help="RePaint's resamplings (1: none)")
        if name == "img2img":
            c.add_argument("--strength", type=real(0), required=True,
                           help="how far the image is noised, in [0, 1]: 0 returns it, 1 samples afresh")
        if name == "interpolate":
            c.add_argument("--seeds", type=whole(), nargs=2, default=[0, 1], help="the two x_T's seeds")
            c.add_argument("--frames", type=whole(2), default=8, help="images from one end to the other")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "measure":
        measure(args)
    else:
        run(args)


if __name__ == "__main__":
    run_main(main)
