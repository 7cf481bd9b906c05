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


def test_train_resume_continues_a_killed_run(data_root, capsys, monkeypatch):
    """`fipurify train --resume`: a run killed after epoch 1 continues from OUT.train-state.pt, gives the
    weights of an uninterrupted run, and removes the state file once the model is saved."""
    import torch

    from fipurify import load_model, train_state

    argv = ["train", "--dataset", "synthetic", "--width", "4", "--epochs", "2", "--lr", "0.05", "--batch-size", "32",
            "--reserve", "0.1", "--quiet"]
    assert main(argv + ["--out", str(data_root / "straight.safetensors")]) == 0
    out = data_root / "m.safetensors"
    real_save = train_state.save

    def save_then_die(path, **kw):
        real_save(path, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_state, "save", save_then_die)
    capsys.readouterr()
    assert main(argv + ["--resume", "--out", str(out)]) == 130  # Ctrl-C after epoch 1
    state = data_root / "m.safetensors.train-state.pt"
    assert f"the same command continues from {state}" in capsys.readouterr().err
    assert state.exists() and not out.exists()
    monkeypatch.setattr(train_state, "save", real_save)
    capsys.readouterr()
    assert main(argv[:-1] + ["--resume", "--out", str(out)]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().err and not state.exists()
    a, b = load_model(data_root / "straight.safetensors")[0].state_dict(), load_model(out)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", "--dataset", "synthetic", "--defense", "abl", "--resume",
                 "--out", str(data_root / "d.safetensors")]) == 2
    assert "--resume" in capsys.readouterr().err


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


# --------------------------------------------------------------------------- inputs checked before compute
def _cifar_like_model(tmp_path):
    """A tiny preactresnet18 imported as a CIFAR-10 model (its metadata names cifar10 and its classes)."""
    import torch

    from fipurify import models
    torch.manual_seed(0)
    net = models.create("preactresnet18", num_classes=10, width=4)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    assert main(["import", "--arch", "preactresnet18", "--arch-args", '{"num_classes": 10, "width": 4}',
                 "--weights", str(tmp_path / "net.pt"), "--dataset", "cifar10",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    return tmp_path / "m.safetensors"


def _folder(root, classes, n=2, size=32):
    import numpy as np
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 17 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("fipurify: error:"), err
    return err[0]


def test_output_path_is_checked_before_anything(data_root, capsys, monkeypatch):
    monkeypatch.chdir(data_root)
    model = _cifar_like_model(data_root)
    (data_root / "link.safetensors").symlink_to(model)
    (data_root / "outdir").mkdir()
    before = model.read_bytes()
    capsys.readouterr()
    cases = [("m.safetensors", "is the input"), ("./m.safetensors", "is the input"),
             (str(data_root / "sub" / ".." / "m.safetensors"), "is the input"),
             ("link.safetensors", "is the input"), ("outdir", "is a directory"),
             ("missing/p.safetensors", "--mkdir")]
    for out, message in cases:
        assert main(["purify", "m.safetensors", "--clean-dir", "nowhere", "--no-eval", "--out", out]) == 2, out
        assert message in _one_line(capsys), out
    assert model.read_bytes() == before and not (data_root / "missing").exists()
    assert main(["purify", "link.safetensors", "--no-eval", "--clean-dir", "x", "--out", "m.safetensors"]) == 2
    assert "is the input" in _one_line(capsys)
    assert main(["train", "--dataset", "synthetic", "--out", "outdir"]) == 2
    assert "is a directory" in _one_line(capsys)
    # --mkdir creates the folder
    assert main(["import", "--arch", "preactresnet18", "--arch-args", '{"num_classes": 10, "width": 4}',
                 "--weights", "net.pt", "--mkdir", "--out", "new/dir/m.safetensors"]) == 0
    assert (data_root / "new" / "dir" / "m.safetensors").exists()


def test_purify_with_activation_clipping_saves_a_clipped_model_and_says_what_it_bounded(data_root, capsys):
    model = data_root / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
                 "--reserve", "0.1", "--quiet", "--out", str(model)]) == 0
    out = data_root / "clipped.safetensors"
    capsys.readouterr()
    assert main(["purify", str(model), "--method", "act-clip", "--clean-size", "40", "--epochs", "3",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "activation bounds on 8 modules" in printed and "% of the clean images" in printed
    from fipurify import load_model
    from fipurify.models.bounded import bounded_channels
    clipped, meta = load_model(out)
    assert len(bounded_channels(clipped)) == 8 and meta["purification"]["method"] == "act-clip"
    assert main(["evaluate", str(out)]) == 0


def test_missing_test_data_is_reported_before_purifying(data_root, capsys):
    import time
    model = _cifar_like_model(data_root)
    _folder(data_root / "clean", ["airplane", "cat"])
    (data_root / "empty").mkdir()
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["purify", str(model), "--clean-dir", str(data_root / "clean"), "--data-root", str(data_root / "empty"),
                 "--out", str(data_root / "p.safetensors")]) == 2
    line = _one_line(capsys)
    assert "cifar" in line.lower() and "--no-eval" in line
    assert time.perf_counter() - t0 < 10 and not (data_root / "p.safetensors").exists()


def test_class_count_mismatch_is_one_short_line(data_root, capsys):
    model = _cifar_like_model(data_root)
    _folder(data_root / "gtsrb", [f"{i:05d}" for i in range(43)], n=1)
    capsys.readouterr()
    assert main(["purify", str(model), "--clean-dir", str(data_root / "gtsrb"), "--no-eval",
                 "--out", str(data_root / "p.safetensors")]) == 2
    line = _one_line(capsys)
    assert "the model predicts 10 classes, the folder" in line and "has 43" in line and "00042" not in line


def test_resized_clean_images_are_announced(data_root, capsys):
    from fipurify import load_model
    from fipurify.workflow import load_clean_folder
    model, meta = load_model(_cifar_like_model(data_root))
    _folder(data_root / "big", ["cat", "dog"], size=64)
    warnings = []
    data = load_clean_folder(model, meta, str(data_root / "big"), warn=warnings.append)
    assert tuple(data.image_shape) == (3, 32, 32) and len(data) == 4
    assert any("64x64" in w and "32x32" in w for w in warnings)


def test_directory_as_model_and_debug_traceback(data_root, capsys):
    assert main(["evaluate", str(data_root)]) == 2
    assert "is a directory" in _one_line(capsys)
    assert main(["--debug", "evaluate", str(data_root)]) == 2
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    assert err[0].startswith("Traceback")
    assert err[-1].startswith("fipurify: error:") and "is a directory" in err[-1]
    assert err[-2].startswith("fipurify.errors.ModelFileError:")


# --------------------------------------------------------------------------- help that answers
def test_every_argument_has_help_with_default_or_choices():
    import argparse

    from fipurify.cli import build_parser
    mine = ("train", "evaluate", "purify", "demo", "import", "analyze", "scan", "bench", "report")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name in mine:
        for action in sub.choices[name]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            label = f"{name} {action.dest}"
            if not text:
                missing.append(label)
            elif action.option_strings and not ("default" in text or action.required):
                missing.append(label + " (no default)")
    assert not missing, missing
    # choices and defaults show in the rendered help
    text = sub.choices["train"].format_help()
    for word in ("onecycle", "cosine", "preactresnet18", "vit_small", "(default: 128)"):
        assert word in text, word
    assert "%(default)" not in sub.choices["purify"].format_help()


def test_training_prints_parameters_and_a_duration_estimate():
    import torch

    from fipurify import models
    from fipurify.datasets.synthetic import synthetic
    from fipurify.training import TrainConfig, format_duration, train_model
    assert format_duration(3 * 3600 + 40 * 60) == "3 h 40 min" and format_duration(42) == "42 s"
    torch.manual_seed(0)
    net = models.create("preactresnet18", num_classes=4, width=2, input_size=16)
    data = synthetic(n=80, num_classes=4, image_size=16, seed=0, split="train")
    lines = []
    train_model(net, data, TrainConfig(epochs=2, batch_size=8, augment=False), progress=False, log=lines.append)
    assert any("parameters" in ln for ln in lines)
    estimate = [ln for ln in lines if ln.startswith("about ")]
    assert len(estimate) == 1 and "for 2 epochs at this speed" in estimate[0]


def test_every_model_command_takes_a_checked_device(tmp_path, capsys):
    from fipurify.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for cmd in ("train", "evaluate", "purify", "import", "detect", "analyze", "scan", "demo"):
        opts = {o for a in sub.choices[cmd]._actions for o in a.option_strings}
        assert "--device" in opts, cmd
    # an unusable device is one line, exit 2, before any compute or file
    rc = main(["train", "--dataset", "synthetic", "--device", "tpu", "--out", str(tmp_path / "m.safetensors")])
    assert rc == 2 and "--device must be" in capsys.readouterr().err and not list(tmp_path.iterdir())
    import torch
    if not torch.cuda.is_available():
        rc = main(["train", "--dataset", "synthetic", "--device", "cuda", "--out", str(tmp_path / "m.safetensors")])
        assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_trained_and_purified_models_say_where_they_ran(tmp_path, monkeypatch):
    import json

    from fipurify.cli import main
    from fipurify.io import load_model

    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    m = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "2", "--epochs", "1", "--quiet", "--device", "cpu",
                 "--out", str(m)]) == 0
    assert load_model(m)[1]["device"] == "cpu"
    assert main(["purify", str(m), "--method", "ft", "--epochs", "1", "--quiet", "--clean-size", "20", "--no-eval",
                 "--device", "cpu", "--out", str(tmp_path / "p.safetensors")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["device"] == "cpu"
