"""Training images: formats, orientation, cropping, and a specific error for each bad input."""

import numpy as np
import pytest
from PIL import Image

from pipeline.engine.data import ImageDataError, list_image_files, load_images, templates_for, with_image_token


def _save(path, size=(80, 64), colour=(255, 0, 0), mode="RGB", **kwargs):
    Image.new(mode, size, colour).save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("suffix", "mode"), [(".png", "RGBA"), (".jpg", "L"), (".webp", "RGB"), (".png", "P"), (".jpeg", "RGB")]
)
def test_formats_and_modes_become_rgb_squares(tmp_path, suffix, mode):
    colour = {"RGBA": (255, 0, 0, 255), "L": 128, "RGB": (255, 0, 0), "P": 3}[mode]
    _save(tmp_path / f"img{suffix}", mode=mode, colour=colour)
    images = load_images(tmp_path, 32)
    assert images.shape == (1, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1


def test_resize_and_centre_crop(tmp_path):
    # 96x64: left third black, middle third white, right third black -> centre crop is mostly white
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, 32:64] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = load_images(tmp_path, 32)[0]
    assert image.shape == (3, 32, 32)
    centre, edge = image[:, :, 14:18].mean().item(), image[:, :, 0].mean().item()
    assert centre > 0.9 and edge < -0.9  # crop kept the middle, cut the sides symmetrically


def test_exif_orientation_is_applied(tmp_path):
    # stored 64 wide x 32 tall with red on the left; EXIF 6 says "rotate 90° clockwise to view"
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image = load_images(tmp_path, 32, min_side=32)[0]
    # upright it is 32 wide x 64 tall with red on top; the centre crop's top rows are red
    assert image[0, :4].mean() > 0.8 and image[0, -4:].mean() < -0.8


def test_explicit_file_list_keeps_order(tmp_path):
    a = _save(tmp_path / "a.png", colour=(255, 255, 255))
    b = _save(tmp_path / "b.png", colour=(0, 0, 0))
    images = load_images([b, a], 32)
    assert images[0].mean() == -1 and images[1].mean() == 1


def test_each_bad_input_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageDataError, match=r"empty: no images in folder"):
        list_image_files(tmp_path / "empty")
    with pytest.raises(ImageDataError, match=r"nowhere: no such file or folder"):
        list_image_files(tmp_path / "nowhere")

    bad = tmp_path / "bad"
    bad.mkdir()
    _save(bad / "good.png")
    (bad / "notes.png").write_text("this is text, not a picture")
    with pytest.raises(ImageDataError, match=r"notes.png: not an image"):
        load_images(bad, 32)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = (_save(corrupt / "cut.png", size=(64, 64))).read_bytes()
    (corrupt / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDataError, match=r"cut.png: corrupt image"):
        load_images(corrupt, 32)

    small = tmp_path / "small"
    small.mkdir()
    _save(small / "tiny.png", size=(40, 20))
    with pytest.raises(ImageDataError, match=r"tiny.png: image is 40x20, smaller than the minimum side of 32 px"):
        load_images(small, 32)
    assert load_images(small, 32, min_side=16).shape == (1, 3, 32, 32)


def test_templates():
    assert templates_for("object")[0] == "a photo of a {}"
    assert templates_for("style")[0] == "a painting in the style of {}"
    assert templates_for(["{} on a table"]) == ["{} on a table"]
    assert with_image_token("a photo of a {}").format("<s>", "<i>") == "a photo of a <s> with <i>"
