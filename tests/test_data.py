"""Contracts of noisyrepro.data, including loaders for datasets that are not on this machine.

CIFAR-10/100, Clothing1M and Dogs vs. Cats cannot be downloaded here, so their code paths run on small SYNTHETIC files
that these tests generate in a temporary folder (random pixels, named synthetic). They are never used as real data.
"""
import hashlib, os, pickle, tempfile
from pathlib import Path
import numpy as np
import pytest
import torch
import torchvision
from noisyrepro.data import (DATASETS, DatasetNotFound, LabeledData, load_dataset, split_train_val, subsample,
                             restore_gzip_header, stage_debian_fashion_mnist, DEBIAN_FASHION_MNIST, dataset_checksum)


def _md5(p): return hashlib.md5(Path(p).read_bytes()).hexdigest()


def make_synthetic_cifar(root: Path, cls, n_per_batch=6, n_classes=10, seed=0):
    """Write SYNTHETIC CIFAR-format pickles (random pixels) and return the md5 lists torchvision should expect."""
    rng = np.random.default_rng(seed)
    folder = root / cls.base_folder; folder.mkdir(parents=True)
    key = "labels" if cls is torchvision.datasets.CIFAR10 else "fine_labels"
    lists = {}
    for attr in ("train_list", "test_list"):
        lists[attr] = []
        for fname, _ in getattr(cls, attr):
            batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), key: rng.integers(0, n_classes, n_per_batch).tolist()}
            (folder / fname).write_bytes(pickle.dumps(batch))
            lists[attr].append([fname, _md5(folder / fname)])
    meta_key = cls.meta["key"]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta_key: [f"synthetic_class_{i}" for i in range(n_classes)]}))
    meta = dict(cls.meta, md5=_md5(folder / cls.meta["filename"]))
    return lists, meta


@pytest.mark.parametrize("name,cls,C", [("cifar10", torchvision.datasets.CIFAR10, 10), ("cifar100", torchvision.datasets.CIFAR100, 100)])
def test_cifar_loader_on_synthetic_files(tmp_path, monkeypatch, name, cls, C):
    lists, meta = make_synthetic_cifar(tmp_path, cls, n_classes=C)
    # the synthetic files have their own md5s: tell torchvision to expect those (its md5 check itself stays on)
    monkeypatch.setattr(cls, "train_list", lists["train_list"]); monkeypatch.setattr(cls, "test_list", lists["test_list"])
    monkeypatch.setattr(cls, "meta", meta)
    tr = load_dataset(name, "train", root=tmp_path, download=False)
    te = load_dataset(name, "test", root=tmp_path, download=False)
    assert tr.x.shape == (6 * len(lists["train_list"]), 3, 32, 32) and tr.x.dtype == torch.uint8
    assert te.x.shape == (6, 3, 32, 32) and tr.y.dtype == torch.int64 and tr.classes[0] == "synthetic_class_0"
    # NCHW conversion keeps pixels where torchvision's HWC array has them
    raw = pickle.loads((tmp_path / cls.base_folder / lists["train_list"][0][0]).read_bytes())["data"][0].reshape(3, 32, 32)
    assert np.array_equal(tr.x[0].numpy(), raw)
    # a corrupted file fails torchvision's md5 check, and the error says what is missing where
    (tmp_path / cls.base_folder / lists["train_list"][0][0]).write_bytes(b"corrupt")
    with pytest.raises(DatasetNotFound, match=name) as e: load_dataset(name, "train", root=tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and "md5" in str(e.value) and lists["train_list"][0][0] in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "mr", "clothing1m", "dogs_vs_cats"])
def test_missing_files_error_names_dataset_files_and_folder(tmp_path, monkeypatch, name):
    import noisyrepro.data as D
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(D.stage_debian_fashion_mnist, "__defaults__", (tmp_path / "no-debian",))
    with pytest.raises(DatasetNotFound) as e: load_dataset(name, root=tmp_path, download=False)
    msg = str(e.value)
    assert msg.startswith(name + ": missing") and str(tmp_path) in msg and e.value.files
    assert all(f in msg for f in e.value.files)


def test_bad_names_are_rejected_with_choices():
    with pytest.raises(ValueError, match="valid datasets: " + ", ".join(DATASETS)): load_dataset("svhn")
    with pytest.raises(ValueError, match="valid splits: train, val, test"): load_dataset("clothing1m", "dev")


def _write_jpg(path, rng, size=(40, 30)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_clothing1m_layout_on_synthetic_images(tmp_path):
    rng = np.random.default_rng(0); c = tmp_path / "clothing1m"
    paths = [f"images/{i % 3}/{i}/synthetic_{i}.jpg" for i in range(8)]
    for p in paths: _write_jpg(c / p, rng)
    (c / "noisy_label_kv.txt").write_text("".join(f"{p} {i % 14}\n" for i, p in enumerate(paths)))
    (c / "clean_label_kv.txt").write_text("".join(f"{p} {(i + 1) % 14}\n" for i, p in enumerate(paths)))
    (c / "noisy_train_key_list.txt").write_text("\n".join(paths[:5]) + "\n")
    (c / "clean_val_key_list.txt").write_text("\n".join(paths[5:7]) + "\n")
    (c / "clean_test_key_list.txt").write_text(paths[7] + "\n")
    tr, va, te = (load_dataset("clothing1m", s, root=tmp_path) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (5, 2, 1) and tr.num_classes == 14
    assert tr.y.tolist() == [0, 1, 2, 3, 4] and va.y.tolist() == [6, 7]   # noisy vs clean labels
    img = tr.x[0]; assert img.shape == (3, 256, 256) and img.dtype == torch.uint8
    assert tr.subset([1, 2]).x.to_tensor().shape == (2, 3, 256, 256)
    with pytest.raises(ValueError, match="materialise"): tr.to("cpu")


def test_dogs_vs_cats_split_on_synthetic_images(tmp_path):
    rng = np.random.default_rng(1); f = tmp_path / "dogs_vs_cats" / "train"
    for c in ("cat", "dog"):
        for k in (0, 1, 9999, 10000, 12499): _write_jpg(f / f"{c}.{k}.jpg", rng)
    tr, te = load_dataset("dogs_vs_cats", "train", root=tmp_path), load_dataset("dogs_vs_cats", "test", root=tmp_path)
    assert (len(tr), len(te)) == (6, 4) and sorted(tr.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert tr.x.to_tensor().shape == (6, 3, 150, 150)


def test_split_and_subsample_are_seeded_and_disjoint():
    d = load_dataset("mnist5k")
    tr, va = split_train_val(d, 0.2, seed=42)
    assert (len(tr), len(va)) == (3200, 800)
    assert not set(tr.index.tolist()) & set(va.index.tolist())
    s1, s2 = subsample(tr, 1000, seed=42), subsample(tr, 1000, seed=42)
    assert torch.equal(s1.index, s2.index) and not torch.equal(s1.index, subsample(tr, 1000, seed=43).index)
    assert torch.equal(d.x[s1.index], s1.x)                                   # index points into the original split


def test_mnist5k_offline_default():
    tr, te = load_dataset("mnist5k"), load_dataset("mnist5k", "test")
    assert tr.x.shape == (4000, 1, 28, 28) and te.x.shape == (1000, 1, 28, 28)
    assert torch.bincount(tr.y).tolist() == [400] * 10 and tr.x.max() == 255
    assert dataset_checksum(tr) == dataset_checksum(load_dataset("mnist5k"))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_restores_torchvision_md5(tmp_path):
    assert stage_debian_fashion_mnist(tmp_path)
    for f, md5 in torchvision.datasets.FashionMNIST.resources:
        assert _md5(tmp_path / "FashionMNIST" / "raw" / f) == md5
    fm = load_dataset("fashion_mnist", "test", root=tmp_path, download=False)
    assert fm.x.shape == (10000, 1, 28, 28) and fm.classes[8] == "Bag"


def test_mr_reads_latin1_and_splits_on_newline_only(tmp_path):
    (tmp_path / "MR").mkdir()
    (tmp_path / "MR" / "rt-polarity.pos").write_bytes(b"a fine film \x85 really\ngood , good\n")
    (tmp_path / "MR" / "rt-polarity.neg").write_bytes(b"bad film\n")
    tr = load_dataset("mr", "train", root=tmp_path); te = load_dataset("mr", "test", root=tmp_path)
    assert len(tr) + len(te) == 3                                            # 0x85 did not split a line
    assert tr.x.shape[1] >= 5 and tr.vocab[:2] == ["<pad>", "<unk>"]
