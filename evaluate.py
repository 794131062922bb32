"""How good are a run's samples? Offline metrics judged by a small classifier trained on the run's own data.

    python evaluate.py --run models/DDPM_conditional                 # table + results/<run>/eval.json
    python evaluate.py --run models/DDPM_conditional --sweep cfg     # guidance scales 1..7, plots
    python evaluate.py --run models/DDPM_conditional --sweep steps   # every sampler at 5..100 network evaluations
    python evaluate.py --run models/DDPM_conditional --sweep steps --readme docs/results.md   # the Results page

The judge is a small CNN trained on the run's training images (cached in the run folder). Its
penultimate features stand in for Inception's: Frechet distance and KID are computed in them,
against held-out real images, beside the real-vs-real floor (held-out vs training images).
`--exact` also scores the exact denoiser of the training set at every setting: what the sampler
and guidance cost a model without error. Each figure comes with the images it rests on, marked
unreliable below its minimum (the MIN_ constants); what the flags or the data cannot do is refused
before the work.
"""
import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddpm import SAMPLERS
from flow import Flow
from sample import (add_sampler_args, check_guidance, fill_sampling, load_from_flags, run_config, sampler_steps,
                    visited_times)
from devices import autocast, autocast_dtype, seed_everything
from files import load_checkpoint, save_checkpoint, save_json, UserError, writable_folder
from runs import add_runtime_args, ArgumentParser, run_main, whole
from utils import (ImageFiles, labels_of, load_dataset, read_folder, save_images, split_held_out, to_model_range,
                   transforms)
from tools.exact import ExactDenoiser
from tools.readme import readme_block
from tools.report import (format_row, images_used, plot_sweeps, print_table, setting_name, sorted_by_label,
                          training_record, write_readme)

CFG_SWEEP = [1, 2, 3, 4, 5, 6, 7]  # 1 = unguided; a scale <= 0 is treated as 1, so 0 would repeat it
# Every sampler at these network evaluations (one per step, a guided one included), and the original's chain.
STEPS_SWEEP = [(sampler, nfe) for sampler in SAMPLERS for nfe in (5, 10, 15, 20, 50, 100)]
# flow matching: Euler at those evaluations, Heun at about as many (2 a step but the last)
FLOW_SWEEP = [(sampler, k) for nfe in (5, 10, 15, 20, 50, 100)
              for sampler, k in (("euler", nfe), ("heun", (nfe + 1) // 2))]
FULL_CHAIN = [("ddpm", None)]  # the original's 999 steps: as long as the whole steps sweep, so in "all" only
JUDGE_EPOCHS = 15  # a new judge's, unless --judge_epochs

# What each figure rests on, and the fewest images for which it means something (docs/results.md, Evaluation). Below
# them a figure is kept but marked unreliable; what cannot be computed at all is refused before the work.
FEATURES = 128  # the judge's penultimate width: FD and KID are computed in these
KID_SUBSET = 200  # images per KID subset (as KID's reference code, which uses 1,000)
MIN_ACCURACY_IMAGES = 100  # an accuracy moves in steps of 1/n (33 points at 3 images); at 100, a standard error <= 5
MIN_FD_IMAGES = 2 * FEATURES  # a covariance of fewer than FEATURES + 1 images is singular, and FD's bias falls as 1/n
MIN_KID_IMAGES = KID_SUBSET  # fewer: every subset is the same images
MIN_NN_IMAGES = 50  # the NN ratio divides two medians: of fewer images a handful decide it
MIN_ENTROPY_IMAGES_PER_CLASS = 10  # a histogram of fewer predictions per class understates the entropy
MIN_INCEPTION_IMAGES = 2 * 2048  # MIN_FD_IMAGES in Inception's 2048-d features (published FIDs use 10,000 to 50,000)


# --------------------------------------------------------------------------- real data

def real_images(config: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(train, train_labels, held_out, held_out_labels, class_names) as uint8 at the run's image size.

    A named dataset uses its fixed split; a folder is split here, 10% of each class held out.
    """
    size, channels = config["diffusion_args"]["img_size"], config["diffusion_args"]["c_in"]
    path = config.get("dataset_path")
    if path is None:
        args = config.get("args", {})
        x_train, y_train, x_held, y_held, classes = load_dataset(config.get("dataset") or "digits",
                                                                 args.get("data_root", "data"))
        x_train, x_held = (as_trained(x, size).expand(-1, channels, -1, -1) for x in (x_train, x_held))
        return x_train, y_train, x_held, y_held, classes
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"the run's dataset folder '{root}' is not there: evaluate from where the run was trained")
    folder, _ = read_folder(root, channels, skip_bad=True, verbose=False)
    trained = config.get("class_names")
    if trained is not None and folder.classes != trained:
        raise UserError(f"the classes in '{root}' ({', '.join(folder.classes[:10])}) are not the ones the run was "
                        f"trained on ({', '.join(trained[:10])}): restore the folder as it was")
    T = transforms()
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])
    data = ImageFiles(folder, transform, channels)
    images = torch.stack([data[i][0] for i in tqdm(range(len(data)), desc="loading real images", leave=False)])
    return (*split_held_out(images, labels_of(data)), data.classes)


def as_trained(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized as training sees them, back to uint8."""
    return ((to_model_range(images, size) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------- the judge

class Judge(nn.Module):
    """A small CNN classifier; `features` (FEATURES-d, before the last layer) embed images for FD and KID."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(channels, 32), *block(32, 32), nn.MaxPool2d(2),
                                  *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                                  *block(64, FEATURES), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float() / 127.5 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted classes) of uint8 images."""
        self.eval()
        feats = torch.cat([self.features(images[i:i + batch]) for i in range(0, len(images), batch)])
        return feats, self.head(feats).argmax(1)


def train_judge(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                epochs: int = JUDGE_EPOCHS, seed: int = 0, num_classes: int | None = None) -> tuple[Judge, float]:
    """Train the judge on uint8 images (random 2-pixel shifts); returns it and its held-out accuracy. `num_classes`:
    the data's, which a class whose only image is held out leaves above the training labels' (default: theirs)."""
    torch.manual_seed(seed)
    judge = Judge(x.shape[1], num_classes or int(y.max()) + 1)
    steps_per_epoch = math.ceil(len(x) / 64)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="training the judge", leave=False):
        judge.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            shift = torch.randint(-2, 3, (2,)).tolist()
            loss = F.cross_entropy(judge(torch.roll(x[idx], shift, dims=(2, 3))), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    accuracy = (judge.embed(x_val)[1] == y_val).float().mean().item()
    return judge, accuracy


def cached_judge(run_dir: Path, x, y, x_val, y_val, epochs: int | None = None,
                 num_classes: int | None = None) -> tuple[Judge, float]:
    """The run's judge, trained once and kept in <run>/judge.pt, and its held-out accuracy (judge.epochs: how long it
    trained). `epochs` None takes the cached one; a number, one of those epochs (else trains it again)."""
    path, num_classes = run_dir / "judge.pt", num_classes or int(y.max()) + 1
    if path.is_file():
        state = load_checkpoint(path)
        if (tuple(state["shape"]) == tuple(x.shape[1:]) and state["num_classes"] == num_classes
                and epochs in (None, state.get("epochs"))):
            judge = Judge(x.shape[1], num_classes)
            judge.load_state_dict(state["weights"])
            judge.epochs = state.get("epochs")  # None: a judge cached before its epochs were
            return judge.eval(), float(state["accuracy"])
    judge, accuracy = train_judge(x, y, x_val, y_val, epochs or JUDGE_EPOCHS, num_classes=num_classes)
    judge.epochs = epochs or JUDGE_EPOCHS
    save_checkpoint({"weights": judge.state_dict(), "accuracy": accuracy, "shape": list(x.shape[1:]),
                     "num_classes": num_classes, "epochs": judge.epochs}, path)
    return judge, accuracy


# --------------------------------------------------------------------------- metrics

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (as FID); NaN unless each set
    has 2 images or more (a covariance)."""
    if min(len(a), len(b)) < 2:
        return math.nan
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, **subsets) -> float:
    """KID: the mean of kid_subsets; NaN when a set has fewer than 2 images. At or below 0: no measurable difference,
    the unbiased estimate scattering around 0 (report.shown prints '~0')."""
    values = kid_subsets(a, b, **subsets)
    return float(values.mean()) if len(values) else math.nan


def kid_subsets(a: torch.Tensor, b: torch.Tensor, subsets: int = 20, size: int = KID_SUBSET,
                seed: int = 0) -> torch.Tensor:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 of each of `subsets` random subset pairs."""
    a, b = a.double(), b.double()
    d, size = a.shape[1], min(size, len(a), len(b))
    if size < 2:
        return torch.zeros(0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:size]]
        y = b[torch.randperm(len(b), generator=g)[:size]]
        k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = size * (size - 1)
        values.append((k_xx.sum() - k_xx.diag().sum()) / off + (k_yy.sum() - k_yy.diag().sum()) / off
                      - 2 * k_xy.mean())
    return torch.stack(values)


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Pixel-space L2 distance from each query image to its nearest reference image (both uint8)."""
    ref = reference.flatten(1).double() / 255  # float64: fp32's matmul-based distances err by ~1e-2
    return torch.cat([torch.cdist(queries[i:i + batch].flatten(1).double() / 255, ref).min(1).values.float()
                      for i in range(0, len(queries), batch)])


def nearest_pairs(samples: torch.Tensor, train: torch.Tensor, per_row: int = 10) -> torch.Tensor:
    """Rows of samples, each followed by a row of their nearest training images (pixel L2): memorisation at a glance."""
    ref = train.flatten(1).double() / 255
    nearest = train[torch.cdist(samples.flatten(1).double() / 255, ref).argmin(1)]
    rows = [torch.cat([samples[i:i + per_row], nearest[i:i + per_row]]) for i in range(0, len(samples), per_row)]
    return torch.cat(rows)


def memorisation(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor) -> dict:
    """How close samples come to the training set, against how close unseen real images come.

    ratio = median NN distance of samples / median NN distance of held-out images. Near 1 (or
    above) generalises; well below 1 means samples sit on training images: flagged under 0.8.
    """
    d_samples, d_held = nearest_distances(samples, train), nearest_distances(held_out, train)
    ratio = float(d_samples.median() / d_held.median()) if d_held.median() > 0 else None  # None: copies held out
    return {"nn_median_samples": float(d_samples.median()), "nn_median_held_out": float(d_held.median()),
            "nn_ratio": ratio, "memorising": ratio is not None and ratio < 0.8}


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over log(num_classes): 1 = every class equally often."""
    p = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
    return abs(float((p[p > 0] * p[p > 0].log()).sum() / math.log(num_classes)))  # abs: 0, not -0


# --------------------------------------------------------------------------- evaluation

def generate(model, diffusion, n: int, labels: torch.Tensor | None, cfg_scale: float, sampler: str,
             steps: int | None, precision: str = "auto", guidance_interval: tuple[int, int] | None = None,
             batch: int = 250) -> tuple[torch.Tensor, float]:
    """n samples (on the CPU) and the seconds per image it took."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    out, start = [], time.perf_counter()
    for i in tqdm(range(0, n, batch), desc=f"sampling {sampler}-{steps or 'all'} cfg {cfg_scale}", leave=False):
        k = min(batch, n - i)
        with autocast(device, dtype):
            if labels is None:
                x = diffusion.sample(model, k, sampler=sampler, steps=steps, progress=False)
            else:
                x = diffusion.sample(model, k, labels[i:i + k], 1 if cfg_scale is None else cfg_scale,
                                     guidance_interval, sampler=sampler, steps=steps, progress=False)
        out.append(x.cpu())
    return torch.cat(out), (time.perf_counter() - start) / n


def score(samples: torch.Tensor, labels: torch.Tensor | None, judge: Judge, real: dict, num_classes: int) -> dict:
    feats, predicted = judge.embed(samples)
    kid = kid_subsets(feats, real["held_feats"])
    result = {"fd": finite(frechet_distance(feats, real["held_feats"])),  # None: not computable of so few images
              "kid": finite(kid.mean()) if len(kid) else None, "kid_std": finite(kid.std()) if len(kid) > 1 else None}
    if labels is not None:
        result["accuracy"] = float((predicted == labels).float().mean())
        result["accuracy_per_class"] = [float((predicted[labels == c] == c).float().mean()) if (labels == c).any()
                                        else None for c in range(num_classes)]  # None: no sample of that class
    else:
        result["class_entropy"] = class_entropy(predicted, num_classes)
    result.update(memorisation(samples, real["train"], real["held"]))
    return result


def finite(value) -> float | None:
    return float(value) if math.isfinite(value) else None


def rests_on(n: int, held: int, train: int, floor: int, untrained: list[str], num_classes: int, conditional: bool,
             inception: bool) -> dict:
    """What each figure rests on: its images, and whether they are enough (the MIN_ constants); "why" says what
    falls short. n generated per setting, `held` held-out and `train` training images, `floor` of them in the floor;
    `untrained`: the classes without a training image, which the judge cannot have learnt."""
    def figure(minimum: int, images: dict, *more: str) -> dict:
        short = [f"{count} {kind.replace('_', '-')}" for kind, count in images.items() if count < minimum]
        short = ", ".join(short[:-1]) + " and " * (len(short) > 1) + "".join(short[-1:])
        why = [f"{short} images, needs >= {minimum}"] * bool(short) + [m for m in more if m]
        return {**images, "minimum": minimum, "reliable": not why, "why": "; ".join(why) or None}

    unknown = f"the judge never saw {len(untrained)} of the {num_classes} classes (no training image)" * bool(untrained)
    other_n = f"{floor} training images against {n} generated: not the samples' n" if floor < n else ""
    figures = {"judge_accuracy": figure(MIN_ACCURACY_IMAGES, {"held_out": held}, unknown),
               "floor_fd": figure(MIN_FD_IMAGES, {"training": floor, "held_out": held}, other_n),
               "floor_kid": figure(MIN_KID_IMAGES, {"training": floor, "held_out": held}),
               "fd": figure(MIN_FD_IMAGES, {"generated": n, "held_out": held}),
               "kid": figure(MIN_KID_IMAGES, {"generated": n, "held_out": held}),
               "nn_ratio": figure(MIN_NN_IMAGES, {"generated": n, "held_out": held, "training": train})}
    if conditional:
        figures["accuracy"] = figure(MIN_ACCURACY_IMAGES, {"generated": n}, unknown)
    else:
        figures["class_entropy"] = figure(MIN_ENTROPY_IMAGES_PER_CLASS * num_classes, {"generated": n})
    if inception:
        figures["inception_fid"] = figure(MIN_INCEPTION_IMAGES, {"generated": n, "held_out": held})
    return figures


def check_before_work(args: argparse.Namespace, run_dir: Path):
    """Refuse in one line, before anything is loaded, what the flags or the run cannot do: outputs that cannot be
    written, files and packages the flags need, flags this run cannot honour. Returns (run.json, out_dir, FID)."""
    if run_dir.is_file():
        raise UserError(f"'{run_dir}' is a file: give its run folder, whose run.json names the data to judge it by")
    if not (run_dir / "run.json").is_file():
        raise UserError(f"'{run_dir}' has no run.json: give a run folder written by ddpm.py or ddpm_conditional.py")
    config = run_config(run_dir)
    if args.readme_block is not None and not args.readme:
        raise UserError(f"--readme_block {args.readme_block} names a block of the --readme file: give --readme too")
    out_dir = writable_folder(args.out_dir or Path("results") / run_dir.name)  # before the work, not after
    if args.readme:
        readme_block(args.readme, args.readme_block or "results")
        writable_folder(Path(args.readme).parent, "the --readme file is rewritten in its folder")
        writable_folder("assets", "--readme copies the figures to assets/ here: run from a writable folder")
    if args.no_ema and not (run_dir / "ema_ckpt.pt").is_file():
        raise UserError(f"--no_ema: {run_dir} has no ema_ckpt.pt (no EMA weights), so ckpt.pt is scored either way: "
                        f"drop --no_ema")
    names = config.get("class_names")
    if names is not None and len(names) < 2:
        raise UserError(f"the judge is a classifier: it needs a dataset of at least 2 classes (class sub-folders), "
                        f"and {run_dir} was trained on one ({names[0] if names else 'none'})")
    if args.sweep != "none" and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--sweep plots with matplotlib: pip install matplotlib")
    return config, out_dir, inception_metric(args.inception_weights)


def check_against_run(args: argparse.Namespace, config: dict, model, run_dir: Path) -> tuple[bool, bool]:
    """Refuse in one line the guidance flags this run cannot honour: (conditional, whether to sweep guidance)."""
    has_labels = hasattr(model, "num_classes")
    if args.unconditional and not has_labels:
        raise UserError(f"{run_dir} is an unconditional run already: drop --unconditional")
    conditional = has_labels and not args.unconditional  # samples asked for a class, scored by accuracy
    given = [f"--{k}" for k in ("cfg_scale", "guidance_interval") if getattr(args, k) is not None]
    if given and not conditional:
        raise UserError(f"{', '.join(given)} guide a class-conditional model towards a class: "
                        f"{'--unconditional asks for none' if has_labels else f'{run_dir} is unconditional'}")
    no_null = has_labels and config.get("args", {}).get("label_drop") == 0  # the label -1 model never trained
    if no_null and (args.unconditional or (args.cfg_scale or 0) > 0 and args.cfg_scale != 1):  # <= 0 counts as 1
        flag = "--unconditional samples" if args.unconditional else f"--cfg_scale {args.cfg_scale:g} guides with"
        raise UserError(f"{flag} the unconditional model that label dropout trains, and {run_dir} trained with "
                        f"--label_drop 0: {'drop --unconditional' if args.unconditional else 'give --cfg_scale 1'}")
    guided = conditional and not no_null
    if args.sweep in ("cfg", "all") and not guided:
        why = (f"{run_dir} is unconditional" if not has_labels else "--unconditional asks for no class"
               if args.unconditional else f"{run_dir} trained with --label_drop 0 (no unconditional model)")
        if args.sweep == "cfg":
            raise UserError(f"--sweep cfg sweeps the guidance scale, and {why}: give --sweep steps or none")
        print(f"note: --sweep all sweeps the samplers and steps only: {why}")
    return conditional, guided


def check_data(args: argparse.Namespace, classes: list[str], y_train: torch.Tensor, asked: torch.Tensor | None,
               conditional: bool) -> list[str]:
    """Refuse a dataset the judge cannot learn, and --exact where a class asked for has no training image (a class of
    one image: held out). Returns the classes without a training image."""
    if len(classes) < 2:
        raise UserError("the judge is a classifier: it needs a dataset of at least 2 classes (class sub-folders)")
    trained = set(y_train.tolist())
    if len(trained) < 2:
        raise UserError(f"the judge needs training images of 2 classes or more, and {len(trained)} of {len(classes)} "
                        f"classes have any (one image of each is held out): give 2 classes 2 images or more")
    untrained = [name for c, name in enumerate(classes) if c not in trained]
    missing = sorted(set(asked.tolist()) - trained) if args.exact and conditional else []
    if missing:
        names = ", ".join(classes[c] if c < len(classes) else str(c) for c in missing[:5])
        raise UserError(f"--exact draws each class from its training images, and {len(missing)} class(es) asked for "
                        f"have none ({names}): drop --exact, or add --unconditional")
    return untrained


def evaluate(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run)
    config, out_dir, fid = check_before_work(args, run_dir)
    model, diffusion = load_from_flags(str(run_dir), args.no_ema, args.device)  # errors worded for the flags
    conditional, guided = check_against_run(args, config, model, run_dir)
    # the sampling flags given, for the --readme block's command (the rest are the run's own, recorded in run.json)
    given_sampling = "".join(f"--{k} {v:g} " if isinstance(v, float) else f"--{k} {v} "
                             for k in ("sampler", "steps", "cfg_scale") if (v := getattr(args, k)) is not None)
    given = {k for k in ("cfg_scale", "guidance_interval", "steps") if getattr(args, k) is not None}
    fill_sampling(args, model, conditional)
    steps = sampler_steps(args, given, diffusion)
    if conditional:  # an interval out of range, or one that would change nothing: as sample.py refuses it
        check_guidance(args, given, list(range(model.num_classes)), steps, diffusion)

    x_train, y_train, x_held, y_held, classes = real_images(config)
    labels = class_mix(y_held, args.n, model.num_classes) if conditional else None
    untrained = check_data(args, classes, y_train, labels, conditional)
    judge, judge_accuracy = cached_judge(run_dir, x_train, y_train, x_held, y_held, args.judge_epochs, len(classes))
    held_feats = judge.embed(x_held)[0]
    floor_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:min(args.n, len(x_train))]
    train_feats = judge.embed(x_train[floor_idx])[0]
    real = {"train": x_train, "held": x_held, "held_feats": held_feats}
    floor = {"fd": finite(frechet_distance(train_feats, held_feats)),
             "kid": finite(kernel_inception_distance(train_feats, held_feats))}
    figures = rests_on(args.n, len(x_held), len(x_train), len(floor_idx), untrained, len(classes), conditional,
                       fid is not None)
    print("\n".join(images_used(figures, conditional)), flush=True)

    cfg_scale = args.cfg_scale if conditional else None
    settings = [dict(sampler=args.sampler, steps=steps, cfg_scale=cfg_scale)]
    if args.sweep in ("cfg", "all") and guided:
        settings += [dict(sampler=args.sampler, steps=steps, cfg_scale=float(c)) for c in CFG_SWEEP]
    if args.sweep in ("steps", "all"):
        chains = (FLOW_SWEEP if isinstance(diffusion, Flow) else STEPS_SWEEP + (FULL_CHAIN if args.sweep == "all"
                                                                                else []))
        too_many = sorted({k for _, k in chains if k is not None and k >= diffusion.noise_steps})
        if too_many:
            print(f"note: --sweep {args.sweep} leaves out {', '.join(map(str, too_many))} steps: this run has "
                  f"{diffusion.noise_steps} noise steps, so at most {diffusion.noise_steps - 1}")
        settings += [dict(sampler=s, steps=k, cfg_scale=cfg_scale) for s, k in chains if k not in too_many]
    settings = [{**s, "guidance_interval": args.guidance_interval} for s in settings]
    unique = list({setting_name(s): s for s in settings}.values())

    asked = torch.full((args.n,), -1) if args.unconditional else labels  # -1: no label
    per_class = torch.bincount(labels, minlength=model.num_classes).tolist() if conditional else None
    rows = min(10, min(per_class)) if conditional else 0  # full rows of the grids, one per class
    in_grid = rows * model.num_classes if rows else min(args.n, 100)  # fewer samples than classes: one round
    denoisers = {"model": model}
    if args.exact:
        device = next(model.parameters()).device
        exact = ExactDenoiser(x_train, y_train if conditional else None, diffusion, getattr(model, "num_classes", None))
        denoisers["exact"] = exact.to("cpu" if device.type == "mps" else device)  # MPS has no float64
    results, grids = [], {}
    for denoiser, net in denoisers.items():
        for s in unique:
            s = {**s, "denoiser": denoiser}
            seed_everything(args.seed)
            samples, seconds = generate(net, diffusion, args.n, asked, s["cfg_scale"], s["sampler"], s["steps"],
                                        args.precision, s["guidance_interval"])
            results.append({**s, **score(samples, labels, judge, real, len(classes)), "seconds_per_image": seconds,
                            "nfe": len(visited_times(diffusion, s["sampler"], s["steps"]))})
            grids[setting_name(s)] = samples[:in_grid]
            if len(results) == 1:
                main_samples = samples  # standard FID's
            print(format_row(results[-1], conditional, figures), flush=True)

    ema = not args.no_ema and (run_dir / "ema_ckpt.pt").is_file()
    report = {"run": str(run_dir), "n": args.n, "sweep": args.sweep, "held_out": len(x_held), "train": len(x_train),
              "ema": ema, "no_ema": args.no_ema, "samples_per_class": per_class,
              "sampling_flags": given_sampling,
              "training": training_record(run_dir), "figures": figures, "judge_epochs": judge.epochs,
              "classes_without_training_images": untrained,
              "judge_accuracy_held_out": judge_accuracy, "floor": floor, "results": results,
              "inception_fid": inception_fid(fid, main_samples, x_held)}
    save_json(report, out_dir / "eval.json")
    main_grid = grids[setting_name(unique[0])]
    save_images(sorted_by_label(main_grid, conditional, model), out_dir / "eval_samples.png", nrow=10)
    save_images(nearest_pairs(main_grid[:30], x_train), out_dir / "eval_nearest.png", nrow=10)
    if args.sweep != "none":
        plot_sweeps(report, grids, conditional, model, out_dir)
    print_table(report, conditional)
    print(f"wrote {out_dir / 'eval.json'}")
    if args.readme:
        write_readme(Path(args.readme), report, conditional, out_dir, args.readme_block or "results")
    return report


def class_mix(held_labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """The n labels to sample, in the held-out images' class proportions (largest remainders, ties to the lower
    class; a class left without a sample takes one from the largest when n allows), dealt in rounds 0..K-1 of the
    classes still owed.

    The proportions are the real data's so that FD compares like with like, and accuracy is comparable with the
    judge's own on those images: with uniform labels an imbalanced dataset (60% of the emoji are People & Body)
    scores a mismatch of class mixes as bad samples. Balanced data gives exactly arange(K) repeated.
    """
    exact = n * torch.bincount(held_labels, minlength=num_classes).double() / len(held_labels)
    quota = exact.floor().long()
    by_remainder = sorted(range(num_classes), key=lambda c: (-(exact[c] - quota[c]).item(), c))
    quota[by_remainder[:n - int(quota.sum())]] += 1
    for c in torch.nonzero(quota == 0).flatten().tolist() if n >= num_classes else []:
        quota[quota.argmax()] -= 1
        quota[c] = 1
    rounds = [[c for c in range(num_classes) if quota[c] > r] for r in range(int(quota.max()))]
    return torch.tensor([c for r in rounds for c in r])


def inception_metric(weights: str | None):
    """Standard FID's metric, set up before the work: the weights file read and the packages imported (None: off)."""
    if not weights:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--inception_weights '{path}' does not exist: give a local Inception v3 FID weights file")
    try:
        path.open("rb").close()
    except OSError as e:
        raise UserError(f"--inception_weights '{path}' cannot be read ({e.strerror})")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID needs it, and imports it only when computing)
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError("--inception_weights: standard FID needs torchmetrics and torch-fidelity: "
                        "pip install torchmetrics torch-fidelity")
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    except Exception as e:  # whatever the file holds: say so in one line, before the work
        raise UserError(f"--inception_weights '{path}' is not an Inception v3 FID weights file: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")


def inception_fid(fid, samples: torch.Tensor, x_held: torch.Tensor) -> str | float:
    """Standard FID of the main setting's samples (the model's) against the held-out images."""
    if fid is None:
        return "off: pass --inception_weights PATH (a local Inception v3 FID weights file) for standard FID"
    rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    fid.update(rgb(x_held), real=True)
    fid.update(rgb(samples), real=False)
    return float(fid.compute())


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Evaluate a run's samples offline.")
    p.add_argument("--run", required=True, help="a run folder (models/<run_name>)")
    p.add_argument("--n", type=whole(2), default=1000, help="samples per setting")
    add_sampler_args(p)  # of the main setting; the guidance of every setting but the cfg sweep's scales
    p.add_argument("--no_ema", action="store_true", help="a run with EMA weights (ema_ckpt.pt): score ckpt.pt instead")
    p.add_argument("--unconditional", action="store_true",
                   help="conditional runs: score the unconditional model that label dropout trained (label -1)")
    p.add_argument("--sweep", choices=["none", "cfg", "steps", "all"], default="none",
                   help="cfg: guidance scales 1..7 (conditional runs with label dropout); steps: every sampler at "
                        "5..100 network evaluations (up to the run's T - 1); all: both, and the original's chain")
    p.add_argument("--exact", action="store_true",
                   help="also score the exact denoiser of the training set at every setting (a model without error)")
    p.add_argument("--inception_weights", default=None,
                   help="a local Inception v3 weights file: standard FID of the main setting (needs torchmetrics and "
                        "torch-fidelity)")
    p.add_argument("--out_dir", default=None,
                   help="where the report and its figures go; another folder keeps the run's own eval.json, e.g. "
                        "when probing other sampling settings (default: results/<run_name>)")
    p.add_argument("--readme", default=None,
                   help="rewrite a block of this markdown file (README.md or a page of docs/) with the report")
    p.add_argument("--readme_block", default=None,
                   help="with --readme, the block of that file to rewrite, between <!-- NAME:start --> and "
                        "<!-- NAME:end --> (default: results)")
    add_runtime_args(p)
    p.add_argument("--judge_epochs", type=whole(1), default=None,
                   help=f"training epochs of the judge, cached in the run: a cached judge of other epochs is "
                        f"trained again (default: the cached judge's, else {JUDGE_EPOCHS})")
    return p


def main(argv: list[str] | None = None) -> None:
    evaluate(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
