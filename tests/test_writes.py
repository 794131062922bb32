"""Every failed write (a full disk, a quota, a read-only folder), whatever library raises it, ends in one line that
names the folder, the space needed and the space free; what was written before stays intact."""
import errno
import io
import os

import pytest
import torch

import ddpm_conditional
import edit
import sample
from conftest import write_images
from files import save_checkpoint, WriteError
from runs import run_main

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "20", "--limit", "32",
        "--batch_size", "8", "--sample_every", "0", "--run_name", "r"]


class Failing:
    """A file whose writes fail with `error` once `after` bytes are written: how a disk fills up mid-file."""

    def __init__(self, f, error: int, after: int):
        self.f, self.error, self.left = f, error, after

    def write(self, data) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise OSError(self.error, os.strerror(self.error))
        return self.f.write(data)

    def fileno(self):  # no file descriptor: Pillow writes through write() too, not straight to the descriptor
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk(monkeypatch):
    """{part of a file name: (errno, bytes before it fails)}: writes to those files fail as on a full disk."""
    failing, real = {}, os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        rule = next((rule for part, rule in failing.items() if part in name), None)
        return Failing(f, *rule) if rule else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return failing


def train(argv):
    ddpm_conditional.main([*TINY, *argv])


def error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars


def test_torch_zip_writer_on_a_full_disk_is_one_line(tmp_path, disk):
    """torch.save reports the full disk as RuntimeError("... unexpected pos ..."); it must read as the disk."""
    disk["w.pt"] = (errno.ENOSPC, 100_000)
    with pytest.raises(WriteError, match=rf"could not write to {tmp_path} \(No space left on device\): it needs "
                                         r"about 4\.0 MB there and [\d.]+ MB are free"):
        save_checkpoint({"w": torch.zeros(1_000_000)}, tmp_path / "w.pt")
    assert not list(tmp_path.iterdir())  # no half-written file left


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one(in_tmp, disk, capsys):
    train(["--epochs", "1"])
    before = (in_tmp / "models" / "r" / "resume.pt").read_bytes()
    disk["resume.pt"] = (errno.ENOSPC, 10_000)  # torch's zip writer: the case users hit
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "2", "--resume"]))
    err = error_line(capsys)
    assert e.value.code == 2 and err.startswith("error: could not write to models/r (No space left on device): "
                                                "it needs about"), err
    assert "MB are free" in err and "resume with: python ddpm_conditional.py --resume --run_name r" in err
    assert (in_tmp / "models" / "r" / "resume.pt").read_bytes() == before
    assert not [p for p in (in_tmp / "models" / "r").iterdir() if p.suffix == ".tmp"]


def test_a_sample_grid_on_a_full_disk_is_one_line(in_tmp, disk, capsys):
    disk["0_ema.jpg"] = (errno.ENOSPC, 100)  # PIL's writer
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "1", "--sample_every", "1", "--sample_steps", "2", "--n_samples", "1"]))
    err = error_line(capsys)
    assert e.value.code == 2 and err.startswith("error: could not write to results/r (No space left on device)"), err
    assert "make room: no checkpoint was saved before it" in err


def test_a_read_only_run_folder_stops_the_run_before_training(in_tmp, disk, capsys):
    disk["run.json"] = (errno.EROFS, 0)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: train(["--epochs", "1"]))
    err = error_line(capsys)
    assert e.value.code == 2 and err.startswith("error: could not write to models/r (Read-only file system)"), err
    assert not (in_tmp / "models" / "r" / "ckpt.pt").exists()


@pytest.mark.parametrize("script", ["sample", "edit"])
def test_the_sampling_scripts_output_on_a_full_disk_is_one_line(in_tmp, disk, capsys, script):
    train(["--epochs", "1"])
    write_images(in_tmp / "in", 1, size=16, mode="L")
    disk["out.png"] = (errno.ENOSPC, 100)
    argv = {"sample": ["--run", "models/r", "--n", "10", "--steps", "2", "--out", "out.png"],
            "edit": ["img2img", "--run", "models/r", "--images", "in", "--strength", "0.5", "--steps", "2",
                     "--out", "out.png"]}[script]
    main = {"sample": sample.main, "edit": edit.main}[script]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = error_line(capsys)
    assert e.value.code == 2 and err.startswith("error: could not write to . (No space left on device)"), err
    assert not (in_tmp / "out.png").exists()
