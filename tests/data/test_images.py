import numpy as np
import pytest
from PIL import Image

from mmfm.data.images import EXTENSIONS, NOT_DECODED, center_crop_arr, list_images, shard_range, supported, to_rgb


def adm_reference(pil_image, image_size):
    """guided-diffusion's center_crop_arr, transcribed (the image is RGB already)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w, h, s", [(500, 375, 256), (375, 500, 224), (257, 999, 256), (101, 77, 64),
                                     (2049, 1601, 256), (512, 512, 256), (64, 64, 256), (1, 3, 8)])
def test_center_crop_matches_adm(w, h, s):
    img = rgb(w, h, seed=w * h)
    got = center_crop_arr(img, s)
    assert got.shape == (s, s, 3) and got.dtype == np.uint8
    assert np.array_equal(got, adm_reference(img, s))


def test_large_image_is_box_halved_first():
    img = rgb(1100, 1030)  # short side 1030 >= 2 S three times over: three BOX halvings, then bicubic
    halved = img.resize((550, 515), Image.BOX).resize((275, 257), Image.BOX).resize((137, 128), Image.BOX)
    direct = np.asarray(halved.resize((137, 128), Image.BICUBIC))
    top, left = (direct.shape[0] - 128) // 2, (direct.shape[1] - 128) // 2
    assert np.array_equal(center_crop_arr(img, 128), direct[top:top + 128, left:left + 128])


def test_modes_become_8bit_rgb():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    assert to_rgb(gray).mode == "RGB" and np.array_equal(np.asarray(to_rgb(gray))[..., 1], np.asarray(gray))
    rgba = Image.fromarray(np.full((8, 8, 4), 200, np.uint8), mode="RGBA")
    assert np.array_equal(np.asarray(to_rgb(rgba)), np.full((8, 8, 3), 200))
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    assert np.array_equal(np.asarray(to_rgb(cmyk)), np.full((8, 8, 3), 255))
    deep = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # 16-bit: PIL's convert would clip to 255
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, 0, 0] == 128
    assert center_crop_arr(deep, 4).shape == (4, 4, 3)


def test_class_folder_order_and_errors(tmp_path):
    for cls, names in {"b_dog": ["2.png", "10.png"], "a_cat": ["x.jpg"], ".hidden": ["h.png"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            rgb(4, 4).save(tmp_path / cls / n)
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    (tmp_path / "a_cat" / ".DS_Store").write_text("hidden")
    items, classes = list_images(tmp_path)
    assert classes == ["a_cat", "b_dog"]
    # an unsupported file is listed in its place (encode counts it as bad), a hidden one is not
    assert [(i.index, i.label, i.path.name) for i in items] == [(0, 0, "notes.txt"), (1, 0, "x.jpg"),
                                                                (2, 1, "10.png"), (3, 1, "2.png")]
    (tmp_path / "c_empty").mkdir()
    (tmp_path / "c_empty" / "readme.xyz").write_text("no image here")
    with pytest.raises(ValueError, match="c_empty: class folder holds no images .1 other file"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("n, k", [(0, 3), (10, 3), (1797, 8), (5, 7)])
def test_shards_partition_the_rows(n, k):
    ranges = [shard_range(n, i, k) for i in range(k)]
    assert [r for rg in ranges for r in rg] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="shard"):
        shard_range(n, k, k)


def test_extensions_are_what_pillow_decodes():
    registered = Image.registered_extensions()
    for ext in (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".ppm"):
        assert ext in EXTENSIONS
    assert all(registered[e] in Image.OPEN and registered[e] not in NOT_DECODED for e in EXTENSIONS)
    assert ".pdf" not in EXTENSIONS and ".eps" not in EXTENSIONS and ".h5" not in EXTENSIONS  # save-only, stubs
    assert list(EXTENSIONS) == sorted(EXTENSIONS) and all(e == e.lower() for e in EXTENSIONS)
    assert supported("a/B.GIF") and supported("x.TiFf") and not supported("x.xyz") and not supported("README")


def test_animations_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    for suffix in (".gif", ".webp", ".tiff", ".png"):
        path = tmp_path / f"anim{suffix}"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        with Image.open(path) as img:
            assert getattr(img, "n_frames", 1) == 2, suffix
            img.load()
            got = center_crop_arr(img, 4)
        assert got.shape == (4, 4, 3) and got[..., 0].min() > 200 and got[..., 2].max() < 50, suffix
