import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mmfm.cli import main
from mmfm.data.images import center_crop_arr, list_images


def test_export_digits_reads_back_through_the_image_folder_code(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["export-digits", "--out", str(out)]) == 0
    items, classes = list_images(out)
    digits = load_digits()
    assert classes == [str(d) for d in range(10)] and len(items) == 1797
    assert np.bincount([i.label for i in items]).tolist() == np.bincount(digits.target).tolist()
    first = items[0]
    index = int(first.path.stem)
    arr = center_crop_arr(Image.open(first.path), 8)  # 8 px already: the crop is the identity
    assert np.array_equal(arr[..., 0], np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    assert first.label == digits.target[index]
    assert main(["export-digits", "--out", str(out)]) == 2  # never over an existing folder
    assert "not empty" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_export_digits_refuses_a_non_empty_folder(tmp_path):
    from mmfm.data.digits import export_digits

    (tmp_path / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_digits(tmp_path)
