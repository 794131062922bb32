"""A training run's plumbing: the command line, run folders, saving and resuming, stop signals (the Run object)."""
import argparse
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from devices import (autocast, autocast_dtype, barrier, gather, init_distributed, pick_device, PRECISION_HELP,
                     precision_name, PRECISIONS, seed_everything)
from files import load_checkpoint, save_checkpoint, save_json, tensor_bytes, UserError, writable_folder, WriteError
from utils import close_loader, DATASETS, make_grid, save_images, SeededSampler, square_nrow
from modules import shape_problem


class Run:
    """A training run's life outside the math: its process and device, its folders, its position (epoch, batch,
    step), the progress bar and TensorBoard, stop signals, checkpoints and resuming. The training loop calls it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(pick_device(args.device))
        self.is_main = self.rank == 0  # only rank 0 writes files, grids and TensorBoard
        args.device, args.world_size = str(self.device), self.world_size
        seed_everything(args.seed + self.rank)  # each rank draws its own noise; DDP syncs the initial weights
        if not args.resume:
            check_new_run(args.run_name, args.overwrite)  # on every rank, before rank 0 writes anything
        barrier()
        if self.is_main:
            setup_logging(args.run_name, overwrite=args.overwrite and not args.resume)
        barrier()
        self.amp_dtype = None  # the autocast dtype, set by prepare()
        self.folder = Path("models") / args.run_name
        self.step, self.epoch, self.batch = 0, 0, 0  # optimizer steps done, and where the next one starts
        self.train_seconds, self.clock = 0.0, time.monotonic()  # training time, over every resume
        self.first_bad_step = torch.full((), -1, device=self.device)  # kept on the device: no sync per step
        self.saved_step = None  # the step of the last checkpoint written
        self.stop, self.stop_requested = None, False  # Ctrl-C / SIGTERM: finish the step, save, exit
        self.logger, self.bar = None, None  # TensorBoard (rank 0) and the progress bar, opened by training()
        self.steps_per_epoch, self.running, self.count = 0, None, 0  # the loss since the last log
        self.epoch_end, self.epoch_seconds, self.grid_seconds = 0.0, 0.0, None  # what a sample grid costs

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that trains (DDP under torchrun, compiled with --compile; checkpoints save the plain one), and
        what the run needs once the model exists: its precision, and the stop signals' process group."""
        net = model
        if dist.is_initialized():  # under torchrun, even with one process
            net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        net = torch.compile(net) if self.args.compile else net
        self.amp_dtype = autocast_dtype(self.args.precision, self.device)
        self.stop = StopRequest(self.world_size)
        return net

    def record(self, model: torch.nn.Module, diffusion, sampling: dict) -> None:
        """Write run.json when the run starts: everything that rebuilds the model, the Diffusion and its sampling."""
        if not self.is_main or self.args.resume:
            return
        a = self.args
        config = {
            "model": type(model).__name__,
            "model_args": dict(c_in=a.c_in, c_out=a.c_in, time_dim=model.time_dim, width=a.width,
                               input_skip=a.input_skip, channel_mult=list(model.channel_mult),
                               attention=list(model.attention), heads=model.heads),
            "diffusion_args": diffusion.settings(),
            "sampling": sampling,
            "class_names": a.class_names,
            "dataset": a.dataset,
            "dataset_path": a.dataset_path,
            "command": a.command,
            "args": {k: v for k, v in vars(a).items() if k != "class_names"},
        }
        if hasattr(a, "num_classes"):  # ddpm_conditional.py's
            config["num_classes"] = a.num_classes
        save_json(config, self.folder / "run.json")

    def resume(self) -> dict:
        """Read resume.pt: the position and this process's random stream continue here; the rest is returned."""
        state = load_checkpoint(self.folder / "resume.pt")
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.saved_step = self.step
        self.train_seconds = state.get("train_seconds", 0.0)
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return state

    def lr_schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning rate at each step: --lr times lr_factor (--warmup, --lr_schedule)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.args, total_steps))

    def continue_schedule(self, optimizer: torch.optim.Optimizer, scheduler, saved_epochs: int,
                          steps_per_epoch: int) -> None:
        """After a resume the optimisation flags given now win: the learning rate, the weight decay, AdamW's beta2,
        and a schedule that spans the --epochs given now."""
        a, total = self.args, self.args.epochs * steps_per_epoch
        if a.lr_schedule == "cosine" and a.epochs != saved_epochs and self.is_main:
            before = lr_factor(self.step, a, saved_epochs * steps_per_epoch)
            print(f"the cosine schedule now ends at epoch {a.epochs}, not {saved_epochs}: the learning rate goes "
                  f"from {before:.3g} to {lr_factor(self.step, a, total):.3g} x --lr here")
        scheduler.base_lrs = [a.lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = a.lr * lr_factor(self.step, a, total)
            group["weight_decay"] = a.weight_decay
            group["betas"] = (group["betas"][0], a.adam_beta2)

    def finished(self) -> bool:
        if self.epoch < self.args.epochs:
            return False
        if self.is_main:
            print(f"{self.args.run_name} already finished its {self.epoch} epochs: raise --epochs to train on")
        return True

    @contextmanager
    def training(self, loader: DataLoader, model: torch.nn.Module):
        """Around the loop: say what trains, open TensorBoard, listen for stop signals; close it all at the end."""
        a = self.args
        if self.is_main:
            if a.resume:
                print(f"resuming {a.run_name} at epoch {self.epoch}, step {self.step}")
            # a resumed run drops the TensorBoard events written after its checkpoint
            purge = self.epoch * len(loader) + self.batch if a.resume else None
            self.logger = SummaryWriter(f"runs/{a.run_name}", purge_step=purge)
            backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""
            print(f"world size {self.world_size}{backend}: global batch {a.batch_size * self.world_size} "
                  f"({a.batch_size} per process)")
            print(f"training {a.run_name}: {len(loader.dataset)} images {a.c_in}x{a.image_size}x{a.image_size}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {self.device}, "
                  f"precision {self.amp_dtype or torch.float32}, {a.epochs} epochs of {len(loader)} steps")
        model.train()
        self.clock = time.monotonic()
        self.stop.listen()
        try:
            yield
            if self.is_main:
                print(f"{a.run_name}: {self.step} steps in {self.train_seconds / 60:.1f} minutes")
        finally:
            self.stop.restore()
            close_loader(loader)
            if self.is_main:
                self.logger.close()

    def batches(self, loader: DataLoader, epoch: int):
        """The epoch's batches on the device, from where the run stands (mid-epoch after a resume), with a progress
        bar; once they are done, the run stands at the start of the next epoch."""
        if isinstance(loader.sampler, SeededSampler):
            loader.sampler.set_epoch(epoch)
            loader.sampler.start = self.batch * loader.batch_size  # skip what was trained before a resume
        rng = torch.get_rng_state()
        batches = iter(loader)
        torch.set_rng_state(rng)  # starting the loader draws a seed: undo it, so a resumed run's stream matches
        self.steps_per_epoch, self.running, self.count = len(loader), torch.zeros((), device=self.device), 0
        self.bar = tqdm(batches, desc=f"epoch {epoch}", initial=self.batch, total=len(loader), dynamic_ncols=True,
                        disable=not self.is_main)
        start = time.monotonic()
        for images, labels in self.bar:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        self.epoch, self.batch = epoch + 1, 0
        self.epoch_end = time.monotonic()
        self.epoch_seconds = self.epoch_end - start

    def log_step(self, loss: torch.Tensor, lr: float) -> None:
        """After each step: count it, note a non-finite loss, poll the stop signals (sets `stop_requested`), and
        every --log_every steps log the mean loss, stopping the run if a loss was not finite."""
        bad = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)
        self.step, i, self.batch = self.step + 1, self.batch, self.batch + 1
        self.running, self.count = self.running + loss, self.count + 1
        self.stop_requested = self.stop.requested()  # after every step: torchrun gives its workers 30 s to save
        if self.count == self.args.log_every or self.batch == self.steps_per_epoch or self.stop_requested:
            mse = self.running.item() / self.count  # the only host sync, once per --log_every steps
            self.check_finite()
            self.bar.set_postfix(MSE=f"{mse:.4f}", lr=f"{lr:.2e}")
            if self.is_main:  # rank 0's loss stands for all
                self.logger.add_scalar("MSE", mse, global_step=self.epoch * self.steps_per_epoch + i)
            self.running, self.count = torch.zeros((), device=self.device), 0

    def checkpoint_due(self) -> bool:
        """--save_every N: every N steps, except at an epoch's end (which saves anyway)."""
        every = self.args.save_every
        return bool(every) and self.step % every == 0 and self.batch < self.steps_per_epoch

    def grid_due(self, epoch: int) -> bool:
        """Every --sample_every epochs and at the last, on rank 0 only (the other ranks draw no grids)."""
        every = self.args.sample_every
        return self.is_main and bool(every) and ((epoch + 1) % every == 0 or epoch == self.args.epochs - 1)

    def save_grids(self, epoch: int, grids: dict[str, torch.Tensor]) -> None:
        """results/<run>/<epoch><suffix>.jpg and TensorBoard, for each {suffix: uint8 images}: a row per class
        (conditional), else about square. The first time, say what the grids cost beside the training: at large
        sizes or many classes they can cost more."""
        if self.grid_seconds is None:
            self.grid_seconds = time.monotonic() - self.epoch_end  # drawn since the epoch ended
            print(f"sample grids: {sum(len(images) for images in grids.values())} images in "
                  f"{self.grid_seconds:.1f} s, after {self.epoch_seconds:.1f} s of training in the epoch "
                  f"(--sample_every and --n_samples set their cost)")
        folder = Path("results") / self.args.run_name
        for suffix, images in grids.items():
            row = self.args.n_samples if hasattr(self.args, "num_classes") else square_nrow(len(images))
            try:
                save_images(images, folder / f"{epoch}{suffix}.jpg", nrow=row)
            except WriteError as e:
                raise UserError(f"{e}; make room: {self.what_is_kept()}") from None
            self.logger.add_image(f"samples{suffix}", make_grid(images, row), epoch)

    def save(self, files: dict[str, dict], state: dict) -> None:
        """Write `files` and resume.pt (`state` and the run's position), each atomically, resume.pt last."""
        self.check_finite()
        rng = gather(self.rng_state())  # every process's random state (collective), for rank 0 to save
        now = time.monotonic()
        self.train_seconds, self.clock = self.train_seconds + now - self.clock, now
        if self.is_main:
            a = self.args
            files = {**files, "resume.pt": {
                **state, "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "train_seconds": self.train_seconds, "device": str(self.device),
                "precision": precision_name(self.amp_dtype), "rng": rng,
                "args": {k: v for k, v in vars(a).items() if k not in ("class_names", "command", "device", "overwrite")}}}
            try:
                self.logger.flush()  # every logged step up to this checkpoint is on disk before it
                for name, content in files.items():
                    save_checkpoint(content, self.folder / name)
            except (OSError, WriteError) as e:  # a full disk, a quota, a read-only folder: each file is old or new
                reason = e if isinstance(e, WriteError) else WriteError(e, self.folder, tensor_bytes(files))
                raise UserError(f"{reason}; make room: {self.what_is_kept()}") from None
        self.saved_step = self.step
        barrier()

    def save_and_exit(self, files: dict[str, dict], state: dict) -> None:
        """After a stop signal: save, say how to resume, and exit as the signal would have."""
        self.save(files, state)
        signum = self.stop.signal or signal.SIGTERM
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: stopped at epoch {self.epoch}, step {self.step}; checkpoint "
                  f"saved in {self.folder}. Resume with: {resume_command(self.args, self.world_size)}",
                  file=sys.stderr)
        sys.exit(128 + signum)

    def rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def check_finite(self) -> None:
        """Stop on a non-finite loss (collective under torchrun: every rank stops together)."""
        bad = self.first_bad_step.clone()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = int(bad)
        if bad >= 0:
            raise UserError(f"the loss became non-finite at step {bad}: lower --lr or check the data; "
                            f"{self.what_is_kept()}")

    def what_is_kept(self) -> str:
        """After a failure: the last checkpoint and the command that continues from it, or that there is none."""
        if self.saved_step is None:
            return (f"no checkpoint was saved before it, so start again (--overwrite reuses the name "
                    f"{self.args.run_name})")
        return (f"the checkpoint of step {self.saved_step} in {self.folder} is kept; resume with: "
                f"{resume_command(self.args, self.world_size)}")


def run_main(main) -> None:
    """Call `main()`; a UserError becomes one line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # under torchrun: close the process group before the interpreter tears it down, which can abort
        # ("terminate called without an active exception") and fail a finished run
        if dist.is_initialized():
            dist.destroy_process_group()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show: None (the help text says
    what decides the value) and on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's --help, whose errors are one line naming the flag (a UserError), not a usage."""

    def __init__(self, description: str | None = None, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        raise UserError(re.sub(r"^argument ([^:/ ]+)\S*: ", r"\1 ", message))


def whole(minimum: int | None = None, maximum: int | None = None):
    """An argparse type: a whole number, at least `minimum` and at most `maximum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return parse


def real(minimum: float | None = None, positive: bool = False):
    """An argparse type: a finite number, at least `minimum`, or with `positive` above 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got '{text}'")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value
    return parse


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device, --precision and --seed, as every script takes them."""
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto", help=PRECISION_HELP)
    p.add_argument("--seed", type=whole(0, 2 ** 31 - 1), default=0,  # numpy takes seeds below 2^32; ranks add theirs
                   help="random seed: the same seed gives the same results")


def training_parser(description: str, run_name: str, recipe: Callable[[str], str]) -> ArgumentParser:
    """A training script's parser with the UNet's shape flags, and in groups of their own the flags of the run rather
    than the method (the data, the grids, devices, saving and resuming) and of the optimisation. `recipe(flag)` words
    the defaults that depend on the dataset."""
    parser = ArgumentParser(description)
    p = parser.add_argument_group("the run: data, sample grids, device, logging, saving and resuming")
    p.add_argument("--run_name", default=run_name, help="names the folders under models/, results/ and runs/")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="digits and emoji ship with pip packages (no download); mnist, fashion_mnist and cifar10 "
                        "come through torchvision, downloaded once into --data_root (default: digits)")
    p.add_argument("--dataset_path", default=None,
                   help="instead of --dataset, a folder of images: one sub-folder per class, or a flat folder")
    p.add_argument("--image_size", type=whole(8), default=None,
                   help=f"side of the square images, divisible by 8 {recipe('image_size')}")
    p.add_argument("--c_in", type=int, choices=[1, 3, 4], default=None,
                   help="image channels: 1, 3 or 4 (default: from the data)")
    p.add_argument("--data_root", default="data", help="where torchvision datasets are downloaded and kept")
    p.add_argument("--limit", type=whole(1), default=None,
                   help="use only N images, every class in proportion (smoke runs; default: all)")
    p.add_argument("--num_workers", type=whole(0), default=None,
                   help="data-loading processes for a folder (default: min(4, cores))")
    p.add_argument("--skip_bad_images", action=argparse.BooleanOptionalAction, default=False,
                   help="skip unreadable images instead of stopping")
    p.add_argument("--log_every", type=whole(1), default=10, help="steps between loss logs (each one syncs the device)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--resume", action="store_true", help="continue models/<run_name> where its last checkpoint left it")
    p.add_argument("--overwrite", action="store_true",
                   help="start again over an existing run: deletes models/, results/ and runs/<run_name> first")
    p.add_argument("--save_every", type=whole(0), default=0,
                   help="also checkpoint every N steps (0 = at epoch ends only)")
    p.add_argument("--sample_every", type=whole(0), default=None,
                   help=f"epochs between sample grids, 0 = never; the last epoch always gets one "
                        f"{recipe('sample_every')}")
    p.add_argument("--n_samples", type=whole(1), default=16,
                   help="images in each sample grid (conditional: per class, for at most 10 classes)")
    add_runtime_args(p)
    add_shape_args(parser, recipe)
    parser.add_argument("--input_skip", action=argparse.BooleanOptionalAction, default=True,
                        help="a 1x1 conv from x_t past the first GroupNorm (docs/changes.md); --no-input_skip: the "
                             "original")
    p = parser.add_argument_group("optimisation: AdamW, its learning-rate schedule, the batch and the epochs")
    p.add_argument("--epochs", type=whole(1), default=None, help=f"passes over the data {recipe('epochs')}")
    p.add_argument("--batch_size", type=whole(1), default=None, help=f"images per step {recipe('batch_size')}")
    p.add_argument("--lr", type=real(positive=True), default=None, help=f"AdamW peak learning rate {recipe('lr')}")
    p.add_argument("--warmup", type=whole(0), default=None, help=f"linear learning-rate warm-up steps {recipe('warmup')}")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], default=None,
                   help=f"after warm-up {recipe('lr_schedule')}")
    p.add_argument("--weight_decay", type=real(0), default=0.01, help="AdamW weight decay")
    p.add_argument("--adam_beta2", type=real(0), default=None,
                   help=f"AdamW's beta2: 0.999 is the original's, EDM2 (Karras et al. 2024) uses 0.99 {recipe('adam_beta2')}")
    return parser


def add_shape_args(p: argparse.ArgumentParser, default: Callable[[str], str] = lambda flag: "", **defaults) -> None:
    """The UNet's shape flags: for the training scripts (defaults None, the recipes' worded by `default(flag)`),
    and for benchmark.py (`defaults`)."""
    p.add_argument("--width", type=whole(4), help=f"base channel width of the UNet {default('width')}".rstrip())
    p.add_argument("--channel_mult", type=whole(1), nargs=3, metavar=("M2", "M4", "M8"),
                   help="the UNet's widths at 1/2, 1/4 and 1/8 of the side, as multiples of --width (the bottleneck: "
                        f"twice the last) {default('channel_mult')}".rstrip())
    p.add_argument("--attention", type=int, nargs="*", choices=[1, 2, 4, 8], metavar="FACTOR",
                   help="where the UNet attends, as downsampling factors: 1 = full resolution (the costly one), 2, 4, "
                        f"8 = the lowest; none = no attention {default('attention')}".rstrip())
    p.add_argument("--heads", type=whole(1), help=f"attention heads {default('heads')}".rstrip())
    p.set_defaults(**defaults)


# --------------------------------------------------------------------------- command line, resuming

def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None, recipes: dict) -> argparse.Namespace:
    """A training script's arguments: parse, fill the data-dependent defaults from `recipes[--dataset]` (or
    ["folder"]; a value may be a function of the other arguments), and check the values. A resumed run keeps its
    own options, and gets the original's (the folder recipe's) for those it predates."""
    original_options = recipes["folder"]
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it: give one of them")
    if args.resume:
        args = resumed_args(parser, argv, args, original_options)
    if args.dataset and args.dataset_path:
        raise UserError(f"--dataset {args.dataset} and --dataset_path both name the data: give one of them")
    if args.dataset_path is None:
        args.dataset = args.dataset or "digits"
    for key, value in recipes[args.dataset or "folder"].items():
        if getattr(args, key) is None and not (args.resume and key in original_options):  # a resumed run's None stays
            setattr(args, key, value(args) if callable(value) else value)
    if args.image_size % 8:
        raise UserError(f"--image_size {args.image_size} must be a positive multiple of 8 (the UNet halves it 3 times)")
    if not 0 <= args.adam_beta2 < 1:  # AdamW's second-moment decay: 1 would never forget, past it diverge
        raise UserError(f"--adam_beta2 must be in [0, 1), got {args.adam_beta2:g}")
    args.attention = sorted(set(args.attention))  # a set of levels: in any order, once each
    problem = shape_problem(args.width, args.channel_mult, args.attention, args.heads)
    if problem:
        raise UserError(f"--{problem}: change --width, --channel_mult or --heads")
    args.command = " ".join(sys.argv) if argv is None else " ".join(["ddpm.py", *argv])
    return args


def lr_factor(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up over `args.warmup` steps, then constant, or cosine decay to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.lr_schedule == "cosine":
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# What a resumed run may not change: the model and the data (and so the meaning of a step).
LOCKED = ("dataset", "dataset_path", "image_size", "c_in", "width", "channel_mult", "attention", "heads", "input_skip",
          "noise_steps", "schedule",
          "objective", "prediction", "num_classes", "limit", "batch_size", "label_drop")


def resumed_args(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace,
                 original_options: dict) -> argparse.Namespace:
    """The saved run's arguments, overridden by the flags given now; changing a LOCKED one is an error. A run
    saved before an option existed was trained without it: it gets the original's value, not today's recipe's."""
    path = Path("models") / args.run_name / "resume.pt"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist (check --run_name, or drop --resume)")
    saved = {**original_options, **load_checkpoint(path)["args"]}
    world_size, saved_world_size = int(os.environ.get("WORLD_SIZE", 1)), saved.get("world_size", 1)
    if world_size != saved_world_size:  # the global batch, and with it every step, would change
        raise UserError(f"{args.run_name} was trained by {saved_world_size} process(es), this is {world_size}: "
                        f"resume with the same number, {resume_command(argparse.Namespace(**saved), saved_world_size)}")
    # argparse only fills defaults for attributes the namespace lacks: flags given now win, the rest is the run's
    merged = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
    changed = [f"--{k} {getattr(merged, k)} (the run has {saved[k]})" for k in LOCKED
               if k in saved and getattr(merged, k) != saved[k]]
    if changed:
        raise UserError(f"a resumed run keeps its model and data: {', '.join(changed)}; "
                        f"start a new --run_name to change them")
    merged.resume = True
    return merged


def resume_command(args: argparse.Namespace, world_size: int) -> str:
    """The command that continues this run: python for one process, torchrun with as many for several."""
    script = "ddpm_conditional.py" if hasattr(args, "num_classes") else "ddpm.py"
    launcher = "python"
    if world_size > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = f"torchrun --nproc_per_node {per_node}"
        if per_node != world_size:
            launcher = f"torchrun --nnodes {world_size // per_node} --nproc_per_node {per_node} <rendezvous flags>"
    return f"{launcher} {script} --resume --run_name {args.run_name}"


class StopRequest:
    """Ctrl-C and SIGTERM as a request to finish the step, save and exit. A second signal more than `echo` seconds
    after the first quits at once (checkpoints stay intact); sooner, it is the same request again: a job scheduler
    signals every process and torchrun forwards its own signal on top."""

    def __init__(self, world_size: int, echo: float = 5.0):
        self.signal, self.time, self.echo, self.previous = None, 0.0, echo, {}
        # under torchrun the processes agree over a CPU (gloo) group: asking every step costs no device sync
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

    def listen(self) -> None:
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        if self.signal is not None:
            if time.monotonic() - self.time > self.echo:
                raise KeyboardInterrupt
            return
        self.signal, self.time = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving (again after {self.echo:g} s to quit "
              f"at once)", file=sys.stderr)

    def requested(self) -> bool:
        """Whether any process got a stop signal (collective under torchrun)."""
        stop = torch.tensor(float(self.signal is not None))
        if self.group is not None:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.group)
        return bool(stop)


# --------------------------------------------------------------------------- files

RUN_FOLDERS = ("models", "results", "runs")  # checkpoints, sample grids, TensorBoard events


def check_new_run(run_name: str, overwrite: bool) -> None:
    """Refuse to start a run over an earlier one's files, unless `overwrite` (then setup_logging deletes them)."""
    used = [f"{top}/{run_name}" for top in RUN_FOLDERS
            if (Path(top) / run_name).is_dir() and any(p.is_file() for p in (Path(top) / run_name).rglob("*"))]
    if not used or overwrite:
        return
    resumable = (Path("models") / run_name / "resume.pt").is_file()
    raise UserError(f"{' and '.join(used)} already hold{'s' if len(used) == 1 else ''} a run: "
                    + ("continue it with --resume, " if resumable else "")
                    + f"choose another --run_name, or pass --overwrite to delete {'it' if len(used) == 1 else 'them'}"
                    " and start again")


def setup_logging(run_name: str, overwrite: bool = False) -> None:
    """Create models/<run_name>, results/<run_name> and runs/<run_name> (emptied first if `overwrite`),
    and check they are writable."""
    for top in RUN_FOLDERS:
        folder = Path(top) / run_name
        if overwrite and folder.is_dir():
            shutil.rmtree(folder)
        writable_folder(folder, "run from a writable folder")


