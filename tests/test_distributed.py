"""torch.distributed on the CPU: 2 processes with gloo."""
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import ddpm
from conftest import ROOT
from modules import UNet

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "50", "--limit", "32",
        "--sample_every", "0", "--lr_schedule", "constant", "--warmup", "0", "--lr", "1e-3"]
GLOBAL_BATCH, STEPS = 8, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initial_weights() -> dict:
    torch.manual_seed(1234)
    return UNet(c_in=1, c_out=1, width=8, input_skip=True).state_dict()


def run_steps(rank: int, world_size: int, folder: str, port: int) -> None:
    """STEPS training steps on this rank's share of fixed global batches, with fixed t and noise."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    if world_size == 1:
        os.environ.pop("WORLD_SIZE")
    os.chdir(folder)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(STEPS, GLOBAL_BATCH, 1, 16, 16, generator=g) * 2 - 1
    t_all = torch.randint(1, 50, (STEPS, GLOBAL_BATCH), generator=g)
    eps_all = torch.randn(STEPS, GLOBAL_BATCH, 1, 16, 16, generator=g)
    share = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)

    args = ddpm.parse_args([*TINY, "--batch_size", str(GLOBAL_BATCH // world_size),
                                                  "--run_name", f"world{world_size}"])
    args.c_in, args.num_classes_found, args.class_names = 1, 1, ["x"]
    loader = DataLoader(TensorDataset(images[0, share], torch.zeros(GLOBAL_BATCH // world_size)))
    trainer = ddpm.Trainer(args, loader=loader)
    trainer.model.load_state_dict(initial_weights())  # whatever the world size (DDP would sync them anyway)
    d = trainer.diffusion
    for k in range(STEPS):
        d.sample_timesteps = lambda n, edm=False, k=k: t_all[k, share]
        d.noise_images = lambda x, t, eps=None, k=k: (d.alpha_hat[t].sqrt()[:, None, None, None] * x
                                                      + (1 - d.alpha_hat[t]).sqrt()[:, None, None, None]
                                                      * eps_all[k, share], eps_all[k, share])
        trainer.train_step(images[k, share], torch.zeros(GLOBAL_BATCH // world_size))
    torch.save(trainer.model.state_dict(), f"rank{rank}_of{world_size}.pt")


def test_two_processes_equal_one_process_on_the_union_of_their_batches(tmp_path):
    mp.spawn(run_steps, args=(2, str(tmp_path), free_port()), nprocs=2)
    mp.spawn(run_steps, args=(1, str(tmp_path), free_port()), nprocs=1)
    rank0, rank1, single = (torch.load(tmp_path / f, weights_only=True)
                            for f in ("rank0_of2.pt", "rank1_of2.pt", "rank0_of1.pt"))
    initial = initial_weights()
    for k in single:
        assert torch.equal(rank0[k], rank1[k]), k
        torch.testing.assert_close(rank0[k], single[k], atol=1e-4, rtol=1e-3)  # Adam amplifies rounding a little
    assert max((single[k] - initial[k]).abs().max() for k in single) > 1e-3  # training moved the weights far more


def torchrun(folder, *argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "ddpm_conditional.py"), *TINY,
                           "--batch_size", "4", "--run_name", "ddp", *argv],
                          cwd=folder, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_writes_one_plain_checkpoint_and_resumes(tmp_path):
    result = torchrun(tmp_path, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("world size 2 (gloo): global batch 8 (4 per process)") == 1
    run = tmp_path / "models" / "ddp"
    assert {p.name for p in run.iterdir()} == {"ckpt.pt", "ema_ckpt.pt", "optim.pt", "resume.pt", "run.json"}
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    resume = torch.load(run / "resume.pt", weights_only=True)
    assert resume["step"] == 2 * 32 // 8  # each process takes half of every epoch
    result = torchrun(tmp_path, "--epochs", "3", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("resuming ddp at epoch 2, step 8") == 1
    assert torch.load(run / "resume.pt", weights_only=True)["step"] == 12


def test_a_schedulers_sigterm_under_torchrun_saves_and_prints_the_torchrun_command(tmp_path):
    """SLURM signals every process, and torchrun forwards its own SIGTERM on top: one request, one save.

    --log_every is far beyond the run, so only the per-step stop check can catch the signal in time."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(ROOT / "ddpm_conditional.py"), *TINY,
                             "--batch_size", "4", "--run_name", "ddp", "--epochs", "1000", "--save_every", "1",
                             "--log_every", "100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    resume = tmp_path / "models" / "ddp" / "resume.pt"
    deadline = time.monotonic() + 120
    while not resume.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert "SIGTERM: stopped at epoch" in err, err[-3000:]
    assert "Resume with: torchrun --nproc_per_node 2 ddpm_conditional.py --resume --run_name ddp" in err
    state = torch.load(resume, weights_only=True)
    assert 0 < state["step"] < 1000 * 4 and len(state["rng"]) == 2  # each rank's random stream
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])
