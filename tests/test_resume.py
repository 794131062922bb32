"""Faults: kill -9, Ctrl-C, NaN, broken images, unwritable folders, malicious checkpoints."""
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm
import ddpm_conditional
from conftest import ROOT, write_images
from runs import lr_factor, run_main

# 32 digits, batch 8: 4 steps an epoch; log every step so that TensorBoard shows every step
TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "50", "--limit", "32",
        "--batch_size", "8", "--sample_every", "0", "--log_every", "1", "--ema_start", "2",
        "--lr_schedule", "constant", "--warmup", "2"]
RUN = ["--run_name", "r"]


def train(argv):
    ddpm_conditional.main([*TINY, *RUN, *argv])


def weights(folder, name):
    return torch.load(folder / "models" / "r" / name, weights_only=True)


def assert_same_weights(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def tensorboard_steps(folder):
    return [e.step for e in EventAccumulator(str(folder / "runs" / "r")).Reload().Scalars("MSE")]


def test_resume_at_an_epoch_end_equals_an_uninterrupted_run(tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    os.chdir(tmp_path / "a")
    train(["--epochs", "3", "--device", device])
    os.chdir(tmp_path / "b")
    train(["--epochs", "2", "--device", device])
    train(["--epochs", "3", "--resume", "--device", device])
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        # CUDA's backward kernels add in a varying order: the same run twice differs in the last bits
        assert_same_weights(weights(tmp_path / "a", name), weights(tmp_path / "b", name), exact=device == "cpu")
    state = weights(tmp_path / "b", "resume.pt")
    assert (state["step"], state["epoch"], state["ema"]["step"]) == (12, 3, 12)
    assert tensorboard_steps(tmp_path / "b") == list(range(12))


def test_resume_across_precisions(in_tmp, device):
    """The loss scaler has a state in fp16 alone: a run saved without one resumes in fp16, and back."""
    train(["--epochs", "1", "--precision", "bf16", "--device", device])
    train(["--epochs", "2", "--precision", "fp16", "--device", device, "--resume"])
    assert weights(in_tmp, "resume.pt")["scaler"]["scale"] > 0
    train(["--epochs", "3", "--precision", "fp32", "--device", device, "--resume"])
    state = weights(in_tmp, "resume.pt")
    assert state["scaler"] == {} and state["step"] == 12


def test_resuming_a_finished_run_says_so(in_tmp, capsys):
    train(["--epochs", "1"])
    train(["--epochs", "1", "--resume"])
    assert "already finished its 1 epochs" in capsys.readouterr().out


def test_resume_refuses_changed_model_or_data(in_tmp, capsys):
    train(["--epochs", "1"])
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "2", "--resume", "--width", "16"]))
    assert e.value.code == 2
    assert "--width 16 (the run has 8)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--epochs", "2", "--resume", "--no-input_skip"]))
    assert "--input_skip False (the run has True)" in capsys.readouterr().err
    train(["--epochs", "2", "--resume", "--lr", "1e-4"])  # the optimisation may change
    assert weights(in_tmp, "resume.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_resume_without_a_checkpoint_is_a_clear_error(in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--resume"]))
    assert "nothing to resume" in capsys.readouterr().err


def one_thread() -> dict:
    """The environment of the training processes below: one thread each, as under torchrun (test_distributed.py). A
    tiny model gains little from a second thread, and two threads on two busy cores wait on each other at every
    operation."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def command(argv) -> list[str]:
    return [sys.executable, str(ROOT / "ddpm_conditional.py"), *TINY, *RUN, *argv]


def start(folder, argv, **kw):
    return subprocess.Popen(command(argv), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=one_thread(), **kw)


def finish(folder, argv):
    """Run ddpm_conditional.py to its end."""
    return subprocess.run(command(argv), cwd=folder, capture_output=True, text=True, env=one_thread())


def wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def every_file_loads(folder):
    run = folder / "models" / "r"
    for name in ("ckpt.pt", "ema_ckpt.pt", "optim.pt", "resume.pt"):
        if (run / name).exists():
            torch.load(run / name, weights_only=True)
    json.loads((run / "run.json").read_text())


def test_kill_9_at_random_moments_then_resume(tmp_path):
    """Three runs side by side, each checkpointing every step and killed with kill -9 at its own random moment
    within 1.5 s of its first checkpoint; check what is on disk, then resume each to the end. The 32 steps take
    longer than that (3 s alone, more three at a time), so each kill lands mid-run."""
    epochs, steps = 8, 8 * 4
    folders = [tmp_path / str(seed) for seed in range(3)]
    for folder in folders:
        folder.mkdir()
    runs = [start(folder, ["--epochs", str(epochs), "--save_every", "1"]) for folder in folders]
    try:
        kill_at = {}  # the index of a run -> when its kill is due
        deadline = time.time() + 60
        while any(run.poll() is None for run in runs):
            assert time.time() < deadline, "a run never wrote its first checkpoint"
            for seed, (folder, run) in enumerate(zip(folders, runs)):
                if seed not in kill_at and (folder / "models" / "r" / "resume.pt").exists():
                    kill_at[seed] = time.time() + random.Random(seed).uniform(0, 1.5)
                if run.poll() is None and time.time() >= kill_at.get(seed, math.inf):
                    run.kill()
                    run.wait()
            time.sleep(0.02)
    finally:
        for run in runs:
            run.kill()
            run.wait()
    for run in runs:
        assert run.returncode == -signal.SIGKILL, run.stderr.read()[-3000:]
    done = []
    for folder in folders:
        every_file_loads(folder)
        done.append(torch.load(folder / "models" / "r" / "resume.pt", weights_only=True)["step"])
        assert done[-1] < steps, "the kill came after the end: it tested nothing"
    resumed = [start(folder, ["--epochs", str(epochs), "--resume"]) for folder in folders]
    for folder, run, step in zip(folders, resumed, done):
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        every_file_loads(folder)
        state = torch.load(folder / "models" / "r" / "resume.pt", weights_only=True)
        assert state["step"] == steps and state["epoch"] == epochs
        assert f"step {step}" in out
        assert tensorboard_steps(folder) == list(range(steps))  # continuous, no repeats


def test_ctrl_c_mid_epoch_saves_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    """Ctrl-C as soon as the first mid-epoch checkpoint (step 2) is on disk: 38 steps, and 19 more checkpoints, are
    left for the signal to land in. The uninterrupted run trains alongside, in its own folder and process."""
    epochs, steps = 10, 10 * 4
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    with open(tmp_path / "a.log", "w") as log:
        reference = subprocess.Popen(command(["--epochs", str(epochs)]), cwd=tmp_path / "a", stdout=log,
                                     stderr=subprocess.STDOUT, env=one_thread())
    try:
        proc = start(tmp_path / "b", ["--epochs", str(epochs), "--save_every", "2"])
        wait_for(tmp_path / "b" / "models" / "r" / "resume.pt")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGINT, err
        assert "Resume with: python ddpm_conditional.py --resume --run_name r" in err and "Traceback" not in err
        interrupted = torch.load(tmp_path / "b" / "models" / "r" / "resume.pt", weights_only=True)
        assert interrupted["step"] < steps
        result = finish(tmp_path / "b", ["--epochs", str(epochs), "--resume"])
        assert result.returncode == 0, result.stderr
        assert reference.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        assert_same_weights(weights(tmp_path / "a", name), weights(tmp_path / "b", name), exact=False)
    assert tensorboard_steps(tmp_path / "b") == list(range(steps))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(in_tmp, monkeypatch, capsys):
    train(["--epochs", "1"])
    good = weights(in_tmp, "ckpt.pt")
    real_loss = ddpm.Trainer.loss

    def poisoned(self, images, labels):
        loss = real_loss(self, images, labels)
        return loss * float("nan") if self.run.step == 5 else loss

    monkeypatch.setattr(ddpm.Trainer, "loss", poisoned)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "3", "--resume"]))
    assert e.value.code == 2
    assert "non-finite at step 5" in capsys.readouterr().err
    assert_same_weights(weights(in_tmp, "ckpt.pt"), good)
    assert weights(in_tmp, "resume.pt")["step"] == 4


def test_broken_images_are_listed_or_skipped(in_tmp, capsys):
    write_images(in_tmp / "data" / "a", 4)
    write_images(in_tmp / "data" / "b", 4, seed=1)
    (in_tmp / "data" / "a" / "bad1.png").write_bytes(b"garbage")
    (in_tmp / "data" / "b" / "bad2.jpg").write_bytes(b"")
    argv = ["--width", "8", "--image_size", "16", "--dataset_path", "data", "--batch_size", "4", "--epochs", "1",
            "--sample_every", "0"]
    with pytest.raises(SystemExit):
        run_main(lambda: ddpm_conditional.main(argv))
    err = capsys.readouterr().err
    assert "2 unreadable image(s)" in err and "bad1.png" in err and "bad2.jpg" in err
    ddpm_conditional.main([*argv, "--skip_bad_images"])
    assert "skipping 2 unreadable image(s) of 10" in capsys.readouterr().out
    assert (in_tmp / "models" / "DDPM_conditional" / "ckpt.pt").exists()


def test_unwritable_output_folder_is_a_clear_error(in_tmp, capsys):
    (in_tmp / "models").write_text("a file where the folder should be")
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--epochs", "1"]))
    assert "cannot write to 'models/r'" in capsys.readouterr().err


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {Payload.marker}",)


def test_a_malicious_resume_file_never_runs(in_tmp, capsys):
    Payload.marker = in_tmp / "pwned"
    (in_tmp / "models" / "r").mkdir(parents=True)
    torch.save({"args": {}, "x": Payload()}, in_tmp / "models" / "r" / "resume.pt")
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--resume"]))
    assert "resume.pt' is not a readable checkpoint" in capsys.readouterr().err
    assert not Payload.marker.exists()


def test_a_second_start_never_overwrites_a_run(in_tmp, capsys):
    train(["--epochs", "1"])
    first = weights(in_tmp, "ckpt.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "2"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "models/r and runs/r already hold a run" in err
    assert "--resume" in err and "--run_name" in err and "--overwrite" in err
    assert_same_weights(weights(in_tmp, "ckpt.pt"), first)
    (in_tmp / "results" / "r" / "stale.jpg").write_bytes(b"an old grid")
    train(["--epochs", "1", "--overwrite", "--seed", "1"])
    assert not (in_tmp / "results" / "r" / "stale.jpg").exists()
    assert len(list((in_tmp / "runs" / "r").iterdir())) == 1  # one event file: the new run's
    assert not torch.equal(weights(in_tmp, "ckpt.pt")["outc.weight"], first["outc.weight"])
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--resume", "--overwrite"]))
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("first, then", [("fp32", "fp16"), ("bf16", "fp16"), ("fp16", "fp32"), ("fp16", "fp16")])
def test_resume_under_any_precision(in_tmp, first, then):
    train(["--epochs", "1", "--precision", first])
    train(["--epochs", "2", "--resume", "--precision", then])
    state = weights(in_tmp, "resume.pt")
    assert state["epoch"] == 2 and state["args"]["precision"] == then
    assert bool(state["scaler"]) == (then == "fp16")  # the GradScaler runs exactly when training in fp16
    assert all(torch.isfinite(v).all() for v in weights(in_tmp, "ckpt.pt").values())


def test_resume_refuses_another_world_size_with_the_right_command(in_tmp, monkeypatch, capsys):
    train(["--epochs", "1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--epochs", "2", "--resume"]))
    err = capsys.readouterr().err
    assert "trained by 1 process(es), this is 2" in err
    assert "python ddpm_conditional.py --resume --run_name r" in err
    state = weights(in_tmp, "resume.pt")
    state["args"]["world_size"] = 4
    torch.save(state, in_tmp / "models" / "r" / "resume.pt")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        run_main(lambda: train(["--epochs", "2", "--resume"]))
    assert "torchrun --nproc_per_node 4 ddpm_conditional.py --resume --run_name r" in capsys.readouterr().err


def test_more_epochs_on_a_cosine_run_span_the_schedule_over_the_new_total(in_tmp, capsys):
    cosine = ["--lr_schedule", "cosine", "--warmup", "0", "--lr", "1e-3"]
    train(["--epochs", "2", *cosine])
    assert weights(in_tmp, "resume.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0, abs=1e-12)
    capsys.readouterr()
    train(["--epochs", "4", "--resume", *cosine])
    assert "the cosine schedule now ends at epoch 4, not 2: the learning rate goes from 0 to 0.5 x --lr" in \
        capsys.readouterr().out
    # 16 steps in all: lr(step) = 1e-3 * cos-decay(step / 16), ending at 0
    assert weights(in_tmp, "resume.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0, abs=1e-12)
    args = ddpm_conditional.parse_args([*TINY, *RUN, "--epochs", "4", *cosine])
    assert lr_factor(12, args, 16) == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 16)))


def test_folder_run_resumed_at_an_epoch_end_sees_the_same_random_crops(tmp_path, monkeypatch):
    """Worker processes crop at random; a resumed run gets the crops of an uninterrupted one."""
    write_images(tmp_path / "data" / "a", 6, size=40)
    write_images(tmp_path / "data" / "b", 6, size=40, seed=1)
    folder = ["--dataset_path", str(tmp_path / "data"), "--width", "8", "--image_size", "16", "--batch_size", "4",
              "--noise_steps", "50", "--sample_every", "0", "--ema_start", "2", "--run_name", "r"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ddpm_conditional.main([*folder, "--epochs", "3"])
    monkeypatch.chdir(tmp_path / "b")
    ddpm_conditional.main([*folder, "--epochs", "2"])
    ddpm_conditional.main([*folder, "--epochs", "3", "--resume"])
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        assert_same_weights(weights(tmp_path / "a", name), weights(tmp_path / "b", name))


def test_flags_given_once_can_be_turned_off_on_resume(in_tmp):
    train(["--epochs", "1", "--skip_bad_images"])
    assert ddpm_conditional.parse_args([*RUN, "--resume"]).skip_bad_images
    args = ddpm_conditional.parse_args([*RUN, "--resume", "--no-skip_bad_images", "--no-compile"])
    assert not args.skip_bad_images and not args.compile


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_stops_the_run_and_keeps_the_last_checkpoint(in_tmp, monkeypatch, capsys, error):
    train(["--epochs", "1"])
    before = {name: weights(in_tmp, name) for name in ("ckpt.pt", "resume.pt")}
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):  # the second file of the save finds the disk full (or read-only)
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(error, os.strerror(error))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "2", "--resume"]))
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert e.value.code == 2 and err.startswith("error: "), err
    assert f"could not write to models/r ({os.strerror(error)})" in err and "MB are free" in err
    assert "resume with: python ddpm_conditional.py --resume --run_name r" in err
    assert_same_weights(weights(in_tmp, "resume.pt")["model"], before["resume.pt"]["model"])
    assert not [p for p in (in_tmp / "models" / "r").iterdir() if p.suffix == ".tmp"]  # no half-written files
    monkeypatch.setattr(os, "fsync", real_fsync)
    train(["--epochs", "2", "--resume"])  # room again: the run goes on from the intact checkpoint
    assert weights(in_tmp, "resume.pt")["epoch"] == 2
