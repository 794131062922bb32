"""Inpainting masks from any image a user brings, by one rule (MASK_RULE), or from a box: 1 where edit.py inpaint
generates, 0 where the image is kept."""
import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from files import UserError
from utils import to_8bit, transforms

MASK_RULE = ("a mask with transparency is filled where it is opaque (its alpha; the colours are ignored), one "
             "without where it is white (its brightness); grey, as a soft brush leaves, is filled from half up")


def mask_source(im: Image.Image) -> tuple[Image.Image, str]:
    """The 8-bit gray the mask rule reads from `im` (any mode Pillow opens), and which reading: "alpha" where `im`
    has transparency (an alpha channel, or a `transparency` colour or palette entry) not opaque everywhere, else
    "brightness" (ITU-R 601 luma; 16-bit, 32-bit and float gray scaled as utils.to_8bit scales them)."""
    if im.mode == "F" or im.mode.startswith("I"):
        return to_8bit(im), "brightness"
    alpha = im.getchannel(im.getbands()[-1]) if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") else \
        im.convert("RGBA").getchannel("A") if "transparency" in im.info else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        return alpha, "alpha"
    gray = im.getchannel("L") if im.mode == "La" else im.convert("L") if im.mode in ("1", "L") else \
        im.convert("RGB").convert("L")  # colour, palettes, CMYK, LAB...: to gray through RGB, as open_image
    return gray, "brightness"


def mask_from_image(im: Image.Image) -> torch.Tensor:
    """The mask rule, for an image of any mode: (H, W) float, 1 where to fill. Where the image has transparency its
    alpha decides (opaque = fill, the colours ignored), otherwise its brightness (white = fill): from half up, 128
    of 255 (an 8-bit gray image is its own brightness: mask_from_image(gray) thresholds it)."""
    return torch.from_numpy(np.asarray(mask_source(im)[0]) >= 128).float()


def open_mask(path: Path) -> Image.Image:
    """A mask file's first frame in its own mode, its EXIF orientation applied as the images' is."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im)


def box_mask(box: list[float], size: int) -> torch.Tensor:
    """(1, 1, size, size): 1 on every pixel the box LEFT TOP RIGHT BOTTOM (fractions) touches, so that a box
    thinner than a pixel still selects one (rounded to 1e-6 first: 0.7 * 10 is 7, not 7.000000000000001)."""
    left, top, right, bottom = (round(v * size, 6) for v in box)
    mask = torch.zeros(1, 1, size, size)
    mask[..., math.floor(top):math.ceil(bottom), math.floor(left):math.ceil(right)] = 1
    return mask


def load_mask(args: argparse.Namespace, sizes: list[tuple[int, int]], files: list[Path], size: int
              ) -> tuple[torch.Tensor, str]:
    """The region to fill, (1, 1, size, size) 0/1, and what decided it (for the line each run prints): --box, or
    the --mask file by the mask rule, of the run's size or of the images' (`sizes`), resized and cropped as they
    are. A mask that selects nothing or everything is refused."""
    if args.box:
        mask, given = box_mask(args.box, size), "--box " + " ".join(f"{v:g}" for v in args.box)
        if mask.all():
            raise UserError(f"{given} touches every pixel of the run's {size}x{size} images: nothing of them would "
                            f"be kept, which is sampling (sample.py): give a smaller box")
        return mask, f"{given}, every pixel it touches"
    path = Path(args.mask)
    gray, reading = mask_source(open_mask(path))
    resized = "" if gray.size == (size, size) else (f"; {gray.width}x{gray.height}, resized to {size}x{size} as "
                                                     f"the images are")
    if resized:
        if other := [f"{f} is {a}x{b}" for f, (a, b) in zip(files, sizes) if (a, b) != gray.size]:
            fix = (f"give a mask of the images' size ({sizes[0][0]}x{sizes[0][1]}) or of the run's ({size}x{size})"
                   if len(set(sizes)) == 1 else f"images of different sizes take a mask of the run's size "
                                                f"({size}x{size}), or edit the images of each size apart")
            raise UserError(f"the mask {path} is {gray.width}x{gray.height} and {', '.join(other[:2])}: {fix}")
        T = transforms()
        gray = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(size)])(gray)
    mask = mask_from_image(gray)[None, None]
    fill, keep = ("opaque", "transparent") if reading == "alpha" else ("white", "black")
    if not mask.any() or mask.all():
        own = mask_from_image(open_mask(path))  # at its own size: so there too, or lost in resizing and cropping?
        lost = f"is lost in resizing and cropping to the run's {size}x{size}"
        if not mask.any():
            why = f"it is {keep} everywhere (its {reading} under half)" if not own.any() else f"what it selects {lost}"
            raise UserError(f"the mask {path} selects nothing to fill: {why}. The rule: {MASK_RULE}")
        why = f"it is {fill} everywhere (its {reading} at least half)" if own.all() else f"what it keeps {lost}"
        raise UserError(f"the mask {path} selects every pixel: {why}, so nothing of the images would be kept, which "
                        f"is sampling (sample.py): make the part to keep {keep}")
    return mask, f"the {reading} of {path}, filled where {fill}{resized}"


def coverage(mask: torch.Tensor, how: str) -> str:
    """The line each inpainting prints before the work: how much of each image it will generate (min..max where
    the images' masks differ; 0% and 100% only when exactly), and what decided it."""
    counts, total = mask.flatten(1).sum(1).long().tolist(), mask[0, 0].numel()
    ends = dict.fromkeys((min(counts), max(counts)))  # one end when they agree

    def share(k: int) -> str:
        text = f"{100 * k / total:.1f}%"
        return "<0.1%" if text == "0.0%" and k else ">99.9%" if text == "100.0%" and k < total else text
    return (f"inpaint: {'..'.join(map(share, ends))} of each image will be generated, {'..'.join(map(str, ends))} "
            f"of {total} pixels ({how})")


