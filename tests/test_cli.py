import json

import pytest

from fipurify.cli import main


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    """An image-folder CIFAR-like copy is too big for tests; use the synthetic dataset via the CLI."""
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_train_evaluate_round_trip_on_synthetic(data_root, capsys):
    out = data_root / "m.safetensors"
    rc = main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "2", "--lr", "0.05",
               "--batch-size", "32", "--poison-rate", "0.2", "--reserve", "0.1", "--quiet", "--no-flip",
               "--out", str(out), "--json", str(data_root / "m.json")])
    assert rc == 0 and out.exists()
    meta = json.loads((data_root / "m.json").read_text())
    assert meta["attack"]["name"] == "badnets" and meta["clean_reserve"]["size"] > 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", str(data_root / "e.json")]) == 0
    row = json.loads((data_root / "e.json").read_text())
    assert row["acc"] == pytest.approx(meta["metrics"]["acc"]) and row["asr"] == pytest.approx(meta["metrics"]["asr"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "nope", "--out", "x.safetensors"], "unknown dataset"),
    (["train", "--dataset", "synthetic", "--attack", "nope", "--out", "x.safetensors"], "unknown attack"),
    (["train", "--dataset", "synthetic", "--arch", "nope", "--out", "x.safetensors"], "nope"),
    (["train", "--dataset", "synthetic", "--target", "9", "--out", "x.safetensors"], "out of range"),
    (["train", "--dataset", "synthetic", "--poison-rate", "1.5", "--out", "x.safetensors"], "poison"),
    (["evaluate", "missing.safetensors"], "not found"),
])
def test_bad_input_is_one_readable_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fipurify: error:") and message in err[0].lower()
    assert not (tmp_path / "x.safetensors").exists()


def test_cifar10_missing_data_root_is_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "cifar" in capsys.readouterr().err.lower()
