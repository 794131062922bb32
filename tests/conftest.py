import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# 2 threads, as CI's 2 cores; TEST_THREADS=1 while something else keeps a core busy (two processes of 2 threads
# each on 2 cores wait on each other many times over)
torch.set_num_threads(int(os.environ.get("TEST_THREADS", 2)))


def write_images(folder: Path, n: int, size: int = 20, mode: str = "RGB", seed: int = 0) -> list[Path]:
    """n random PNG images in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    paths = []
    for i in range(n):
        array = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
        paths.append(path)
    return paths


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the CUDA case of a device test (`pytest -m cuda` runs them alone)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def device(request, monkeypatch) -> str:
    """The device of an end-to-end test: the CPU, and CUDA where there is a GPU (tools/gpu_check.sh
    runs those cases). On CUDA, convolutions compute in fp32 rather than TF32, so that the tests'
    fp32 tolerances hold there too."""
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder: training writes models/, results/ and runs/ into the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
