"""Folder runs with the default worker processes exit by themselves: at the end, after Ctrl-C, after SIGTERM.

Each run is a subprocess in its own session, signalled as a terminal or a scheduler does it: the
whole process group (the DataLoader workers included) gets the signal.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, write_images

FOLDER_RUN = ["--dataset_path", "data", "--image_size", "16", "--width", "8", "--batch_size", "4",
              "--noise_steps", "20", "--sample_every", "0"]  # --num_workers left at its default
HANG = 90  # seconds: only a hang takes this long


def start(folder, script, name, epochs, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / script), *FOLDER_RUN, "--run_name", name,
                             "--epochs", str(epochs), *extra], cwd=folder, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("script", ["ddpm.py", "ddpm_conditional.py"])
def test_folder_runs_exit_after_the_end_a_ctrl_c_and_a_sigterm(tmp_path, script):
    write_images(tmp_path / "data" / "a", 8)
    write_images(tmp_path / "data" / "b", 8, seed=1)
    runs = {"end": start(tmp_path, script, "end", 1),
            "SIGINT": start(tmp_path, script, "SIGINT", 1000, "--save_every", "1"),
            "SIGTERM": start(tmp_path, script, "SIGTERM", 1000, "--save_every", "1")}
    deadline = time.monotonic() + HANG
    for name in ("SIGINT", "SIGTERM"):  # signal once training is under way, workers running
        while not (tmp_path / "models" / name / "resume.pt").exists():
            assert runs[name].poll() is None, runs[name].communicate()[1]
            assert time.monotonic() < deadline, f"the {name} run never checkpointed"
            time.sleep(0.1)
        os.killpg(runs[name].pid, getattr(signal, name))
    expected = {"end": 0, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}
    for name, proc in runs.items():
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{script}: the {name} run did not exit by itself (hung)")
        assert proc.returncode == expected[name], err
        assert "Traceback" not in err
        assert not group_alive(proc.pid), f"{script}: worker processes outlived the {name} run"
        state = torch.load(tmp_path / "models" / name / "resume.pt", weights_only=True)
        assert state["step"] > 0
        if name != "end":
            assert f"{name}: stopped at epoch" in err and "Resume with:" in err
