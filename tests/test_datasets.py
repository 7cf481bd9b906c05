"""Dataset loaders: tiny fixtures built in tmp_path (no real data, no network)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fipurify.datasets as D
from fipurify.datasets import cache as cache_mod
from fipurify.datasets import cifar10, gtsrb, imagefolder, roots
from fipurify.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Every test gets its own cache and no inherited data root."""
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FIPURIFY_DATA", raising=False)


# --------------------------------------------------------------------------- helpers
def _batch(n: int, seed: int, protocol: int) -> bytes:
    """A pickled batch shaped like the official release (bytes keys, uint8 N x 3072)."""
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"fake batch", b"labels": [int(x) for x in rng.integers(0, 10, n)],
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(d, protocol=protocol)


def _meta(protocol: int = 2) -> bytes:
    return pickle.dumps({b"label_names": [c.encode() for c in cifar10.CIFAR10_CLASSES],
                         b"num_cases_per_batch": 4, b"num_vis": 3072}, protocol=protocol)


def make_batches_dir(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):  # mix protocol 2 (as Python 2 wrote them) and the default
        (folder / f"data_batch_{i}").write_bytes(_batch(4, i, 2 if i % 2 else pickle.DEFAULT_PROTOCOL))
    (folder / "test_batch").write_bytes(_batch(3, 99, 2))
    (folder / "batches.meta").write_bytes(_meta())
    return folder


def make_tar(path: Path, src: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        tf.add(src, arcname=arcname)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_img(path: Path, color, size=(32, 32), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


class _Hostile:
    """Pickles into a call of os.system: unpickling it must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- CIFAR-10 official
def test_official_folder_layout_and_pixel_order(tmp_path):
    make_batches_dir(tmp_path)
    ds = cifar10.load_cifar10(tmp_path, "train")
    assert len(ds) == 20 and ds.image_shape == (3, 32, 32) and ds.name == "cifar10-train"
    assert ds.classes == list(cifar10.CIFAR10_CLASSES)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    data = raw[b"data"]
    # Official rows are channel-planar: pixel (y, x, c) is data[c*1024 + y*32 + x].
    for y, x, c in [(0, 0, 0), (5, 7, 1), (31, 30, 2)]:
        assert ds.images[0, y, x, c] == data[0, c * 1024 + y * 32 + x]
    assert list(ds.labels[:4]) == raw[b"labels"]
    test = D.load("cifar10", root=tmp_path, split="test")
    assert len(test) == 3 and test.name == "cifar10-test"


def test_official_archive_checks_md5_before_reading(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_batches_dir(src)
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar(root / "cifar-10-python.tar.gz", src / "cifar-10-batches-py", "cifar-10-batches-py")
    with pytest.raises(DataError, match="md5 mismatch"):
        cifar10.load_cifar10(root, "train")
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5(archive))
    from_archive = cifar10.load_cifar10(root, "train")
    from_folder = cifar10.load_cifar10(src, "train", cache=False)
    np.testing.assert_array_equal(from_archive.images, from_folder.images)
    np.testing.assert_array_equal(from_archive.labels, from_folder.labels)


def test_corrupt_archive_is_a_clear_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_batches_dir(src)
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar(tmp_path / "full.tar.gz", src / "cifar-10-batches-py", "cifar-10-batches-py")
    broken = root / "cifar-10-python.tar.gz"
    broken.write_bytes(archive.read_bytes()[:600])
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5(broken))  # checksum passes; content is cut
    with pytest.raises(DataError, match="corrupt|missing"):
        cifar10.load_cifar10(root, "train")


def test_hostile_pickle_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    folder = make_batches_dir(tmp_path / "root")
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(DataError, match="refused"):
        cifar10.load_cifar10(tmp_path / "root", "train")
    assert not marker.exists()
    # Inside a checksum-valid archive it is refused just the same.
    root2 = tmp_path / "root2"
    root2.mkdir()
    archive = make_tar(root2 / "cifar-10-python.tar.gz", folder, "cifar-10-batches-py")
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", md5(archive))
    with pytest.raises(DataError, match="refused"):
        cifar10.load_cifar10(root2, "train")
    assert not marker.exists()
    # Any other global, e.g. builtins.eval, is refused too.
    evil = pickle.dumps(eval)
    with pytest.raises(DataError, match="refused global builtins.eval"):
        cifar10.safe_unpickle(evil, "x")


def test_missing_batch_is_named(tmp_path):
    folder = make_batches_dir(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        cifar10.load_cifar10(tmp_path, "train")


# --------------------------------------------------------------------------- CIFAR-10 JPEG copy
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
          (0, 255, 255), (128, 128, 128), (255, 255, 255), (0, 0, 0), (255, 128, 0)]


def make_jpeg_tree(base: Path, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for ci, cls in enumerate(cifar10.CIFAR10_CLASSES):
            for k in range(per_class if split == "train" else 1):
                save_img(base / split / cls / f"{k:04d}.jpg", COLORS[ci])
    return base


def test_jpeg_archive_extracts_once_and_caches(tmp_path, monkeypatch):
    tree = make_jpeg_tree(tmp_path / "tree")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree / "train", arcname="train")
        tf.add(tree / "test", arcname="test")
    with pytest.raises(DataError, match="sha256 mismatch"):
        D.load("cifar10", root=root)
    monkeypatch.setattr(cifar10, "CIFAR10_JPEG_SHA256", sha256(archive))
    ds = D.load("cifar10", root=root, split="train")
    assert len(ds) == 20 and ds.name == "cifar10-jpeg-train" and ds.image_shape == (3, 32, 32)
    assert ds.classes == list(cifar10.CIFAR10_CLASSES)
    for i in range(len(ds)):  # each image's colour belongs to its label (JPEG is lossy)
        mean = ds.images[i].reshape(-1, 3).mean(0)
        assert np.abs(mean - COLORS[ds.labels[i]]).max() < 12
    assert len(list((tmp_path / "cache" / "extracted").glob("cifar10-jpeg-*/.complete"))) == 1
    # Second load: neither unpacking nor decoding happens.
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("cache missed"))  # noqa: E731
    monkeypatch.setattr(cifar10, "_read_jpeg_folder", boom)
    monkeypatch.setattr(cifar10, "extract_once", boom)
    again = D.load("cifar10", root=root, split="train")
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_jpeg_folder_and_missing_class(tmp_path):
    make_jpeg_tree(tmp_path / "CIFAR-10-images", per_class=1)
    ds = D.load("cifar10", root=tmp_path, split="test")
    assert len(ds) == 10 and sorted(ds.labels.tolist()) == list(range(10))
    for p in (tmp_path / "CIFAR-10-images" / "train" / "frog").iterdir():
        p.unlink()
    (tmp_path / "CIFAR-10-images" / "train" / "frog").rmdir()
    with pytest.raises(DataError, match="frog"):
        D.load("cifar10", root=tmp_path, split="train")


def test_cifar_not_found_names_what_and_where(tmp_path):
    with pytest.raises(DataError) as err:
        D.load("cifar10", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "cifar10-jpeg.tar.gz" in msg
    with pytest.raises(ConfigError):
        D.load("cifar10", root=tmp_path, split="val")


# --------------------------------------------------------------------------- safe extraction
def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_tar_members_are_refused(tmp_path, kind):
    ok = tarfile.TarInfo("good/a.txt")
    if kind == "dotdot":
        bad, data = tarfile.TarInfo("good/../../evil.txt"), b"x"
    elif kind == "absolute":
        bad, data = tarfile.TarInfo(str(tmp_path / "evil.txt")), b"x"
    elif kind == "symlink":
        bad, data = tarfile.TarInfo("good/link"), None
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
    else:
        bad, data = tarfile.TarInfo("good/hard"), None
        bad.type, bad.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    archive = _tar_with(tmp_path / "a.tar.gz", [(ok, b"fine"), (bad, data)])
    with pytest.raises(DataError, match="refusing"):
        cache_mod.extract_once(archive, "t")
    assert not (tmp_path / "evil.txt").exists()
    extracted = tmp_path / "cache" / "extracted"
    assert list(extracted.iterdir()) == []  # the half-done temp folder was removed


def test_safe_extract_unpacks_plain_files(tmp_path):
    archive = _tar_with(tmp_path / "a.tar.gz", [(tarfile.TarInfo("d/x.txt"), b"hello")])
    dest = cache_mod.extract_once(archive, "t")
    assert (dest / "d" / "x.txt").read_bytes() == b"hello"
    assert cache_mod.extract_once(archive, "t") == dest  # second call reuses it


# --------------------------------------------------------------------------- image folders
def make_folder(root: Path) -> Path:
    save_img(root / "train" / "dog" / "a.png", (200, 10, 10))
    save_img(root / "train" / "dog" / "b.bmp", (210, 20, 20), size=(16, 16))
    save_img(root / "train" / "cat" / "c.jpg", (10, 10, 200), size=(16, 16))
    save_img(root / "train" / "cat" / "d.png", 128, size=(16, 16), mode="L")      # grey
    save_img(root / "train" / "cat" / "e.png", (0, 255, 0, 90), size=(16, 16), mode="RGBA")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    return root


def test_imagefolder_alphabetical_rgb_and_resize(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DataError, match="pass an image size"):
        imagefolder.load_imagefolder(tmp_path, "train")  # a.png is 32x32, others 16x16
    ds = D.load("imagefolder", root=tmp_path, split="train", size=8)
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (5, 8, 8, 3)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images[1].min() == ds.images[1].max() == 128  # grey became RGB
    ordered = imagefolder.load_imagefolder(tmp_path, "train", classes=["dog", "cat"], size=8)
    assert ordered.classes == ["dog", "cat"] and ordered.labels.tolist() == [1, 1, 1, 0, 0]
    nosplit = D.load("imagefolder", path=tmp_path / "train", split=None, size=(4, 6))
    assert nosplit.images.shape == (5, 4, 6, 3)


def test_imagefolder_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        imagefolder.load_imagefolder(tmp_path, "train", size=8)
    (tmp_path / "train" / "cat" / "bad.png").unlink()
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DataError, match="bird holds no images"):
        imagefolder.load_imagefolder(tmp_path, "train", size=8)
    with pytest.raises(DataError, match="not found"):
        imagefolder.load_imagefolder(tmp_path, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        imagefolder.load_imagefolder(tmp_path / "empty", None)
    with pytest.raises(DataError, match="not among the classes"):
        imagefolder.load_imagefolder(tmp_path, "train", classes=["cat", "dog"], size=8)
    with pytest.raises(ConfigError):
        D.load("imagefolder")


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    first = imagefolder.load_imagefolder(tmp_path / "data", "train", size=8)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "read_image_folder", boom)
    again = imagefolder.load_imagefolder(tmp_path / "data", "train", size=8)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.classes == first.classes
    save_img(tmp_path / "data" / "train" / "dog" / "z.png", (1, 2, 3))  # source changed
    with pytest.raises(AssertionError, match="decoded again"):
        imagefolder.load_imagefolder(tmp_path / "data", "train", size=8)


def test_cache_disabled_writes_nothing_and_bad_cache_is_rebuilt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return np.zeros((2, 3, 3, 3), np.uint8), [0, 1], ["a", "b"]

    cache_mod.load_or_build("k", build, use_cache=False)
    assert not list((tmp_path / "cache").glob("*.npz"))
    cache_mod.load_or_build("k", build)
    cache_mod.cache_path("data", "k").write_bytes(b"garbage")  # e.g. a damaged disk
    imgs, labels, classes = cache_mod.load_or_build("k", build)
    assert len(calls) == 3 and imgs.shape == (2, 3, 3, 3) and classes == ["a", "b"]
    cache_mod.load_or_build("k", build)
    assert len(calls) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))


# --------------------------------------------------------------------------- GTSRB
def make_gtsrb(root: Path, size=(40, 30)) -> Path:
    g = root / "GTSRB"
    train = g / "Final_Training" / "Images"
    for cls, n in [(0, 2), (2, 1), (42, 1)]:
        for k in range(n):
            save_img(train / f"{cls:05d}" / f"00000_{k:05d}.ppm", (cls * 5, 100, 50), size=size)
        (train / f"{cls:05d}" / f"GT-{cls:05d}.csv").write_text("Filename;ClassId\n")
    test = g / "Final_Test" / "Images"
    for k, cls in enumerate([7, 42, 0]):
        save_img(test / f"{k:05d}.ppm", (cls * 5, 100, 50), size=size)
    (test / "GT-final_test.test.csv").write_text("Filename;Width;Height\n00000.ppm;40;30\n")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    rows += [f"{k:05d}.ppm;40;30;1;1;20;20;{cls}" for k, cls in enumerate([7, 42, 0])]
    (g / "Final_Test" / "GT-final_test.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return g


def test_gtsrb_folder_layout(tmp_path):
    make_gtsrb(tmp_path)
    train = D.load("gtsrb", root=tmp_path, split="train")
    assert train.num_classes == 43 and train.images.shape == (4, 32, 32, 3)  # resized
    assert train.labels.tolist() == [0, 0, 2, 42] and train.name == "gtsrb-train"
    test = D.load("gtsrb", root=tmp_path, split="test", size=None)
    assert test.images.shape == (3, 30, 40, 3) and test.labels.tolist() == [7, 42, 0]
    assert test.images[1, 0, 0, 0] == 42 * 5


def test_gtsrb_label_errors(tmp_path):
    g = make_gtsrb(tmp_path)
    save_img(g / "Final_Test" / "Images" / "00009.ppm", (0, 0, 0))
    with pytest.raises(DataError, match="00009.ppm"):
        gtsrb.load_gtsrb(tmp_path, "test")
    (g / "Final_Test" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GT-final_test.csv"):
        gtsrb.load_gtsrb(tmp_path, "test")
    with pytest.raises(DataError, match="gtsrb-32x32.tar.xz"):
        gtsrb.load_gtsrb(tmp_path / "GTSRB" / "Final_Test" / "Images", "train")


def test_gtsrb_archive(tmp_path, monkeypatch):
    make_gtsrb(tmp_path / "src", size=(32, 32))
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar(root / "gtsrb-32x32.tar.xz", tmp_path / "src" / "GTSRB", "GTSRB", mode="w:xz")
    with pytest.raises(DataError, match="sha256 mismatch"):
        gtsrb.load_gtsrb(root, "test")
    monkeypatch.setattr(gtsrb, "GTSRB_SHA256", sha256(archive))
    test = gtsrb.load_gtsrb(root, "test")
    ref = gtsrb.load_gtsrb(tmp_path / "src", "test", cache=False)
    np.testing.assert_array_equal(test.images, ref.images)
    assert test.labels.tolist() == [7, 42, 0]


# --------------------------------------------------------------------------- splits
def test_split_reserve_deterministic_disjoint_stratified():
    ds = D.synthetic(n=103, num_classes=4, image_size=4, seed=0)
    a_train, a_res, a_idx = D.split_reserve(ds, 20, seed=1)
    b_train, b_res, b_idx = D.split_reserve(ds, 20, seed=1)
    _, _, c_idx = D.split_reserve(ds, 20, seed=2)
    np.testing.assert_array_equal(a_idx, b_idx)
    assert D.indices_digest(a_idx) == D.indices_digest(b_idx) != D.indices_digest(c_idx)
    assert len(a_res) == 20 and len(a_train) == 83 and np.all(np.diff(a_idx) > 0)
    train_idx = np.setdiff1d(np.arange(103), a_idx)
    np.testing.assert_array_equal(a_train.images, ds.images[train_idx])
    np.testing.assert_array_equal(a_res.images, ds.images[a_idx])
    counts = np.bincount(a_res.labels, minlength=4)
    expected = np.bincount(ds.labels, minlength=4) * 20 / 103
    assert np.all(np.abs(counts - expected) < 1)
    _, frac_res, _ = D.split_reserve(ds, 0.2, seed=1)
    assert len(frac_res) == round(0.2 * 103)
    for bad in (0, 103, 1.5, 0.0):
        with pytest.raises((DataError, ConfigError)):
            D.split_reserve(ds, bad, seed=1)


def test_indices_digest_depends_only_on_values():
    d = D.indices_digest([1, 2, 3])
    assert d == D.indices_digest(np.array([1, 2, 3], dtype=np.int32))
    assert d == hashlib.sha256(np.array([1, 2, 3], "<i8").tobytes()).hexdigest()
    assert d != D.indices_digest([1, 2, 4])


def test_draw_clean_subset():
    ds = D.synthetic(n=40, num_classes=4, image_size=4, seed=0)
    s1 = D.draw_clean_subset(ds, 8, seed=3)
    s2 = D.draw_clean_subset(ds, 8, seed=3)
    np.testing.assert_array_equal(s1.images, s2.images)
    assert np.bincount(s1.labels, minlength=4).tolist() == [2, 2, 2, 2]
    assert len(D.draw_clean_subset(ds, 40, seed=0)) == 40
    for bad in (0, 41):
        with pytest.raises(DataError):
            D.draw_clean_subset(ds, bad, seed=0)


def test_reserve_sample_redraws_a_saved_models_reserve():
    """The probes' clean images: the saved model's reserve rebuilt from its metadata, then a
    class-balanced draw, capped at the reserve's size."""
    from fipurify.workflow import load_data, reserve_sample

    bundle = load_data("synthetic", None, 24, 0, None, n=120, num_classes=4, image_size=4)
    meta = {"dataset": bundle.dataset_info, "clean_reserve": bundle.reserve_info}
    drawn = reserve_sample(meta, 8, seed=3)
    np.testing.assert_array_equal(drawn.images, D.draw_clean_subset(bundle.reserve, 8, seed=3).images)
    assert np.bincount(drawn.labels, minlength=4).tolist() == [2, 2, 2, 2]
    whole = reserve_sample(meta, 1000, seed=0)
    assert len(whole) == len(bundle.reserve) == 24


# --------------------------------------------------------------------------- roots and API
def test_root_resolution_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("FIPURIFY_DATA", str(env))
    assert D.resolve_root(explicit) == explicit
    assert D.resolve_root() == env
    monkeypatch.setenv("FIPURIFY_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="FIPURIFY_DATA"):
        D.resolve_root()
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_root(tmp_path / "nope")
    monkeypatch.delenv("FIPURIFY_DATA")
    # ../shared/data beside the working directory, then beside the repository.
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj")
    assert D.resolve_root() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path / "elsewhere" / "deep")
    monkeypatch.setattr(roots, "_repo_root", lambda: tmp_path / "proj")
    assert D.resolve_root() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setattr(roots, "_repo_root", lambda: None)
    with pytest.raises(DataError, match="--data-root.*FIPURIFY_DATA"):
        D.resolve_root()


def test_env_root_feeds_load_and_cache_dir(tmp_path, monkeypatch):
    make_batches_dir(tmp_path / "data")
    monkeypatch.setenv("FIPURIFY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "c" / "d"))
    assert D.cache_dir() == tmp_path / "c" / "d" and (tmp_path / "c" / "d").is_dir()
    assert len(D.load("cifar10", split="test")) == 3


def test_load_api(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset .mnist.; known: cifar10, .*gtsrb, imagefolder, .*synthetic"):
        D.load("mnist")
    with pytest.raises(ConfigError, match="unknown option"):
        D.load("gtsrb", root=tmp_path, colour=True)
    with pytest.raises(DataError, match="GTSRB not found"):
        D.load("gtsrb", root=tmp_path)
    syn = D.load("synthetic", split="test", n=8, num_classes=2)
    assert syn.name == "synthetic-test" and len(syn) == 8
    assert D.dataset_info("cifar10").num_classes == 10 and D.dataset_info("CIFAR10")["image_size"] == 32
    assert (D.dataset_info("gtsrb").num_classes, D.dataset_info("gtsrb").image_size) == (43, 32)
    images = {"cifar10", "gtsrb", "imagefolder", "synthetic"}
    other_tasks = {"modelnet10", "modelnet-off", "modelnet-h5", "multi30k", "cifar10-mosaic", "cifar10-motion"}
    assert set(D.DATASETS) == images | other_tasks


def test_a_later_extraction_never_removes_a_finished_copy_in_use(tmp_path, monkeypatch):
    """Two workers unpack the same archive at once. The one that finishes second must
    keep the first one's folder (which a reader may already be using), not replace it."""
    archive = _tar_with(tmp_path / "a.tar.gz", [(tarfile.TarInfo("d/x.txt"), b"hello")])
    first = cache_mod.extract_once(archive, "t")
    in_use = (first / "d" / "x.txt").open("rb")  # a reader of the first copy
    inode = (first / "d" / "x.txt").stat().st_ino
    # The second worker checked for a finished copy before the first one had finished.
    real_is_file = Path.is_file
    calls = {"n": 0}

    def late_is_file(self):
        if self.name == ".complete" and calls["n"] == 0:
            calls["n"] += 1
            return False
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", late_is_file)
    second = cache_mod.extract_once(archive, "t")
    monkeypatch.undo()
    assert second == first
    assert (first / "d" / "x.txt").stat().st_ino == inode  # the same files, untouched
    assert in_use.read() == b"hello"
    in_use.close()
    leftovers = [p.name for p in (tmp_path / "cache" / "extracted").iterdir() if p != first]
    assert leftovers == []  # the second worker's temporary copy was removed


def test_a_stale_unfinished_folder_is_replaced(tmp_path):
    archive = _tar_with(tmp_path / "a.tar.gz", [(tarfile.TarInfo("d/x.txt"), b"hello")])
    dest = cache_mod.extract_once(archive, "t")
    (dest / ".complete").unlink()  # as if an old crash left it half-done
    (dest / "d" / "x.txt").write_bytes(b"trunc")
    again = cache_mod.extract_once(archive, "t")
    assert again == dest and (dest / "d" / "x.txt").read_bytes() == b"hello"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_a_copied_or_retouched_archive_is_not_unpacked_again(tmp_path):
    archive = _tar_with(tmp_path / "a.tar.gz", [(tarfile.TarInfo("d/x.txt"), b"hello")])
    dest = cache_mod.extract_once(archive, "t")
    marker = (dest / "d" / "x.txt").stat().st_ino
    copy = tmp_path / "elsewhere" / "a.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)  # new path, new mtime, same bytes
    os.utime(archive, (1, 1))
    assert cache_mod.extract_once(copy, "t") == dest
    assert cache_mod.extract_once(archive, "t") == dest
    assert (dest / "d" / "x.txt").stat().st_ino == marker
    other = _tar_with(tmp_path / "b.tar.gz", [(tarfile.TarInfo("d/x.txt"), b"other")])
    assert cache_mod.extract_once(other, "t") != dest  # different bytes, different folder


def test_no_data_folder_names_each_place_it_looked_once(tmp_path, monkeypatch):
    from fipurify.datasets.roots import resolve_root
    from fipurify.errors import DataError

    monkeypatch.delenv("FIPURIFY_DATA", raising=False)
    monkeypatch.setattr("fipurify.datasets.roots._repo_root", lambda: tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # the working directory is the repository: one place, said once
    with pytest.raises(DataError, match="looked in") as e:
        resolve_root()
    looked = str(e.value).split("looked in ")[1].split(")")[0]
    assert looked.count("shared") == 1
