"""Users' own folders: every image mode the loader can meet, and every layout people unpack, never silently wrong.

Cases rebuilt from public bug reports of DDPM repositories: a colour folder whose first file is grayscale, 16-bit
PNGs that came out white, a stray preview.jpg beside the class folders, macOS and Jupyter litter, a folder of splits.
"""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, write_images
from files import UserError
from utils import open_image, read_folder

RNG = np.random.default_rng(0)


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (which PIL cannot write), byte by byte."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def colour(h: int = 8, w: int = 8) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def every_mode(folder) -> dict[str, object]:
    """One file of every mode PIL opens images in, and the oddities users have; {name: the file's path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, image, **kw):
        files[name] = folder / name
        image.save(files[name], **kw)

    gray = Image.fromarray(np.full((8, 8), 100, np.uint8))
    checker = np.tile([0, 255], (8, 4)).astype(np.uint8)
    save("1.png", Image.fromarray(checker).convert("1", dither=Image.Dither.NONE))
    save("L.png", gray)
    half = Image.fromarray(np.dstack([np.full((8, 8), 100, np.uint8), np.tile([0, 255], (8, 4)).astype(np.uint8)]),
                           "LA")
    save("LA.png", half)
    save("P.png", colour().convert("P"))
    save("P_gray_palette.png", gray.convert("P"))
    transparent = colour().convert("P")
    save("P_transparency.png", transparent, transparency=transparent.getpixel((0, 0)))
    save("PA.tif", colour().convert("PA"))
    save("RGB.jpg", colour())
    rgba = np.dstack([np.asarray(colour()), np.tile([0, 255], (8, 4)).astype(np.uint8)])
    save("RGBA.png", Image.fromarray(rgba, "RGBA"))
    save("CMYK.jpg", colour().convert("CMYK"))
    save("YCbCr.tif", colour().convert("YCbCr"))
    save("LAB.tif", colour().convert("LAB"))
    save("I16.png", Image.fromarray(np.full((8, 8), 30000, np.uint16)))  # opens as I;16
    save("I16B.tif", Image.frombytes("I;16B", (8, 8), np.full((8, 8), 30000, ">u2").tobytes()))
    save("I32.tif", Image.fromarray(np.full((8, 8), 30000, np.int32)))
    save("F.tif", Image.fromarray(np.full((8, 8), 0.5, np.float32)))
    files["RGB16.png"] = folder / "RGB16.png"
    files["RGB16.png"].write_bytes(png16_rgb(np.full((8, 8, 3), 30000, np.uint16)))
    save("RGB.webp", colour())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", colour(4, 12), exif=exif)
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (200, 20)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    save("tiny.png", colour(2, 3))
    save("large.jpg", colour(1200, 1600))
    return files


def test_every_mode_opens_scaled_by_its_own_depth_and_converted(tmp_path):
    files = every_mode(tmp_path / "modes")
    for path in files.values():
        for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 4)):
            image = open_image(path, mode)
            assert image.mode == mode and len(image.getbands()) == channels, (path.name, mode)
    value = lambda name, mode="L": np.asarray(open_image(files[name], mode))
    # 16 and 32 bits and floats: scaled by their own range (PIL's own convert makes 30000 of 65535 white)
    for name in ("I16.png", "I16B.tif", "I32.tif"):
        assert (value(name) == round(30000 / 65535 * 255)).all(), name
    assert (value("F.tif") == 128).all()
    assert (value("RGB16.png", "RGB") == round(30000 / 65535 * 255)).all()
    assert (value("1.png") == np.tile([0, 255], (8, 4))).all() and (value("L.png") == 100).all()
    # transparency: kept as alpha, or composited on white
    assert (value("LA.png", "RGBA")[..., 3] == np.tile([0, 255], (8, 4))).all()
    assert (value("LA.png")[:, ::2] == 255).all() and (value("LA.png")[:, 1::2] == 100).all()
    assert (value("RGBA.png", "RGB")[:, ::2] == 255).all()
    assert value("P_transparency.png", "RGBA")[..., 3].min() == 0
    # EXIF orientation applied; an animation's first frame; a 1600x1200 JPEG decoded at a reduced scale
    assert open_image(files["exif_rotated.jpg"], "RGB").size == (4, 12)
    assert abs(int(value("animated.gif", "RGB").mean()) - 200) < 3
    assert min(open_image(files["large.jpg"], "RGB", size=80).size) >= 80
    assert open_image(files["large.jpg"], "RGB", size=80).size[0] < 1600


def test_a_folder_of_every_mode_trains_as_colour_and_says_what_it_converted(tmp_path, capsys):
    every_mode(tmp_path / "modes")
    folder, channels = read_folder(tmp_path / "modes")
    out = capsys.readouterr().out
    assert channels == 3 and len(folder.samples) == 22
    line = next(line for line in out.splitlines() if "channel(s)" in line)
    assert "3 channel(s) (RGB)" in line and "I;16 1" in line and "CMYK 1" in line
    assert "gray image(s) to RGB" in line and "with transparency composited on white" in line
    assert "of 16/32 bits or float scaled to 8 bits" in line and "1 animated: the first frame" in line


@pytest.mark.parametrize("first, rest, channels", [
    ("L", "RGB", 3),      # a colour folder whose first file is grayscale (it trained as 1 channel)
    ("RGBA", "RGB", 3),   # ... whose first file is a transparent PNG (it trained as 4)
    ("RGB", "L", 3),      # gray in RGB loses nothing; colour in gray would
    ("L", "L", 1),
    ("RGBA", "RGBA", 4),  # every image transparent: the alpha is kept
    ("RGBA_opaque", "RGBA_opaque", 3),  # an alpha channel that is opaque everywhere is not transparency
    ("P_gray", "L", 1),   # a palette of grays is gray
])
def test_a_folder_is_colour_if_its_images_are(tmp_path, first, rest, channels):
    def image(kind):
        if kind == "L":
            return colour().convert("L")
        if kind == "P_gray":
            return colour().convert("L").convert("P")
        if kind.startswith("RGBA"):
            alpha = np.full((8, 8), 255, np.uint8) if kind == "RGBA_opaque" else RNG.integers(0, 256, (8, 8), np.uint8)
            return Image.fromarray(np.dstack([np.asarray(colour()), alpha]), "RGBA")
        return colour()

    image(first).save(tmp_path / "0_first.png")
    for k in range(9):
        image(rest).save(tmp_path / f"{k + 1}.png")
    assert read_folder(tmp_path, verbose=False)[1] == channels


def litter(root):
    """What unpacking a zip on a Mac, browsing on Windows and opening Jupyter leave beside the images."""
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "labels.csv").write_text("file,label\n")
    write_images(root / "__MACOSX" / "cat", 2)
    write_images(root / ".ipynb_checkpoints", 2)
    (root / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # not an image, though named like one


def test_stray_files_and_litter_never_change_the_class_list(tmp_path):
    """The user's path: ddpm_conditional.py on the folder, default worker processes, in a subprocess."""
    data = tmp_path / "data"
    for k, name in enumerate(("bird", "cat", "dog")):
        write_images(data / name, 10, seed=k)
    colour().save(data / "preview.jpg")  # it made a one-class model of the folder
    litter(data)
    write_images(data / "dog" / "puppies", 2, seed=9)  # nested: still dogs
    (data / "empty").mkdir()
    write_images(tmp_path / "elsewhere" / "fish", 4, seed=5)
    os.symlink(tmp_path / "elsewhere" / "fish", data / "fish")  # a linked class folder is a class
    os.symlink(tmp_path / "gone.png", data / "cat" / "gone.png")  # a broken link
    os.symlink(data / "cat", data / "cat" / "loop")  # a link back into a folder already read
    result = subprocess.run([sys.executable, str(ROOT / "ddpm_conditional.py"), "--dataset_path", "data",
                             "--num_classes", "4", "--epochs", "1", "--image_size", "16", "--width", "8",
                             "--noise_steps", "20", "--batch_size", "8", "--sample_every", "0", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "models" / "DDPM_conditional" / "run.json").read_text())
    assert config["class_names"] == ["bird", "cat", "dog", "fish"] and config["num_classes"] == 4
    out = result.stdout
    assert "data: 36 images in 4 class(es): bird 10, cat 10, dog 12, fish 4" in out
    assert "data: ignored 1 image(s) beside the class folders, in no class: preview.jpg" in out
    hidden = next(line for line in out.splitlines() if "hidden or system entries" in line)
    for name in (".DS_Store", "Thumbs.db", "__MACOSX", ".ipynb_checkpoints", "cat/._0.png"):
        assert name in hidden, (name, hidden)
    assert "ignored 1 file(s) that are not images: labels.csv" in out
    assert "ignored 1 empty folder(s): empty" in out
    assert "ignored 1 broken link(s): cat/gone.png" in out
    assert "ignored 1 link(s) to a folder already read: cat/loop" in out
    assert "images in nested folders belong to their class folder: dog/puppies" in out


def test_a_flat_folder_with_litter_is_one_class(tmp_path):
    write_images(tmp_path / "flat", 6)
    (tmp_path / "flat" / "cat").mkdir()  # for litter's AppleDouble file
    litter(tmp_path / "flat")
    (tmp_path / "flat" / "cat" / "._0.png").unlink()
    (tmp_path / "flat" / "cat").rmdir()
    folder, _ = read_folder(tmp_path / "flat", verbose=False)
    assert folder.classes == ["flat"] and len(folder.samples) == 6


def test_layouts_that_cannot_be_read_one_way_are_refused_naming_the_path(tmp_path):
    for split in ("train", "val"):
        write_images(tmp_path / "splits" / split / "cat", 2)
    with pytest.raises(UserError, match=r"holds the dataset splits train, val, not classes: give one split, "
                                        r"e\.g\. --dataset_path .*splits/train"):
        read_folder(tmp_path / "splits")
    write_images(tmp_path / "mixed", 6)
    write_images(tmp_path / "mixed" / "thumbnails", 2)
    with pytest.raises(UserError, match="holds 6 images at its top and 2 in the class folder.s. thumbnails"):
        read_folder(tmp_path / "mixed")


def test_an_unreadable_truncated_or_fake_image_is_named(tmp_path):
    write_images(tmp_path / "data" / "a", 3)
    (tmp_path / "data" / "a" / "fake.png").write_text("<html>404</html>")
    png = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (8, 8, 4), np.uint8), "RGBA").save(png, "PNG")
    (tmp_path / "data" / "a" / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    with pytest.raises(UserError, match=r"2 unreadable image\(s\): a/cut.png, a/fake.png"):
        read_folder(tmp_path / "data")
