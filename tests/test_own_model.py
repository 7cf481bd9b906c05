"""Bring your own model: a model class defined only here, purified from the command line."""
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import fipurify
from fipurify.cli import main
from fipurify.errors import ConfigError, ModelFileError

MODULE = "fip_test_own_nets"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        """Takes 16x16 RGB images only (the flatten fixes the size)."""

        def __init__(self, num_classes=3, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width * 8 * 8, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


    def tiny(num_classes=3, width=4):
        return TinyNet(num_classes, width)
''')


@pytest.fixture()
def own(tmp_path, monkeypatch):
    """A module on sys.path with TinyNet, its weights (.pt and .safetensors) and a clean folder."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import importlib
    mod = importlib.import_module(MODULE)
    torch.manual_seed(0)
    net = mod.TinyNet()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    make_folder(tmp_path / "clean", ["a", "b", "c"])
    return {"dir": tmp_path, "mod": mod, "net": net, "arch": f"{MODULE}:TinyNet"}


def make_folder(root, classes, n=8, size=16, mode="RGB"):
    rng = np.random.default_rng(len(classes) * 1000 + size)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode).save(d / f"{i}.png")
    return root


FAST = ["--no-eval", "--epochs", "1", "--set", "batch_size=8", "--quiet"]


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("fipurify: error:"), err
    return err[0]


def test_purify_a_model_class_defined_only_in_the_test(own, capsys):
    d = own["dir"]
    rc = main(["purify", "--arch", own["arch"], "--arch-args", '{"num_classes": 3, "width": 4}',
               "--weights", str(d / "w.pt"), "--clean-dir", str(d / "clean"), *FAST, "--out", str(d / "p.safetensors")])
    assert rc == 0, capsys.readouterr().err
    purified, meta = fipurify.load_model(d / "p.safetensors")
    assert type(purified).__name__ == "TinyNet" and meta["arch"] == own["arch"]
    assert meta["purification"]["method"] == fipurify.defenses.default_method() == "detect-unlearn-clip-all"
    before = own["net"].state_dict()["conv.weight"]
    assert not torch.equal(purified.state_dict()["conv.weight"], before)
    assert (d / "p.json").exists()
    # purify the purified file again (it rebuilds TinyNet by importing the module, never unpickling)
    assert main(["purify", str(d / "p.safetensors"), "--clean-dir", str(d / "clean"), *FAST,
                 "--out", str(d / "p2.safetensors")]) == 0


def test_import_then_purify_with_class_names(own, capsys):
    d = own["dir"]
    assert main(["import", "--arch", f"{MODULE}:tiny", "--weights", str(d / "w.safetensors"),
                 "--classes", "a,b,c", "--out", str(d / "m.safetensors")]) == 0
    model, meta = fipurify.load_model(d / "m.safetensors")
    assert meta["classes"] == ["a", "b", "c"] and meta["arch"] == f"{MODULE}:tiny"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), own["net"].eval()(x))
    make_folder(d / "sub", ["a", "c"])  # a subset of the named classes is fine (for a method without a detector)
    capsys.readouterr()
    assert main(["purify", str(d / "m.safetensors"), "--clean-dir", str(d / "sub"), *FAST, "--method", "ft",
                 "--out", str(d / "p.safetensors")]) == 0
    capsys.readouterr()  # the default's detector compares classes: two are too few, said in one line, no file
    assert main(["purify", str(d / "m.safetensors"), "--clean-dir", str(d / "sub"), *FAST,
                 "--out", str(d / "p3.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fipurify: error:") and "fisher-unlearn" in err[-1], err
    assert not (d / "p3.safetensors").exists()
    capsys.readouterr()
    make_folder(d / "other", ["a", "zebra"])
    assert main(["purify", str(d / "m.safetensors"), "--clean-dir", str(d / "other"), *FAST,
                 "--out", str(d / "q.safetensors")]) == 2
    assert "zebra" in one_error_line(capsys) and not (d / "q.safetensors").exists()


def test_own_model_without_evaluation_data_needs_no_eval_up_front(own, capsys):
    d = own["dir"]
    assert main(["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--clean-dir", str(d / "clean"),
                 "--out", str(d / "p.safetensors")]) == 2
    assert "--no-eval" in one_error_line(capsys)
    assert not (d / "p.safetensors").exists()
    assert main(["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--no-eval",
                 "--out", str(d / "p.safetensors")]) == 2
    assert "--clean-dir" in one_error_line(capsys)


def test_plain_state_dict_as_model_file_says_what_to_do(own, capsys):
    d = own["dir"]
    assert main(["purify", str(d / "w.pt"), "--clean-dir", str(d / "clean"), "--out", str(d / "p.safetensors")]) == 2
    line = one_error_line(capsys)
    assert "--weights" in line and "fipurify import" in line
    assert main(["evaluate", str(d / "w.safetensors")]) == 2
    assert "--arch NAME --weights" in one_error_line(capsys)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_module_is_refused_with_one_clear_line(own, capsys):
    d = own["dir"]
    torch.save(own["net"], d / "whole.pt")
    torch.save({"x": _Boom()}, d / "evil.pt")
    for f in ("whole.pt", "evil.pt"):
        assert main(["purify", "--arch", own["arch"], "--weights", str(d / f), "--clean-dir", str(d / "clean"),
                     "--no-eval", "--out", str(d / "p.safetensors")]) == 2
        assert "model.state_dict()" in one_error_line(capsys)
    assert not (d / "PWNED").exists() and not (d / "p.safetensors").exists()


def test_truncated_files_are_called_truncated(own, capsys):
    d = own["dir"]
    fipurify.save_model(own["net"], d / "m.safetensors")
    for src, cut in (("m.safetensors", "m-cut.safetensors"), ("w.pt", "w-cut.pt"), ("w.safetensors", "w-cut.safetensors")):
        raw = (d / src).read_bytes()
        (d / cut).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        fipurify.load_model(d / "m-cut.safetensors")
    for cut in ("w-cut.pt", "w-cut.safetensors"):
        assert main(["import", "--arch", own["arch"], "--weights", str(d / cut), "--out", str(d / "x.safetensors")]) == 2
        line = one_error_line(capsys)
        assert "truncated or corrupt" in line and "unpickles" not in line


def test_weights_that_do_not_fit_and_bad_arch_args(own, capsys):
    d = own["dir"]
    assert main(["import", "--arch", own["arch"], "--arch-args", '{"num_classes": 5}', "--weights", str(d / "w.pt"),
                 "--out", str(d / "x.safetensors")]) == 2
    assert "do not fit" in one_error_line(capsys)
    assert main(["import", "--arch", own["arch"], "--arch-args", "nope", "--weights", str(d / "w.pt"),
                 "--out", str(d / "x.safetensors")]) == 2
    assert "JSON object" in one_error_line(capsys)
    assert main(["import", "--arch", "no_such_module_xyz:Net", "--weights", str(d / "w.pt"),
                 "--out", str(d / "x.safetensors")]) == 2
    assert "PYTHONPATH" in one_error_line(capsys)


@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_optional_model_zoos_say_when_missing(zoo, own, capsys):
    import importlib.util
    if importlib.util.find_spec(zoo) is not None:
        pytest.skip(f"{zoo} is installed")
    d = own["dir"]
    assert main(["import", "--arch", f"{zoo}:resnet18", "--weights", str(d / "w.pt"),
                 "--out", str(d / "x.safetensors")]) == 2
    assert f"optional package {zoo}" in one_error_line(capsys)


def test_registry_model_as_arch_and_weights(own, capsys):
    d = own["dir"]
    net = fipurify.models.create("preactresnet18", num_classes=3, width=4, input_size=16)
    torch.save(net.state_dict(), d / "pre.pt")
    assert main(["import", "--arch", "preactresnet18", "--arch-args", '{"num_classes": 3, "width": 4, "input_size": 16}',
                 "--weights", str(d / "pre.pt"), "--out", str(d / "pre.safetensors")]) == 0
    model, meta = fipurify.load_model(d / "pre.safetensors")
    assert meta["arch"] == "preactresnet18" and meta["arch_kwargs"]["width"] == 4


def test_model_file_cannot_name_a_non_model_factory(own, tmp_path):
    # a hostile file naming os:system as its "factory" is refused before anything is called
    fipurify.save_model(own["net"], tmp_path / "evil.safetensors",
                        {"arch": "os:system", "arch_kwargs": {"command": "touch PWNED"}})
    own["net"].fipurify_spec = {"arch": "os:system", "kwargs": {"command": "touch PWNED"}}
    fipurify.save_model(own["net"], tmp_path / "evil2.safetensors")
    for f in ("evil.safetensors", "evil2.safetensors"):
        with pytest.raises(ModelFileError, match="cannot rebuild"):
            fipurify.load_model(tmp_path / f)
    assert not (tmp_path / "PWNED").exists()


def test_save_model_accepts_models_named_by_their_factory(own, tmp_path):
    from fipurify import datasets
    from fipurify.models import external

    clean = datasets.load("imagefolder", own["dir"] / "clean")  # a plain <class>/*.png folder: no split=None needed
    assert clean.classes == ["a", "b", "c"]
    purified = fipurify.purify(own["net"], clean, "ffip", epochs=1, batch_size=8)
    fipurify.save_model(purified, tmp_path / "p.safetensors")  # class importable, builds without arguments
    assert fipurify.load_model(tmp_path / "p.safetensors")[1]["arch"] == own["arch"]
    five = own["mod"].TinyNet(num_classes=5)
    with pytest.raises(ModelFileError, match="arch_kwargs"):
        fipurify.save_model(five, tmp_path / "five.safetensors")
    fipurify.save_model(five, tmp_path / "five.safetensors", {"arch": own["arch"], "arch_kwargs": {"num_classes": 5}})
    assert fipurify.load_model(tmp_path / "five.safetensors")[0].fc.out_features == 5
    built = external.build(own["arch"], {"num_classes": 4})
    fipurify.save_model(built, tmp_path / "four.safetensors")
    assert fipurify.load_model(tmp_path / "four.safetensors")[0].fc.out_features == 4
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        external.build("numpy:ndarray")
    for spec in ("fipurify.cli:main", "subprocess:run", "pip._internal.cli.main:main"):
        with pytest.raises(ConfigError, match="is not a model"):
            external.build(spec, {"argv": ["--version"]})


# --------------------------------------------------------------------------- clean folders
@pytest.mark.parametrize("name, build, message", [
    ("one", lambda r: make_folder(r, ["a"]), "one class only"),
    ("many", lambda r: make_folder(r, [f"k{i}" for i in range(5)]), "the model predicts 3 classes, the folder"),
    ("big", lambda r: make_folder(r, ["a", "b", "c"], size=32), "does not take 3x32x32 images"),
    ("split", lambda r: make_folder(r / "train", ["a", "b", "c"]), "train"),
    ("empty", lambda r: (make_folder(r, ["a", "b"]), (r / "c").mkdir()), "hold no images"),
])
def test_bad_clean_folder_is_refused_before_compute(name, build, message, own, capsys):
    d = own["dir"]
    build(d / name)
    assert main(["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--clean-dir", str(d / name),
                 *FAST, "--out", str(d / "p.safetensors")]) == 2
    line = one_error_line(capsys)
    assert message in line
    if name == "split":
        assert str(d / name / "train") in line
    assert not (d / "p.safetensors").exists()


def test_stray_files_and_grayscale_images_are_warned_about(own, capsys):
    d = own["dir"]
    make_folder(d / "gray", ["a", "b", "c"], mode="L")
    (d / "gray" / "a" / "notes.txt").write_text("x")
    (d / "gray" / "README").write_text("x")
    assert main(["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--clean-dir", str(d / "gray"),
                 *FAST, "--out", str(d / "p.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "skipping 2 non-image files" in err and "a/notes.txt" in err and "README" in err
    assert "grayscale" in err


def test_clean_size_error_names_the_folder(own, capsys):
    d = own["dir"]
    assert main(["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--clean-dir", str(d / "clean"),
                 "--clean-size", "500", *FAST, "--out", str(d / "p.safetensors")]) == 2
    line = one_error_line(capsys)
    assert "--clean-size 500 is more than the 24 images in the folder" in line and "reserve" not in line


def test_real_command_line_with_pythonpath(own):
    """The installed ``fipurify`` command in a fresh process finds the test's module through PYTHONPATH."""
    import subprocess
    from pathlib import Path

    d = own["dir"]
    script = Path(sys.executable).parent / "fipurify"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fipurify.cli"]
    env = {**os.environ, "PYTHONPATH": str(d / "pkg"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd + ["purify", "--arch", own["arch"], "--weights", str(d / "w.pt"), "--clean-dir",
                                str(d / "clean"), *FAST, "--out", str(d / "cli.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert fipurify.load_model(d / "cli.safetensors")[1]["arch"] == own["arch"]


def test_detect_a_model_class_defined_only_in_the_test(own, capsys):
    d = own["dir"]
    make_folder(d / "clean20", ["a", "b", "c"], n=20)
    rc = main(["detect", "--arch", own["arch"], "--arch-args", '{"num_classes": 3, "width": 4}',
               "--weights", str(d / "w.safetensors"), "--clean-dir", str(d / "clean20"), "--method", "uap",
               "--quiet", "--json", str(d / "det.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.startswith("backdoored: ")
    import json
    doc = json.loads((d / "det.json").read_text())
    assert doc["model"] == "w.safetensors" and "score" in doc
