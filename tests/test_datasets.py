"""The named datasets: emoji from its pip package, torchvision's through a fake archive, and offline failures."""
import json
import pickle
import urllib.request

import numpy as np
import pytest
import torch
import torchvision

import ddpm
import ddpm_conditional
import evaluate
from conftest import write_images
from runs import run_main
from utils import EMOJI_GROUPS, load_dataset

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "20", "--sample_every", "0",
        "--epochs", "1"]


def test_emoji_are_nine_groups_on_white_with_a_fixed_stratified_held_out_split():
    x_train, y_train, x_held, y_held, classes = load_dataset("emoji")
    assert classes == list(EMOJI_GROUPS) and len(classes) == 9
    assert x_train.shape == (3400, 3, 72, 72) and x_held.shape == (373, 3, 72, 72) and x_train.dtype == torch.uint8
    per_class = torch.bincount(y_train, minlength=9) + torch.bincount(y_held, minlength=9)
    assert per_class.tolist() == [168, 2260, 153, 135, 218, 85, 262, 223, 269]  # People & Body: skin tones
    assert torch.equal(torch.bincount(y_held, minlength=9), per_class // 10)  # a tenth of every group
    assert (x_train[:, :, 0, 0] == 255).all(1).float().mean() > 0.9  # transparent corners composited on white
    assert len({tuple(c) for c in x_train[:, :, 36, 36].tolist()}) > 100  # colour, not grey
    again = load_dataset("emoji")
    assert torch.equal(again[2], x_held) and torch.equal(again[1], y_train)


def write_idx(path, array: np.ndarray) -> None:
    """The MNIST file format: a magic number (type 0x08 = ubyte, then the number of dims), the dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_datasets_load_from_a_fake_archive(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    x_train, y_train, x_held, y_held, classes = load_dataset(name, tmp_path)
    assert x_train.shape == (30, 1, 32, 32) and x_held.shape == (10, 1, 32, 32)  # padded as the digits
    assert x_train[..., :2, :].sum() == 0 and len(classes) == 10
    assert y_held.tolist() == list(range(10))


def test_cifar10_loads_from_a_fake_archive_and_trains(tmp_path, monkeypatch, in_tmp):
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 8) for i in range(1, 6)), ("test_batch", 10)]:
        with open(batches / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)},
                        f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    # torchvision checks the real files' md5 sums: let the fake archive pass them
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    x_train, y_train, x_held, y_held, classes = load_dataset("cifar10", tmp_path / "cifar")
    assert x_train.shape == (40, 3, 32, 32) and x_held.shape == (10, 3, 32, 32) and classes[3] == "class3"
    ddpm_conditional.main([*TINY, "--dataset", "cifar10", "--data_root", str(tmp_path / "cifar"), "--batch_size", "8"])
    config = json.loads((in_tmp / "models" / "DDPM_conditional" / "run.json").read_text())
    assert config["dataset"] == "cifar10" and config["num_classes"] == 10 and config["model_args"]["c_in"] == 3


@pytest.mark.parametrize("name, archive", [("cifar10", "cifar-10-python.tar.gz"),
                                           ("mnist", "train-images-idx3-ubyte.gz"),
                                           ("fashion_mnist", "train-images-idx3-ubyte.gz")])
def test_offline_download_is_one_line_naming_the_way_out(in_tmp, monkeypatch, capsys, name, archive):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: ddpm.main([*TINY, "--dataset", name, "--data_root", "dl"]))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"error: could not get {name} into 'dl'"), err
    assert archive in err and "--dataset_path" in err
    assert not (in_tmp / "models" / "DDPM_Unconditional" / "run.json").exists()


def test_dataset_and_dataset_path_together_are_refused(in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_main(lambda: ddpm.main(["--dataset", "emoji", "--dataset_path", "images"]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset emoji and --dataset_path both name the data" in err


def test_a_tiny_conditional_emoji_run_and_its_evaluation_data(in_tmp):
    ddpm_conditional.main([*TINY, "--dataset", "emoji", "--limit", "36", "--batch_size", "12"])
    config = json.loads((in_tmp / "models" / "DDPM_conditional" / "run.json").read_text())
    assert config["dataset"] == "emoji" and config["class_names"] == list(EMOJI_GROUPS)
    state = torch.load(in_tmp / "models" / "DDPM_conditional" / "ema_ckpt.pt", weights_only=True)
    assert state["inc.double_conv.0.weight"].shape[1] == 3 and state["label_emb.weight"].shape[0] == 9
    x_train, y_train, x_held, y_held, classes = evaluate.real_images(config)
    assert x_train.shape == (3400, 3, 16, 16) and x_held.shape == (373, 3, 16, 16) and len(classes) == 9
    # the emoji recipe: 32x32, 80 epochs of a UNet that attends at 1/4 and 1/8 of the side only, recorded in run.json
    assert config["model_args"]["attention"] == [4, 8] and config["model_args"]["channel_mult"] == [2, 4, 4]
    emoji = ddpm_conditional.parse_args(["--dataset", "emoji"])
    assert (emoji.image_size, emoji.epochs, emoji.attention, emoji.cfg_scale) == (32, 80, [4, 8], 2)
    assert ddpm.parse_args(["--dataset", "emoji"]).attention == [1, 2, 4, 8]  # unconditional: the original's shape


def test_the_folder_recipe_keeps_the_originals_objective_and_ema(tmp_path):
    """A folder trains as the original did: eps, plain MSE, EMA 0.995 after 2,000 steps; the short emoji recipe
    uses v-prediction, Min-SNR and the power EMA (docs/results.md, Colour)."""
    write_images(tmp_path / "images" / "a", 2)
    folder = ddpm_conditional.parse_args(["--dataset_path", str(tmp_path / "images")])
    assert (folder.prediction, folder.loss_weight, folder.ema_power, folder.ema_beta, folder.ema_start) == \
        ("eps", "none", 0, 0.995, 2000)
    assert (folder.batch_size, folder.epochs, folder.lr) == (14, 300, 3e-4)
    assert ddpm.parse_args(["--dataset_path", str(tmp_path / "images")]).batch_size == 12
    emoji = ddpm_conditional.parse_args(["--dataset", "emoji"])
    assert (emoji.prediction, emoji.loss_weight, emoji.ema_power) == ("v", "min_snr", 6.94)
