"""The non-image tasks through the command line and the benchmark runner (issue 21 item 6).

Tiny data written into tmp_path in the loaders' own file formats (a ModelNet10 npz of 4 easy
shapes, 32 points each; a Multi30k folder of synthetic sentences), FIPURIFY_DATA and
FIPURIFY_CACHE pointed there: train (1 epoch), evaluate, purify; the refusal of an image-only
defense before any data is read; every task spec parses and expands; one tiny point-cloud cell
of the bench stages end to end.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fipurify.cli import main
from fipurify.errors import DataError
from fipurify.io import read_metadata

SPECS = ["task-pointcloud", "task-translation", "task-multilabel", "task-video"]
ROOT = Path(__file__).resolve().parents[1]


def write_modelnet_npz(folder: Path, n: int = 160, points: int = 32, seed: int = 0) -> Path:
    """``modelnet10-1024.npz`` in the shared file's layout: 4 shapes (sphere, box, rod, disk), 3/4 train."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    clouds = np.empty((n, points, 3), np.float32)
    for i, c in enumerate(labels):
        u = rng.normal(size=(points, 3))
        if c == 0:
            p = u / np.linalg.norm(u, axis=1, keepdims=True)
        elif c == 1:
            p = rng.uniform(-1, 1, (points, 3))
        elif c == 2:
            p = np.c_[0.1 * u[:, :2], rng.uniform(-1, 1, points)]
        else:
            r, t = np.sqrt(rng.random(points)), rng.uniform(0, 2 * np.pi, points)
            p = np.c_[r * np.cos(t), r * np.sin(t), 0.02 * u[:, 2]]
        clouds[i] = 3.0 * p + 1.0
    path = folder / "modelnet10-1024.npz"
    np.savez(path, points=clouds, labels=labels.astype(np.int64), train=np.arange(n) < 3 * n // 4,
             names=np.array([f"shape_{i:04d}" for i in range(n)]),
             classes=np.array(["sphere", "box", "rod", "disk"]))
    return path


def write_multi30k(folder: Path, sizes=(("train", 120), ("val", 10), ("test_2016_flickr", 20))) -> None:
    """A Multi30k folder (gzipped parallel lines) of synthetic English -> German sentences."""
    subj = [("A man", "Ein Mann"), ("A woman", "Eine Frau"), ("Two dogs", "Zwei Hunde"), ("A child", "Ein Kind")]
    verb = [("is running", "rennt"), ("is sitting", "sitzt"), ("is playing", "spielt"), ("is eating", "isst")]
    place = [("in the park.", "im Park."), ("on the street.", "auf der Straße."), ("near a lake.", "an einem See.")]
    rng = np.random.default_rng(0)
    (folder / "multi30k").mkdir(parents=True)
    for stem, n in sizes:
        en, de = [], []
        for _ in range(n):
            (se, sd), (ve, vd), (pe, pd) = (x[rng.integers(len(x))] for x in (subj, verb, place))
            en.append(f"{se} {ve} {pe}")
            de.append(f"{sd} {vd} {pd}")
        for lang, lines in (("en", en), ("de", de)):
            with gzip.open(folder / "multi30k" / f"{stem}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")


@pytest.fixture()
def data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("FIPURIFY_DATA", str(root))
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    return root


PC_TRAIN = ["train", "--dataset", "modelnet10", "--dataset-opt", "num_points=32", "--arch", "pointnet",
            "--width", "8", "--attack", "pointba-i", "--poison-rate", "0.2", "--attack-opt", "n_points=8",
            "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--reserve", "30", "--quiet"]


def test_pointcloud_train_evaluate_purify(data, tmp_path, capsys):
    write_modelnet_npz(data)
    model = tmp_path / "pc.safetensors"
    assert main(PC_TRAIN + ["--out", str(model)]) == 0
    meta = read_metadata(model)["metadata"]
    ds = meta["dataset"]
    assert ds["task"] == "pointcloud-classification" and ds["point_shape"] == [32, 3] and "image_shape" not in ds
    assert ds["load_kwargs"] == {"num_points": 32} and ds["num_classes"] == 4 and ds["n_train"] == 90
    assert meta["attack"]["name"] == "pointba-i" and meta["clean_reserve"]["size"] == 30
    assert set(meta["metrics"]) == {"acc", "asr", "lcr"}
    assert read_metadata(model)["arch_kwargs"]["input_size"] == 32
    capsys.readouterr()

    assert main(["evaluate", str(model), "--json", str(tmp_path / "e.json")]) == 0
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["acc"] == pytest.approx(meta["metrics"]["acc"]) and row["asr"] == pytest.approx(meta["metrics"]["asr"])
    assert row["n_clean"] == 40 and row["n_backdoor"] == 30  # the 10 target-class test shapes left out

    out = tmp_path / "pc-ft.safetensors"
    assert main(["purify", str(model), "--method", "ft", "--clean-size", "20", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["clean_size"] == 20 and set(report["after"]) >= {"acc", "asr", "lcr"}
    assert "on 20 clean items" in capsys.readouterr().err  # not "images"
    assert read_metadata(out)["metadata"]["dataset"]["task"] == "pointcloud-classification"


def test_image_only_defense_is_refused_before_any_data_is_read(data, tmp_path, capsys, monkeypatch):
    write_modelnet_npz(data)
    model = tmp_path / "pc.safetensors"
    assert main(PC_TRAIN + ["--out", str(model)]) == 0
    capsys.readouterr()

    def no_data(*a, **k):
        raise AssertionError("data were read before the refusal")
    import fipurify.workflow as workflow
    monkeypatch.setattr(workflow, "reload_test_only", no_data)
    monkeypatch.setattr(workflow, "reload_data", no_data)
    out = tmp_path / "awm.safetensors"
    assert main(["purify", str(model), "--method", "awm", "--clean-size", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fipurify: error: awm cannot purify a pointcloud-classification model")
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert main(["purify", str(model), "--method", "ft", "--clean-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clean-dir takes folders of images" in err[0] and not out.exists()


def test_translation_model_carries_its_tokenizer(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tokenizers")
    import shutil

    from fipurify.workflow import side_options

    write_multi30k(data)
    model = tmp_path / "mt.safetensors"
    assert main(["train", "--dataset", "multi30k", "--dataset-opt", "vocab_size=300", "--dataset-opt", "max_len=24",
                 "--arch", "transformer-mt", "--arch-opt", "d_model=16", "--arch-opt", "heads=2",
                 "--arch-opt", "layers=1", "--arch-opt", "ff=32", "--arch-opt", "max_positions=32",
                 "--attack", "trigger-words", "--epochs", "1", "--batch-size", "20", "--lr", "0.05",
                 "--reserve", "20", "--quiet", "--out", str(model)]) == 0
    meta = read_metadata(model)["metadata"]
    ds = meta["dataset"]
    assert ds["task"] == "translation" and ds["num_classes"] is None
    assert ds["tokenizer"]["format"] == "hf-tokenizers-json" and json.loads(ds["tokenizer"]["json"])
    assert read_metadata(model)["arch_kwargs"]["vocab_size"] == ds["vocab_size"]
    assert set(meta["metrics"]) >= {"acc", "asr", "CT", "AT", "ASR"} and meta["metrics"]["metric"] == "BLEU"
    # the cached tokenizer is gone and none may be trained: the model file alone rebuilds the ids
    # (purify also checks the clean reserve's digest)
    shutil.rmtree(tmp_path / "cache" / "text")

    def no_training(*a, **k):
        raise AssertionError("a tokenizer was trained again instead of the stored one used")
    import fipurify.datasets.multi30k as multi30k
    monkeypatch.setattr(multi30k, "multi30k_tokenizer", no_training)
    capsys.readouterr()
    assert main(["evaluate", str(model), "--json", str(tmp_path / "e.json")]) == 0
    row = json.loads((tmp_path / "e.json").read_text())
    assert {k: row[k] for k in ("CT", "AT", "ASR")} == pytest.approx({k: meta["metrics"][k] for k in ("CT", "AT", "ASR")})
    assert "| CT | AT | ASR |" in capsys.readouterr().out
    out = tmp_path / "mt-ft.safetensors"
    assert main(["purify", str(model), "--method", "ft", "--clean-size", "10", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    after = json.loads(out.with_suffix(".json").read_text())["after"]
    assert after["metric"] == "BLEU" and 0 <= after["CT"] <= 1 and 0 <= after["ASR"] <= 1
    assert read_metadata(out)["metadata"]["dataset"]["tokenizer"] == ds["tokenizer"]  # travels on
    edited = {**ds, "tokenizer": {**ds["tokenizer"], "json": ds["tokenizer"]["json"].replace("<unk>", "<unx>")}}
    with pytest.raises(DataError, match="SHA-256"):
        side_options(edited)


@pytest.mark.parametrize("name", SPECS)
def test_task_spec_parses_expands_and_builds(name, tmp_path, capsys):
    from fipurify.bench import stages
    from fipurify.bench.spec import load_spec, unknown_names

    spec = load_spec(ROOT / "benchmarks" / "specs" / f"{name}.toml")
    runs = spec.runs()
    assert runs and unknown_names(spec) == {"attacks": [], "defenses": []}
    assert {"none", "ft", "fip", "ffip"} <= {r.defense for r in runs}
    stages.check_entries(spec)  # every attack and defense builds with its options
    assert main(["bench", str(spec.source), "--dry-run", "--db", str(tmp_path / "r.sqlite"),
                 "--cache", str(tmp_path / "models")]) == 0
    assert f"{len(runs)} runs" in capsys.readouterr().out


def test_pointcloud_spec_cell_end_to_end(data, tmp_path):
    """One tiny cell of task-pointcloud through the bench stages (train, cached, ft purification)."""
    from fipurify.bench import stages
    from fipurify.bench.spec import parse_spec, read_spec_dict

    write_modelnet_npz(data)
    doc = read_spec_dict(ROOT / "benchmarks" / "specs" / "task-pointcloud.toml")
    doc.update(name="tiny-pc", only=["pointba-i/ft/*"])
    doc["data"].update(reserve=30, options={"num_points": 32})
    doc["model"]["width"] = 8
    doc["training"].update(epochs=1, eval_every=1)
    doc["grid"]["clean_sizes"] = [20]
    (run,) = parse_spec(doc).runs()
    path, meta, trained = stages.train(run.model_config(), run.model_key, tmp_path / "models", log=lambda m: None)
    assert trained and meta["dataset"]["task"] == "pointcloud-classification"
    assert stages.train(run.model_config(), run.model_key, tmp_path / "models")[2] is False  # cached
    row = stages.purify(run.config, path)
    assert 0 <= row["acc"] <= 1 and 0 <= row["asr"] <= 1 and row["der"] is not None
    assert row["details"]["n_clean"] == 20 and 0 <= row["val_acc"] <= 1


def test_image_network_on_point_clouds_stops_before_training(data, tmp_path, capsys):
    write_modelnet_npz(data)
    out = tmp_path / "bad.safetensors"
    argv = [a if a != "pointnet" else "preactresnet18" for a in PC_TRAIN]
    assert main(argv + ["--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fipurify: error: preactresnet18 does not take the items of") and "pointcloud" in last
    assert "parameters" not in last and not out.exists()


def test_evaluate_task_reports_map_and_clean_image_asr():
    import torch

    from fipurify import attacks, models
    from fipurify.datasets.base import ArrayDataset
    from fipurify.datasets.cifar10_mosaic import mosaic
    from fipurify.metrics import evaluate, evaluate_task

    rng = np.random.default_rng(0)
    base = ArrayDataset(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), np.arange(40) % 10)
    test = mosaic(base, 120, seed=1, split="test")
    bd = attacks.create("clean-image", target=0, trigger_classes=[3, 5]).backdoor_test_set(test)
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, width=2)
    res = evaluate_task(model, test, bd)
    assert res["metric"] == "mAP" and res["acc"] == res["mAP"] and 0 < res["mAP"] <= 1
    assert res["asr"] == pytest.approx(bd.attack_success_rate(model)) and res["lcr"] is None
    assert res["n_clean"] == 120 and res["n_backdoor"] == len(bd)
    # classifiers keep the format they always had
    images = ArrayDataset(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), np.arange(8) % 4)
    clf = models.create("preactresnet18", num_classes=4, width=2)
    assert evaluate_task(clf, images) == evaluate(clf, images)
