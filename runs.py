"""A training run's plumbing: the command line, run folders, checkpoint files, resuming and stop signals."""
import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from devices import PRECISIONS, PRECISION_HELP
from modules import shape_problem
from utils import UserError, atomic_write, first_line


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


def whole(minimum: int | None = None):
    """An argparse type: a whole number, at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
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
    p.add_argument("--seed", type=whole(), default=0, help="random seed: the same seed gives the same results")


# --------------------------------------------------------------------------- command line, resuming

def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None, recipes: dict,
                   original_options: dict) -> argparse.Namespace:
    """A training script's arguments: parse, fill the data-dependent defaults from `recipes[--dataset]` (or
    ["folder"]; a value may be a function of the other arguments), and check the values. A resumed run keeps its
    own options, and gets `original_options` for those it predates."""
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
    args.attention = sorted(set(args.attention))  # a set of levels: in any order, once each
    problem = shape_problem(args.width, args.channel_mult, args.attention, args.heads)
    if problem:
        raise UserError(f"--{problem}: change --width, --channel_mult or --heads")
    args.command = " ".join(sys.argv) if argv is None else " ".join(["ddpm.py", *argv])
    return args


# What a resumed run may not change: the model and the data (and so the meaning of a step).
LOCKED = ("dataset", "dataset_path", "image_size", "c_in", "width", "channel_mult", "attention", "heads", "input_skip",
          "noise_steps", "schedule",
          "prediction", "num_classes", "limit", "batch_size", "label_drop")


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


def writable_folder(folder: str | Path, fix: str = "give another place") -> Path:
    """Create `folder` and its parents, and check that a file can be written there: before the work, not after."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to '{folder}' ({e.strerror}): {fix}")
    return folder


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_error(e: OSError, folder: Path, needed: int) -> str:
    """One line for a failed write: what went wrong where, and the space it needs beside what is free."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return (f"could not write to {folder} ({e.strerror}): it needs about {needed / 1e6:.1f} MB there and "
            f"{free / 1e6:.1f} MB are free; what was written before is intact")


def save_checkpoint(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


class Pickled:
    """Stands in for every class a checkpoint names (a model saved whole, `torch.save(model)`): it keeps the state
    unpickling hands it and runs nothing, so the weights can be read without executing code from the file."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


def load_checkpoint(path: str | Path, map_location="cpu", objects: bool = False):
    """torch.load with weights_only=True: a checkpoint can hold tensors and plain data, never code. With `objects`,
    the classes a file names (a pickled model) are read as inert `Pickled` stand-ins, their code never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        error = e
    if not zipfile.is_zipfile(path):
        raise UserError(f"'{path}' is not a checkpoint in torch.save's format (a zip archive)")
    # A file that names classes or functions: torch's advice, to load it unsafely, is never the way here.
    names = []
    if "weights only" in str(error).lower():
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if not names:
        raise UserError(f"'{path}' is not a readable checkpoint ({first_line(error)})")
    if not objects:
        raise UserError(f"'{path}' is not a readable checkpoint: it holds Python objects ({', '.join(names[:3])}), "
                        f"not only tensors, and this project reads weights only")
    stand_ins = [(type(name.rsplit(".", 1)[-1], (Pickled,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        raise UserError(f"'{path}' is not a readable checkpoint: it holds Python objects ({', '.join(names[:3])}) "
                        f"that cannot be read without running their code; save the model's state_dict() instead")
