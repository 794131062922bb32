import multiprocessing
import re
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm
from conftest import ROOT, write_images
from modules import UNet
from devices import autocast_dtype
from runs import run_main

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "100", "--sample_steps", "5"]


def test_loss_drops_on_a_fixed_batch(in_tmp):
    args = ddpm.parse_args([*TINY, "--limit", "16", "--batch_size", "16", "--epochs", "40",
                                                  "--lr", "3e-3", "--warmup", "0", "--sample_every", "0"])
    trainer = ddpm.Trainer(args)
    images, _ = next(iter(trainer.loader))
    torch.manual_seed(123)
    t = trainer.diffusion.sample_timesteps(16)
    x_t, eps = trainer.diffusion.noise_images(images, t)

    def loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(trainer.model(x_t, t), eps).item()

    before = loss()
    trainer.fit()
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_training_writes_the_original_artefacts(in_tmp, device):
    ddpm.main([*TINY, "--limit", "64", "--batch_size", "16", "--epochs", "3", "--sample_every", "2",
               "--n_samples", "4", "--log_every", "2", "--run_name", "tiny", "--device", device])
    assert sorted(p.name for p in (in_tmp / "results" / "tiny").iterdir()) == ["1.jpg", "2.jpg"]
    model = UNet(c_in=1, c_out=1, width=8, input_skip=True)
    model.load_state_dict(torch.load(in_tmp / "models" / "tiny" / "ckpt.pt", weights_only=True), strict=True)
    assert "state" in torch.load(in_tmp / "models" / "tiny" / "optim.pt", weights_only=True)
    events = EventAccumulator(str(in_tmp / "runs" / "tiny")).Reload()
    # 4 steps per epoch, logged every 2 steps at global step epoch * len(loader) + i
    assert [e.step for e in events.Scalars("MSE")] == [1, 3, 5, 7, 9, 11]
    assert len(events.Images("samples")) == 2


def test_no_input_skip_trains_the_originals_exact_network(in_tmp):
    ddpm.main([*TINY, "--limit", "16", "--batch_size", "16", "--epochs", "1", "--sample_every", "0",
               "--no-input_skip", "--run_name", "plain"])
    state = torch.load(in_tmp / "models" / "plain" / "ckpt.pt", weights_only=True)
    UNet(c_in=1, c_out=1, width=8).load_state_dict(state, strict=True)
    assert not any(k.startswith("inc_skip") for k in state)


def test_training_on_a_folder_of_rgb_images(in_tmp):
    write_images(in_tmp / "data" / "a", 6, size=24)
    ddpm.main([*TINY, "--dataset_path", "data", "--batch_size", "4", "--epochs", "1", "--n_samples", "2"])
    state = torch.load(in_tmp / "models" / "DDPM_Unconditional" / "ckpt.pt", weights_only=True)
    assert state["inc.double_conv.0.weight"].shape == (8, 3, 3, 3)
    assert (in_tmp / "results" / "DDPM_Unconditional" / "0.jpg").exists()


@pytest.mark.parametrize("argv, message", [
    (["--dataset_path", "missing"], "does not exist"),
    (["--image_size", "20"], "multiple of 8"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--device", "cuda:7"], "not available|does not exist"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_input_is_one_clear_line(in_tmp, capsys, argv, message):
    if argv[1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: ddpm.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_command_line_error_has_no_traceback(in_tmp):
    (in_tmp / "empty").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "ddpm.py"), "--dataset_path", "empty"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset folder 'empty' holds no images")


def test_bf16_loss_curve_tracks_fp32(in_tmp, device):
    """bf16 autocast changes the arithmetic, not the training: the same losses, fp32 master weights."""
    curves = {}
    for precision in ("fp32", "bf16"):
        args = ddpm.parse_args([
            "--width", "8", "--image_size", "16", "--noise_steps", "100", "--limit", "16", "--batch_size", "16",
            "--lr", "3e-3", "--warmup", "0", "--lr_schedule", "constant", "--precision", precision,
            "--run_name", precision, "--device", device])
        trainer = ddpm.Trainer(args)
        images, labels = (t.to(device) for t in next(iter(trainer.loader)))
        torch.manual_seed(0)  # the same timesteps and noise for both precisions
        curves[precision] = torch.stack([trainer.train_step(images, labels) for _ in range(40)])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert fp32[-10:].mean() < 0.5 * fp32[:5].mean() and bf16[-10:].mean() < 0.5 * bf16[:5].mean()
    assert (bf16 - fp32).abs().mean() < 0.1 * fp32.mean()


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_and_emulated_cpu_warning(monkeypatch, capsys, native):
    """auto takes bf16 only where the CPU has it natively; asking for it anyway on such a CPU warns in one line."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: native)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", cpu) is None
    assert capsys.readouterr().err == ""
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    err = capsys.readouterr().err
    assert (err == "") == native
    if not native:
        assert err.count("\n") == 1 and "no native bf16" in err and "--precision auto picks fp32" in err
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert "no native fp16 arithmetic" in (err := capsys.readouterr().err)
    assert f"--precision auto picks {'bf16' if native else 'fp32'} here" in err


@pytest.mark.parametrize("capability, auto", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                              ((7, 5), torch.float16), ((7, 0), torch.float16), ((6, 1), None)])
def test_precision_auto_on_a_gpu_follows_its_compute_capability(monkeypatch, capsys, capability, auto):
    """bf16 from compute capability 8.0 on, fp16 (with the loss scaler) on 7.x, fp32 before: read off
    the GPU asked for, not the current one, and not from is_bf16_supported(), which counts emulation."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda", 1)
    assert autocast_dtype("auto", gpu) == auto
    assert asked and all(device == gpu for device in asked)
    assert capsys.readouterr().err == ""
    assert autocast_dtype("bf16", gpu) == torch.bfloat16
    err = capsys.readouterr().err
    assert (err == "") == (capability >= (8, 0))
    if err:
        assert err.count("\n") == 1 and f"compute capability {capability[0]}.{capability[1]}" in err
        assert f"--precision auto picks {'fp16' if auto else 'fp32'} here" in err


def test_worker_processes_end_with_training(in_tmp):
    """Data workers ignore SIGTERM, so multiprocessing's terminate() at exit cannot end them: unless
    fit() ends them, finished or stopped, the process hangs at exit."""
    write_images(in_tmp / "data" / "a", 8, size=16)
    args = ddpm.parse_args([*TINY, "--dataset_path", "data", "--batch_size", "4", "--epochs", "1",
                                                  "--sample_every", "0", "--num_workers", "2"])
    trainer = ddpm.Trainer(args)
    trainer.fit()
    assert not multiprocessing.active_children()
    trainer.args.epochs, trainer.run.stop.signal = 2, signal.SIGTERM  # as a SIGTERM during the second epoch
    with pytest.raises(SystemExit):
        trainer.fit()
    assert not multiprocessing.active_children()
