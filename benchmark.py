"""How close to the machine's limit do training and sampling run? One configuration, one table.

    python benchmark.py                                   # the embedded-digits default configuration
    python benchmark.py --image_size 64 --c_in 3 --width 64 --batch_size 12   # the original's configuration
    python benchmark.py --json bench.json                 # also write the numbers
    python benchmark.py --image_size 64 --c_in 3 --width 64 --batch_size 12 --original   # as the original ran
    python benchmark.py --readme docs/performance.md      # add or replace this configuration's row there

It measures the machine's matmul peak (fp32 and bf16), the real training step (forward, loss,
backward, AdamW, EMA) in images/s with its FLOPs counted by FlopCounterMode and the utilisation
against the peak of the precision in use, the share of the step's time and FLOPs that attention
takes (torch.profiler; `--profile` prints the top operators), the sampler's cost with and
without guidance (the in-training grids' sampler, `--sampler`, or with `--full_chain` the original's chain
over every step), and peak memory. `--original` times the original's own training: fp32, its
network (no input skip) and its attention, which materialises the attention weights.
"""
import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's "gpuGetDeviceCount failed" on CPU-only machines
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import ddpm
import ddpm_conditional
import flow
from modules import ORIGINAL_ATTENTION, ORIGINAL_MULT, ORIGINAL_SHAPE, SelfAttention
from devices import autocast_dtype, cpu_has_native, cpu_supports, pick_device, precision_name
from files import save_json, UserError
from runs import add_runtime_args, add_shape_args, ArgumentParser, run_main, whole
from sample import check_objective, visited_times
from tools.readme import update_readme_block


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_matmul(dtype: torch.dtype, device: torch.device, max_n: int, budget_s: float = 0.5
                ) -> tuple[Callable[[], torch.Tensor], int]:
    """(a square matmul in `dtype`, its FLOPs): n x n with n up to `max_n` while one product fits in `budget_s`.

    The size grows from 256 while a product stays fast, so a dtype the hardware only emulates
    (bf16 on a CPU without AVX512-BF16 or AMX: about 1 GFLOP/s) is measured in a second instead
    of the 12 minutes that seven 4096 x 4096 products (warm-up and repeats) would take.
    """
    n = min(256, max_n)
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        if n >= max_n or timed(lambda: a @ b, device, 1, warmup=1) > budget_s / 8:  # doubling n costs 8x
            return (lambda: a @ b), 2 * n ** 3
        n = min(2 * n, max_n)


# Operators of the attention layers: the fused kernels, and the plain kernel's batched matmuls
# and softmax (no other layer of the UNet uses bmm or softmax).
ATTENTION_OPS = ("scaled_dot_product", "bmm", "softmax")


def profiled(fn, device: torch.device, repeats: int) -> tuple[float, str]:
    """(share of the time spent in attention operators, table of the top operators) over `repeats` calls."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    time_of = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, time_of) for e in events)
    attention = sum(getattr(e, time_of) for e in events if any(op in e.key for op in ATTENTION_OPS))
    return attention / total, events.table(sort_by=time_of, row_limit=15)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, threads and vector instructions (its speed depends on them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    model = models[0] if models else platform.processor() or "cpu"
    isa = torch.backends.cpu.get_cpu_capability() + (" + BF16" if cpu_has_native(torch.bfloat16) else "")
    # AMX: bf16 matrix units, a bf16 peak about 5x that of AVX512-BF16 alone
    isa += " + AMX" if cpu_supports("amx_tile") else ""
    return f"{model}, {torch.get_num_threads()} threads, {isa}"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class OriginalAttention(SelfAttention):
    """SelfAttention computed as the original does: through nn.MultiheadAttention, which by default
    also returns the attention weights (averaged over the heads), so it materialises the (HW x HW)
    matrix instead of calling a fused kernel. Same parameters, same outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        normed = self.ln(tokens)
        attended, _ = self.mha(normed, normed, normed, need_weights=True)
        tokens = tokens + attended
        tokens = tokens + self.ff_self(tokens)
        return tokens.transpose(1, 2).unflatten(2, (H, W))


def use_original_attention(model: nn.Module) -> None:
    """Switch every attention layer of `model` to OriginalAttention, in place (its weights stay)."""
    for layer in model.modules():
        if type(layer) is SelfAttention:
            layer.__class__ = OriginalAttention


def build_trainer(args: argparse.Namespace, device: torch.device) -> ddpm.Trainer:
    """The scripts' real Trainer on random images of the configuration (written into a temporary folder)."""
    argv = ["--image_size", str(args.image_size), "--c_in", str(args.c_in), "--width", str(args.width),
            "--batch_size", str(args.batch_size), "--precision", args.precision, "--device", str(device),
            "--dataset_path", "synthetic", "--heads", str(args.heads),
            "--channel_mult", *map(str, args.channel_mult), "--attention", *map(str, args.attention)]
    argv += (["--compile"] if args.compile else []) + (["--no-input_skip"] if args.original else [])
    argv += ["--objective", args.objective] + (["--immiscible"] if args.immiscible else [])
    argv += ["--noise_steps", str(args.noise_steps)] if args.noise_steps else []  # a DDPM option (main checks)
    script = ddpm_conditional if args.conditional else ddpm
    targs = script.parse_args(argv)
    targs.c_in, targs.num_classes_found, targs.class_names = args.c_in, 10, [str(i) for i in range(10)]
    images = torch.randn(args.batch_size, args.c_in, args.image_size, args.image_size).clamp(-1, 1)
    loader = DataLoader(TensorDataset(images, torch.arange(args.batch_size) % 10), batch_size=args.batch_size)
    trainer = script.Trainer(targs, loader=loader)
    if args.original:  # before the first step, so that --compile traces the original's attention
        for model in (trainer.model, getattr(trainer, "ema_model", trainer.model)):
            use_original_attention(model)
    return trainer


def benchmark(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    torch.manual_seed(0)
    precision = precision_name(dtype)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda" or precision == "fp16":
        dtypes["fp16"] = torch.float16
    matmuls = {k: peak_matmul(d, device, args.matmul_size) for k, d in dtypes.items()}
    # the peak of the precision in use is measured below, between the timed training steps
    peaks = {k: flops / timed(product, device, args.repeats) if k != precision else None
             for k, (product, flops) in matmuls.items()}

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            trainer = build_trainer(args, device)
        finally:
            os.chdir(cwd)
    images, labels = (t.to(device) for t in next(iter(trainer.loader)))
    # A virtual machine's speed drifts by 20% within minutes: the utilisation should compare the
    # step and the peak at the same moments.
    product, product_flops = matmuls[precision]
    for _ in range(2):  # warm-up
        trainer.train_step(images, labels)
    steps, nearby_peaks = [], []
    for _ in range(args.repeats):
        steps.append(timed(lambda: trainer.train_step(images, labels), device, 1, warmup=0))
        nearby_peaks.append(product_flops / timed(product, device, 1, warmup=0))
    step, peaks[precision] = statistics.median(steps), statistics.median(nearby_peaks)
    attention_time, top_ops = profiled(lambda: trainer.train_step(images, labels), device, min(3, args.repeats))
    if args.profile:
        print(top_ops)

    n = args.sample_n
    diffusion, model = trainer.diffusion, getattr(trainer, "ema_model", trainer.model)
    if args.full_chain:
        kind = dict(sampler="ddpm", steps=None)
    else:  # the in-training grids' sampler (the default of every script), or the one asked for
        grids = trainer.sampling()
        kind = dict(sampler=grids["sampler"], steps=grids["steps"]) if args.sampler is None else \
            dict(sampler=args.sampler, steps=args.sample_steps or grids["steps"])
    steps = len(visited_times(diffusion, kind["sampler"], kind["steps"]))  # network evaluations

    def sample(cfg_scale):
        with trainer.run.autocast():
            if args.conditional:
                return diffusion.sample(model, n, torch.arange(n, device=device) % 10, cfg_scale, progress=False, **kind)
            return diffusion.sample(model, n, progress=False, **kind)

    sampling = {"plain": timed(lambda: sample(1), device, 1, warmup=1)}
    if args.conditional:
        sampling["guided"] = timed(lambda: sample(3), device, 1, warmup=0)

    memory = peak_memory_mb(device)
    # FlopCounterMode does not see inside the fused CPU attention kernel: count with the math one
    # (last: the math kernel materialises the attention matrix, which would inflate the peak memory)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        trainer.train_step(images, labels)
    flops = counter.get_total_flops()
    attention_flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))

    result = {
        "device": device_name(device),
        "config": {k: getattr(args, k) for k in ("image_size", "c_in", "width", "channel_mult", "attention", "heads",
                                                 "batch_size", "conditional", "compile", "original", "objective",
                                                 "immiscible")},
        "precision": precision,
        "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "train_step_s": step,
        "train_images_per_s": args.batch_size / step,
        "train_gflop_per_step": flops / 1e9,
        "train_tflops": flops / step / 1e12,
        "utilisation": flops / step / peaks[precision],
        "attention_time_share": attention_time,
        "attention_flop_share": attention_flops / flops,
        "sampler": f"{kind['sampler']}-{steps}",
        "sample_s_per_step": {k: v / steps for k, v in sampling.items()},
        "sample_s_per_image": {k: v / n for k, v in sampling.items()},
        "peak_memory_mb": memory,
    }
    return result


ORIGINAL = ", the original's network and attention"


def print_table(r: dict) -> None:
    c = r["config"]
    rows = [
        ("device", r["device"]),
        ("configuration", f"{c['c_in']}x{c['image_size']}x{c['image_size']}, width {c['width']}{shape_name(c)}, "
                          f"batch {c['batch_size']}, "
                          f"{'conditional' if c['conditional'] else 'unconditional'}, {r['precision']}"
                          f"{', compiled' if c['compile'] else ''}{ORIGINAL if c['original'] else ''}"),
        ("matmul peak", ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in r["peak_tflops"].items())),
        ("training", f"{r['train_step_s']:.3f} s/step, {r['train_images_per_s']:.1f} images/s"),
        ("training FLOPs", f"{r['train_gflop_per_step']:.1f} GFLOP/step = {r['train_tflops']:.3f} TFLOP/s"),
        ("utilisation", f"{100 * r['utilisation']:.0f}% of the {r['precision']} matmul peak"),
        ("attention", f"{100 * r['attention_time_share']:.0f}% of the step's time, "
                      f"{100 * r['attention_flop_share']:.0f}% of its FLOPs"),
    ]
    for k in r["sample_s_per_step"]:
        rows.append((f"sampling {r['sampler']} ({k})", f"{1000 * r['sample_s_per_step'][k]:.1f} ms/step, "
                                                      f"{r['sample_s_per_image'][k]:.3f} s/image"))
    rows.append(("peak memory", f"{r['peak_memory_mb']:.0f} MB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


README_HEADER = ["| device | configuration | training | utilisation | attention: time / FLOPs | "
                 "sampling (plain / guided) | peak memory |",
                 "|---|---|---|---|---|---|---|"]


def shape_name(c: dict) -> str:
    """The UNet's shape (and objective, noise pairing) in a configuration's name when it is not the original's (DDPM's),
    e.g. ", mult 2-2-2, attention at 4 8, 2 heads"."""
    mult, attention = c.get("channel_mult", list(ORIGINAL_MULT)), c.get("attention", list(ORIGINAL_ATTENTION))
    parts = [f"mult {'-'.join(map(str, mult))}"] if list(mult) != list(ORIGINAL_MULT) else []
    if sorted(attention) != list(ORIGINAL_ATTENTION):
        parts.append(f"attention at {' '.join(map(str, sorted(attention)))}" if attention else "no attention")
    parts += [f"{c['heads']} heads"] if c.get("heads", 4) != 4 else []
    parts += ["flow matching"] if c.get("objective") == "flow" else []
    parts += ["immiscible noise"] if c.get("immiscible") else []
    return "".join(f", {part}" for part in parts)


def readme_row(r: dict) -> str:
    c = r["config"]
    config = (f"{c['c_in']}x{c['image_size']}², width {c['width']}{shape_name(c)}, batch {c['batch_size']}, "
              f"{r['precision']}"
              f"{', compiled' if c['compile'] else ''}{ORIGINAL if c['original'] else ''}"
              f"{'' if c['conditional'] else ', unconditional'}")
    sampling = " / ".join(f"{r['sample_s_per_image'][k]:.3f}" for k in r["sample_s_per_image"])
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in r["peak_tflops"].items())
    return (f"| {r['device']} | {config} | {r['train_images_per_s']:.1f} img/s ({r['train_step_s']:.3f} s/step, "
            f"{r['train_gflop_per_step']:.1f} GFLOP) | {100 * r['utilisation']:.0f}% of {r['precision']} peak "
            f"(peaks, TFLOP/s: {peaks}) | {100 * r['attention_time_share']:.0f}% / "
            f"{100 * r['attention_flop_share']:.0f}% | {sampling} s/image, {r['sampler']} | {r['peak_memory_mb']:.0f} MB |")


def update_readme(path: Path, r: dict) -> None:
    """Put this configuration's row in the file's benchmark block, docs/performance.md's table (replacing the same
    device + configuration)."""
    new = readme_row(r)
    key = lambda row: row.split(" | ")[:2]

    def table(body: str) -> str:
        rows = [line for line in body.strip().splitlines() if line.startswith("| ") and line not in README_HEADER]
        return "\n".join([*README_HEADER, *(row for row in rows if key(row) != key(new)), new])

    update_readme_block(path, "benchmark", table)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("Benchmark training and sampling (the defaults: the digits default's configuration, "
                       "conditional).")
    p.add_argument("--image_size", type=whole(8), default=16, help="side of the square images")
    p.add_argument("--c_in", type=int, choices=[1, 3, 4], default=1, help="image channels")
    # the shape flags: width 32, else the original's network
    add_shape_args(p, width=32, **ORIGINAL_SHAPE)
    p.add_argument("--batch_size", type=whole(1), default=64, help="images per training step")
    p.add_argument("--unconditional", dest="conditional", action="store_false",
                   help="benchmark ddpm.py's step instead of ddpm_conditional.py's")
    add_runtime_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--original", action="store_true",
                   help="time the original's training: fp32, no input skip, attention through nn.MultiheadAttention "
                        "returning its weights")
    p.add_argument("--noise_steps", type=whole(2), default=None,
                   help="diffusion steps T of DDPM (default: the training scripts')")
    p.add_argument("--full_chain", action="store_true",
                   help="time the original's sampler (ancestral, all T-1 steps) instead of the in-training grids'")
    p.add_argument("--objective", choices=ddpm.OBJECTIVES, default="ddpm", help="the training objective")
    p.add_argument("--immiscible", action="store_true", help="time the step with immiscible noise (its assignment)")
    p.add_argument("--sampler", choices=ddpm.SAMPLERS + flow.SAMPLERS, default=None,
                   help="time this sampler at --sample_steps (default: the grids', by the objective: "
                        f"{ddpm.DEFAULT_SAMPLER}, flow {flow.DEFAULT_SAMPLER})")
    p.add_argument("--sample_steps", type=whole(1), default=None, help="steps of --sampler (default: the grids')")
    p.add_argument("--repeats", type=whole(1), default=5, help="timed training steps (median); the profiler sees up to 3")
    p.add_argument("--sample_n", type=whole(1), default=16, help="images per sampling measurement")
    p.add_argument("--matmul_size", type=whole(1), default=4096,
                   help="side of the square matmuls that measure the peak")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the training step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--readme", default=None,
                   help="put the result as a row of this markdown file's benchmark table (docs/performance.md)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.original:
        if args.precision not in ("auto", "fp32"):
            raise UserError(f"--original trains in fp32, as the original did: drop --precision {args.precision}")
        args.precision = "fp32"
    if args.sampler:
        check_objective(args.sampler, f"--objective {args.objective}", args.objective == "flow")
    if args.noise_steps and args.objective == "flow":
        raise UserError(f"--noise_steps {args.noise_steps} is DDPM's: flow matching has no noise steps, drop it")
    if args.full_chain and args.objective == "flow":
        raise UserError("--full_chain times the DDPM chain's every step: a flow-matching step has no such chain, drop "
                        "it (or --sampler euler --sample_steps N)")
    result = benchmark(args)
    print_table(result)
    if args.json:
        save_json(result, args.json)
    if args.readme:
        update_readme(Path(args.readme), result)


if __name__ == "__main__":
    run_main(main)
