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


def test_purify_writes_model_and_report(data_root, capsys):
    model = data_root / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
                 "--reserve", "0.1", "--quiet", "--out", str(model)]) == 0
    out = data_root / "p.safetensors"
    rc = main(["purify", str(model), "--method", "ffip", "--clean-size", "40", "--epochs", "2",
               "--set", "batch_size=16", "--quiet", "--out", str(out)])
    assert rc == 0 and out.exists()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "ffip" and report["clean_size"] == 40 and len(report["history"]) == 2
    assert set(report["before"]) >= {"acc", "asr", "lcr"} and set(report["after"]) >= {"acc", "asr", "lcr"}
    from fipurify import load_model
    purified, meta = load_model(out)
    assert meta["purification"]["method"] == "ffip" and meta["attack"]["name"] == "badnets"
    # too small a clean set: one readable line, no output
    capsys.readouterr()
    assert main(["purify", str(model), "--clean-size", "5", "--quiet", "--out", str(data_root / "q.safetensors")]) == 2
    assert "at least 10" in capsys.readouterr().err
    assert not (data_root / "q.safetensors").exists()
