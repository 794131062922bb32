"""How good are a run's samples? Offline metrics judged by a small classifier trained on the run's own data.

    python evaluate.py --run models/DDPM_conditional                 # table + results/<run>/eval.json
    python evaluate.py --run models/DDPM_conditional --sweep cfg     # guidance scales 1..7, plots
    python evaluate.py --run models/DDPM_conditional --sweep steps   # every sampler at 5..100 network evaluations
    python evaluate.py --run models/DDPM_conditional --sweep steps --readme docs/results.md   # the Results page

The judge is a small CNN trained on the run's training images (cached in the run folder). Its
penultimate features stand in for Inception's: Frechet distance and KID are computed in them,
against held-out real images, beside the real-vs-real floor (held-out vs training images).
`--exact` also scores the exact denoiser of the training set at every setting: what the sampler
and guidance cost a model without error.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddpm import SAMPLERS
from ddpm_conditional import check_guidance_interval
from sample import add_sampler_args, fill_sampling, full_chain, load
from devices import autocast, autocast_dtype, seed_everything
from runs import (add_runtime_args, ArgumentParser, load_checkpoint, run_main, save_checkpoint, save_json, whole,
                  writable_folder)
from utils import (grid_array, ImageFiles, labels_of, load_dataset, read_folder, save_images, split_held_out,
                   to_model_range, transforms, UserError)
from tools.readme import readme_block
from tools.report import write_readme

CFG_SWEEP = [1, 2, 3, 4, 5, 6, 7]  # 1 = unguided; a scale <= 0 is treated as 1, so 0 would repeat it
# Every sampler at these network evaluations (one per step, a guided one included), and the original's chain.
STEPS_SWEEP = [(sampler, nfe) for sampler in SAMPLERS for nfe in (5, 10, 15, 20, 50, 100)]
FULL_CHAIN = [("ddpm", None)]  # the original's 999 steps: as long as the whole steps sweep, so in "all" only


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
    """A small CNN classifier; `features` (128-d, before the last layer) embed images for FD and KID."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(channels, 32), *block(32, 32), nn.MaxPool2d(2),
                                  *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                                  *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

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


def train_judge(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, epochs: int = 15,
                seed: int = 0) -> tuple[Judge, float]:
    """Train the judge on uint8 images (random 2-pixel shifts); returns it and its held-out accuracy."""
    torch.manual_seed(seed)
    judge = Judge(x.shape[1], int(y.max()) + 1)
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


def cached_judge(run_dir: Path, x, y, x_val, y_val, epochs: int = 15) -> tuple[Judge, float]:
    """The run's judge, trained once and kept in <run>/judge.pt."""
    path = run_dir / "judge.pt"
    if path.is_file():
        state = load_checkpoint(path)
        if tuple(state["shape"]) == tuple(x.shape[1:]):
            judge = Judge(x.shape[1], int(state["num_classes"]))
            judge.load_state_dict(state["weights"])
            return judge.eval(), float(state["accuracy"])
    judge, accuracy = train_judge(x, y, x_val, y_val, epochs)
    save_checkpoint({"weights": judge.state_dict(), "accuracy": accuracy, "shape": list(x.shape[1:]),
                     "num_classes": int(y.max()) + 1}, path)
    return judge, accuracy


# --------------------------------------------------------------------------- metrics

def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (as FID)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 20, size: int = 200,
                              seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over random subsets (as KID)."""
    a, b = a.double(), b.double()
    d, size = a.shape[1], min(size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:size]]
        y = b[torch.randperm(len(b), generator=g)[:size]]
        k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = size * (size - 1)
        values.append((k_xx.sum() - k_xx.diag().sum()) / off + (k_yy.sum() - k_yy.diag().sum()) / off
                      - 2 * k_xy.mean())
    return float(torch.stack(values).mean())


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
    ratio = float(d_samples.median() / d_held.median())
    return {"nn_median_samples": float(d_samples.median()), "nn_median_held_out": float(d_held.median()),
            "nn_ratio": ratio, "memorising": ratio < 0.8}


def class_entropy(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over log(num_classes): 1 = every class equally often."""
    p = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
    return float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(num_classes))


# --------------------------------------------------------------------------- the exact denoiser

class ExactDenoiser(nn.Module):
    """The noise prediction that is exact when the training images are the whole distribution.

    Then E[x_0 | x_t] is a mean of the training images x_i weighted by N(x_t; sqrt(alpha_hat_t) x_i,
    (1 - alpha_hat_t) I) (only those of class y when a label is given), and
    eps*(x_t, t) = (x_t - sqrt(alpha_hat_t) E[x_0 | x_t]) / sqrt(1 - alpha_hat_t) (v* for a v-prediction diffusion).
    Sampling with it ends on training images (the memorisation check flags it), so its FD is what
    the sampler and guidance alone cost: the best any model can score at the same setting.
    Each call compares every image with every training image (float64): fine for the digits,
    slow for a folder of tens of thousands.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, diffusion, num_classes: int | None = None):
        super().__init__()
        # The training images are its parameters (the samplers read the device off them).
        self.x0 = nn.Parameter(images.flatten(1).double() / 127.5 - 1, requires_grad=False)
        self.register_buffer("x0_sq", self.x0.square().sum(1))
        self.register_buffer("labels", labels)
        self.register_buffer("alpha_hat", diffusion.alpha_hat.double().cpu())
        self.prediction = diffusion.prediction  # what the sampler expects: eps, or v for a v-prediction run
        if num_classes is not None:
            self.num_classes = num_classes  # read by the conditional sampler

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        alpha_hat = self.alpha_hat[t][:, None]
        x_t = x.flatten(1).double()
        # log N(x_t; sqrt(alpha_hat) x_i, (1 - alpha_hat) I) up to terms that do not depend on i
        logits = (alpha_hat.sqrt() * x_t @ self.x0.T - 0.5 * alpha_hat * self.x0_sq) / (1 - alpha_hat)
        if y is not None:  # label -1: unconditional, every image
            logits = logits.masked_fill((y[:, None] >= 0) & (self.labels[None] != y[:, None]), -math.inf)
        x0 = torch.softmax(logits, dim=1) @ self.x0
        eps = (x_t - alpha_hat.sqrt() * x0) / (1 - alpha_hat).sqrt()
        out = eps if self.prediction == "eps" else alpha_hat.sqrt() * eps - (1 - alpha_hat).sqrt() * x0
        return out.to(x.dtype).view_as(x)


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
    result = {"fd": frechet_distance(feats, real["held_feats"]), "kid": kernel_inception_distance(feats, real["held_feats"])}
    if labels is not None:
        result["accuracy"] = float((predicted == labels).float().mean())
        result["accuracy_per_class"] = [float((predicted[labels == c] == c).float().mean()) for c in range(num_classes)]
    else:
        result["class_entropy"] = class_entropy(predicted, num_classes)
    result.update(memorisation(samples, real["train"], real["held"]))
    return result


def setting_name(s: dict) -> str:
    name = f"{s['sampler']}-{s['steps'] or 'all'}"
    if s["cfg_scale"] is not None:
        name += f" cfg {s['cfg_scale']:g}"
    if s.get("guidance_interval"):
        name += " t {}-{}".format(*s["guidance_interval"])
    return name + (" exact" if s.get("denoiser") == "exact" else "")


def evaluate(args: argparse.Namespace) -> dict:
    run_dir = Path(args.run)
    config_path = run_dir / "run.json"
    if not config_path.is_file():
        raise UserError(f"'{run_dir}' has no run.json: give a run folder written by ddpm.py or ddpm_conditional.py")
    config = json.loads(config_path.read_text())
    out_dir = writable_folder(args.out_dir or Path("results") / run_dir.name)  # before the work, not after
    if args.readme:
        readme_block(args.readme, args.readme_block)
    model, diffusion = load(run_dir, ema=not args.no_ema, device=args.device)
    has_labels = hasattr(model, "num_classes")
    if args.unconditional and not has_labels:
        raise UserError(f"{run_dir} is an unconditional run already: drop --unconditional")
    conditional = has_labels and not args.unconditional  # samples asked for a class, scored by accuracy
    given = [f"--{k}" for k in ("cfg_scale", "guidance_interval") if getattr(args, k) is not None]
    if given and not conditional:
        raise UserError(f"{', '.join(given)} guide a class-conditional model towards a class: "
                        f"{'--unconditional asks for none' if has_labels else f'{run_dir} is unconditional'}")
    # the sampling flags given, for the --readme block's command (the rest are the run's own, recorded in run.json)
    given_sampling = "".join(f"--{k} {v:g} " if isinstance(v, float) else f"--{k} {v} "
                             for k in ("sampler", "steps", "cfg_scale") if (v := getattr(args, k)) is not None)
    fill_sampling(args, model, conditional)
    steps = full_chain(args.steps, args.sampler, diffusion)
    try:
        check_guidance_interval(args.guidance_interval, diffusion.noise_steps)
        diffusion.check_sampler(args.sampler, steps)
    except ValueError as e:
        raise UserError(f"--{e}")

    x_train, y_train, x_held, y_held, classes = real_images(config)
    if len(classes) < 2:
        raise UserError("the judge is a classifier: it needs a dataset of at least 2 classes (class sub-folders)")
    judge, judge_accuracy = cached_judge(run_dir, x_train, y_train, x_held, y_held, args.judge_epochs)
    held_feats = judge.embed(x_held)[0]
    floor_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:min(args.n, len(x_train))]
    train_feats = judge.embed(x_train[floor_idx])[0]
    real = {"train": x_train, "held": x_held, "held_feats": held_feats}
    floor = {"fd": frechet_distance(train_feats, held_feats), "kid": kernel_inception_distance(train_feats, held_feats)}

    cfg_scale = args.cfg_scale if conditional else None
    interval = args.guidance_interval
    settings = [dict(sampler=args.sampler, steps=steps, cfg_scale=cfg_scale)]
    if args.sweep in ("cfg", "all") and conditional:
        settings += [dict(sampler=args.sampler, steps=steps, cfg_scale=float(c)) for c in CFG_SWEEP]
    if args.sweep in ("steps", "all"):
        chains = STEPS_SWEEP + (FULL_CHAIN if args.sweep == "all" else [])
        settings += [dict(sampler=s, steps=k, cfg_scale=cfg_scale) for s, k in chains]
    settings = [{**s, "guidance_interval": interval} for s in settings]
    unique = list({setting_name(s): s for s in settings}.values())

    labels = class_mix(y_held, args.n, model.num_classes) if conditional else None
    asked = torch.full((args.n,), -1) if args.unconditional else labels  # -1: no label
    per_class = torch.bincount(labels, minlength=model.num_classes).tolist() if conditional else None
    rows = min(10, min(per_class) if conditional else args.n // 10)  # full rows of the grids
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
                            "nfe": len(diffusion.timesteps(s["steps"]))})
            grids[setting_name(s)] = samples[:rows * (model.num_classes if conditional else 10)]
            print(format_row(results[-1], conditional), flush=True)

    report = {"run": str(run_dir), "n": args.n, "sweep": args.sweep, "held_out": len(x_held), "ema": not args.no_ema,
              "samples_per_class": per_class,
              "sampling_flags": given_sampling,
              "training": training_record(run_dir),
              "judge_accuracy_held_out": judge_accuracy, "floor": floor, "results": results,
              "inception_fid": inception_fid(args, model, diffusion, asked, cfg_scale, x_held)}
    save_json(report, out_dir / "eval.json")
    main_grid = grids[setting_name(unique[0])]
    save_images(sorted_by_label(main_grid, conditional, model), out_dir / "eval_samples.png", nrow=10)
    save_images(nearest_pairs(main_grid[:30], x_train), out_dir / "eval_nearest.png", nrow=10)
    if args.sweep != "none":
        plot_sweeps(report, grids, conditional, model, out_dir)
    print_table(report, conditional)
    print(f"wrote {out_dir / 'eval.json'}")
    if args.readme:
        write_readme(Path(args.readme), report, conditional, out_dir, args.readme_block)
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


def sorted_by_label(images: torch.Tensor, conditional: bool, model) -> torch.Tensor:
    """Grid order: one row per class (the first rounds of the sample labels hold every class, 0..K-1)."""
    if not conditional:
        return images
    k = model.num_classes
    return images.view(-1, k, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])


def inception_fid(args, model, diffusion, labels, cfg_scale, x_held) -> str | float:
    if not args.inception_weights:
        return "off: pass --inception_weights PATH (a local Inception v3 FID weights file) for standard FID"
    path = Path(args.inception_weights)
    if not path.is_file():
        raise UserError(f"--inception_weights '{path}' does not exist")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError("standard FID needs torchmetrics and torch-fidelity: pip install torchmetrics torch-fidelity")
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    seed_everything(args.seed)
    samples, _ = generate(model, diffusion, args.n, labels, cfg_scale, args.sampler,
                          full_chain(args.steps, args.sampler, diffusion), args.precision, args.guidance_interval)
    fid.update(rgb(x_held), real=True)
    fid.update(rgb(samples), real=False)
    return float(fid.compute())


# --------------------------------------------------------------------------- reporting

def format_row(r: dict, conditional: bool) -> str:
    first = f"acc {100 * r['accuracy']:5.1f}%" if conditional else f"entropy {r['class_entropy']:.3f}"
    return (f"{setting_name(r):20s} {first}  FD {r['fd']:8.3f}  KID {r['kid']:8.4f}  NN ratio {r['nn_ratio']:.2f}"
            f"{' (MEMORISING)' if r['memorising'] else ''}  {r['seconds_per_image']:.3f} s/img")


def print_table(report: dict, conditional: bool) -> None:
    print(f"\njudge accuracy on held-out real images: {100 * report['judge_accuracy_held_out']:.1f}%")
    print(f"real-vs-real floor (held-out vs training): FD {report['floor']['fd']:.3f}  KID {report['floor']['kid']:.4f}")
    for r in report["results"]:
        print(format_row(r, conditional))
    print(f"Inception FID: {report['inception_fid']}")


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
    if conditional and len(cfg_rows("model")) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key in zip(axes, (metric, "fd", "kid")):
            for denoiser, label in (("model", "model"), ("exact", "exact denoiser")):
                if cfg_rows(denoiser):
                    ax.plot([r["cfg_scale"] for r in cfg_rows(denoiser)], [r[key] for r in cfg_rows(denoiser)], "o-",
                            label=label)
            if key != metric:
                ax.axhline(report["floor"][key], color="gray", ls="--", label="real vs real")
            ax.legend()
            ax.set_xlabel("cfg_scale")
            ax.set_title(key)
        fig.suptitle(f"guidance sweep ({setting_name({**main, 'cfg_scale': None})}, n={report['n']})")
        fig.tight_layout()
        fig.savefig(out_dir / "sweep_cfg.png", dpi=100)
        plt.close(fig)
        side_by_side([[(f"cfg {r['cfg_scale']:g}", grids[setting_name(r)]) for r in cfg_rows("model")]], model,
                     conditional, out_dir / "sweep_cfg_grids.png")
    if len(step_rows) >= 2:
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
        for ax, key in zip(axes, (metric, "fd", "kid", "seconds_per_image")):
            for sampler in SAMPLERS:
                rows = sorted((r for r in step_rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], "o-", label=sampler)
            if key in report["floor"]:
                ax.axhline(report["floor"][key], color="gray", ls="--", label="real vs real")
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations")
            ax.set_title(key.replace("_", " "))
            ax.legend()
        guidance = f"cfg {main['cfg_scale']:g}" if conditional else "unconditional"
        fig.suptitle(f"sampler sweep ({guidance}, n={report['n']})")
        fig.tight_layout()
        fig.savefig(out_dir / "sweep_steps.png", dpi=100)
        plt.close(fig)
        side_by_side([[(f"{r['sampler']}-{r['nfe']}", grids[setting_name(r)])
                       for r in sorted(step_rows, key=lambda r: r["nfe"]) if r["sampler"] == sampler]
                      for sampler in SAMPLERS], model, conditional, out_dir / "sweep_steps_grids.png")


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Evaluate a run's samples offline.")
    p.add_argument("--run", required=True, help="a run folder (models/<run_name>)")
    p.add_argument("--n", type=whole(2), default=1000, help="samples per setting")
    add_sampler_args(p)  # of the main setting; the guidance of every setting but the cfg sweep's scales
    p.add_argument("--no_ema", action="store_true", help="score ckpt.pt even when ema_ckpt.pt exists")
    p.add_argument("--unconditional", action="store_true",
                   help="conditional runs: score the unconditional model that label dropout trained (label -1)")
    p.add_argument("--sweep", choices=["none", "cfg", "steps", "all"], default="none",
                   help="cfg: guidance scales 1..7; steps: every sampler at 5..100 network evaluations; all: both, "
                        "and the original's 999-step chain")
    p.add_argument("--exact", action="store_true",
                   help="also score the exact denoiser of the training set at every setting (a model without error)")
    p.add_argument("--inception_weights", default=None, help="a local Inception v3 weights file for standard FID")
    p.add_argument("--out_dir", default=None,
                   help="where the report and its figures go; another folder keeps the run's own eval.json, e.g. "
                        "when probing other sampling settings (default: results/<run_name>)")
    p.add_argument("--readme", default=None,
                   help="rewrite a block of this markdown file (README.md or a page of docs/) with the report")
    p.add_argument("--readme_block", default="results",
                   help="the block of that file to rewrite, between <!-- NAME:start --> and <!-- NAME:end -->")
    add_runtime_args(p)
    p.add_argument("--judge_epochs", type=whole(1), default=15, help="training epochs of the judge (cached in the run)")
    return p


def main(argv: list[str] | None = None) -> None:
    evaluate(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(main)
