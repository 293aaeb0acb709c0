"""Natural-image loaders on fixtures written here in each format, plus the real data when present."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from medflowad.data import DataError, load_image_set, random_hflip, random_translate
from tests.conftest import data_root


def _rgb(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_cifar10(folder, train, test):
    folder.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
        batch = {b"data": train[chunk].transpose(0, 3, 1, 2).reshape(len(chunk), -1),
                 b"labels": [int(j % 10) for j in chunk]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({
        b"data": test.transpose(0, 3, 1, 2).reshape(len(test), -1), b"labels": [3] * len(test)}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


def test_cifar10_batches(tmp_path):
    train, test = _rgb(20, 1), _rgb(4, 2)
    _write_cifar10(tmp_path / "cifar-10-batches-py", train, test)
    data = load_image_set(f"{tmp_path / 'cifar-10-batches-py'}::train")
    assert data.images.shape == (20, 3, 32, 32)
    # Pixel (row 5, col 7) of image 3, all channels, exactly as written.
    assert data.images[3, :, 5, 7].tolist() == train[3, 5, 7].tolist()
    assert data.labels.tolist() == [i % 10 for i in range(20)]
    assert data.class_names[:2] == ["c0", "c1"]
    assert load_image_set(f"{tmp_path / 'cifar-10-batches-py'}::test").labels.tolist() == [3] * 4


def test_cifar100_batches(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = _rgb(6, 3)
    (folder / "train").write_bytes(pickle.dumps({
        b"data": imgs.transpose(0, 3, 1, 2).reshape(6, -1), b"fine_labels": [5, 6, 7, 8, 9, 99]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"] * 100}))
    data = load_image_set(f"{folder}::train")
    assert data.labels.tolist() == [5, 6, 7, 8, 9, 99]
    assert torch.equal(data.images, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DataError, match=r"refusing to load posix\.system|refusing to load"):
        load_image_set(f"{folder}::test")


def test_svhn_mat(tmp_path):
    imgs = _rgb(5, 4)
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": imgs.transpose(1, 2, 3, 0), "y": np.array([[10], [1], [2], [3], [10]])})
    data = load_image_set(str(path))
    assert torch.equal(data.images, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()))
    assert data.labels.tolist() == [0, 1, 2, 3, 0]


def test_image_folder_on_disk_and_in_zip_agree(tmp_path):
    imgs = _rgb(6, 5, size=16)
    root = tmp_path / "folder"
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, img in enumerate(imgs):
            cls = "cat" if i < 3 else "dog"
            rel = f"train/{cls}/{i:03d}.png"
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / rel)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            zf.writestr(rel, buf.getvalue())
    on_disk = load_image_set(f"{root}::train")
    in_zip = load_image_set(f"{archive}::train")
    assert on_disk.class_names == in_zip.class_names == ["cat", "dog"]
    assert on_disk.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(on_disk.images, in_zip.images)
    assert torch.equal(on_disk.images, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()))  # PNG is lossless
    with pytest.raises(DataError, match="no images under 'val/'"):
        load_image_set(f"{archive}::val")


def test_jpeg_grey_mixed_and_resizing(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(_rgb(1, 6, size=20)[0]).save(root / "a" / "x.jpg", quality=90)
    Image.fromarray(np.full((24, 24), 77, np.uint8)).save(root / "a" / "y.png")
    with pytest.raises(DataError, match="pass an image size"):
        load_image_set(str(root))
    data = load_image_set(str(root), channels=1, size=(8, 8))
    assert data.images.shape == (2, 1, 8, 8)
    assert (data.images[1] == 77).all()  # uniform grey stays exactly grey through both conversions


def test_undecodable_images_are_skipped_by_name(tmp_path, caplog):
    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"none of its 1 image files .*broken\.png: not an image"):
        load_image_set(str(tmp_path / "imgs"))
    buffer = io.BytesIO()
    Image.fromarray(_rgb(1, 7)[0]).save(buffer, format="PNG")
    (root / "good.png").write_bytes(buffer.getvalue())
    (root / "truncated.png").write_bytes(buffer.getvalue()[:200])
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for name in ("broken.png", "good.png", "truncated.png"):
            archive.writestr(f"test/a/{name}", (root / name).read_bytes())
    for spec in (str(tmp_path / "imgs"), f"{tmp_path / 'imgs.zip'}::test"):
        caplog.clear()
        data = load_image_set(spec)
        assert data.images.shape == (1, 3, 32, 32)
        assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), _rgb(1, 7)[0])
        assert [reason.split(": ")[0].rsplit("/", 1)[1] for reason in data.skipped] == ["broken.png", "truncated.png"]
        assert "skipped 2 image file(s)" in caplog.text and "truncated.png" in caplog.text
        assert data.random_subset(1, 0).skipped == data.skipped


def test_npz_layouts_and_errors(tmp_path):
    imgs = _rgb(3, 7, size=8)
    np.savez(tmp_path / "nhwc.npz", x=imgs, y=np.array([1, 2, 3]))
    np.savez(tmp_path / "nchw.npz", images=imgs.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "float.npz", images=imgs.astype(np.float32))
    a = load_image_set(str(tmp_path / "nhwc.npz"))
    b = load_image_set(str(tmp_path / "nchw.npz"))
    assert torch.equal(a.images, b.images)
    assert a.labels.tolist() == [1, 2, 3] and b.labels.tolist() == [-1, -1, -1]
    with pytest.raises(DataError, match="must be uint8"):
        load_image_set(str(tmp_path / "float.npz"))
    with pytest.raises(DataError, match="no such file"):
        load_image_set(str(tmp_path / "missing.npz"))


def test_rgb_to_grey_uses_itu_601_luma():
    from medflowad.data.natural import ImageSet, convert

    img = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1)
    grey = convert(ImageSet(img, torch.tensor([-1])), channels=1, size=None)
    assert grey.images.item() == round((200 * 299 + 100 * 587 + 50 * 114) / 1000)


def test_environment_variables_in_specs(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", images=_rgb(2, 8, size=8))
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    assert len(load_image_set("$MY_DATA/a.npz")) == 2
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(DataError, match="environment variable not set"):
        load_image_set("$MY_DATA/a.npz")


def test_translate_and_flip_are_reproducible_and_shift_content():
    img = torch.zeros(1, 1, 10, 10, dtype=torch.uint8)
    img[0, 0, 5, 5] = 255
    batch = img.expand(64, -1, -1, -1).clone()
    shifted = random_translate(batch, 0.2, torch.Generator().manual_seed(0))
    again = random_translate(batch, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    positions = {tuple((s[0] == 255).nonzero()[0].tolist()) for s in shifted}
    assert len(positions) > 5
    assert all(abs(r - 5) <= 2 and abs(c - 5) <= 2 for r, c in positions)
    flipped = random_hflip(batch, torch.Generator().manual_seed(1))
    cols = {int((f[0] == 255).nonzero()[0, 1]) for f in flipped}
    assert cols == {5, 4}


@pytest.mark.skipif(data_root() is None, reason="real data not found: set MEDFLOWAD_DATA")
def test_real_flowers_zip():
    root = data_root()
    data = load_image_set(f"{root}/natural/flowers32.zip::all")
    assert data.images.shape == (3000, 3, 32, 32)
    assert data.class_names == ["orchid", "poppy", "rose", "sunflower", "tulip"]
    assert np.bincount(data.labels.numpy()).tolist() == [600] * 5
