"""Training-time defenses: ABL (defenses.abl), CBD (defenses.cbd), their registry
(defenses.training_time) and fipurify train --defense."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fipurify import models
from fipurify.datasets.base import ArrayDataset
from fipurify.defenses.loop import finetune
from fipurify.defenses.training_time import create_training_defense


def _same_architecture(out: nn.Module, model: nn.Module) -> None:
    assert type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())
    assert all(out.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def _fresh_model() -> nn.Module:
    torch.manual_seed(1)
    return models.create("preactresnet18", num_classes=4, width=4, input_size=16)


def test_abl_isolates_the_configured_share_enriched_in_poison(tiny_backdoor):
    # On the synthetic images the clean task is learned before the trigger, the reverse of
    # CIFAR-10, so loss-based isolation has nothing to find there. Shuffling the clean labels
    # makes the trigger the fastest-learned feature again (ABL's premise), with the fixture's attack.
    train = tiny_backdoor["train"]
    hard = ArrayDataset(train.images, np.random.default_rng(0).permutation(train.labels), train.classes,
                        name="hard")
    poisoned = tiny_backdoor["attack"].poison(hard)
    model = _fresh_model()
    d = create_training_defense("abl", isolation_epochs=4, isolation_ratio=0.05, finetune_epochs=1,
                                unlearn_epochs=1, batch_size=32, augment=False)
    out = d.train(model, poisoned, progress=False)
    assert out is model and not out.training
    rep = d.report
    assert rep["n_isolated"] == 30 and len(set(rep["isolated_indices"])) == 30
    precision = float(poisoned.poison_flag[rep["isolated_indices"]].mean())
    assert precision == rep["isolated_poison_precision"]
    assert precision > 2 * poisoned.poison_flag.mean()
    assert [r["phase"] for r in rep["history"]] == ["isolation"] * 4 + ["finetune", "unlearn"]
    assert rep["history"][-1]["neg_ce"] < 0 and rep["history"][-1]["lr"] == pytest.approx(5e-4)


def test_cbd_trains_on_the_poisoned_set(tiny_backdoor):
    poisoned = tiny_backdoor["attack"].poison(tiny_backdoor["train"])
    model = _fresh_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    d = create_training_defense("cbd", epochs=2, backdoor_epochs=1, batch_size=64)
    out = d.train(model, poisoned, progress=False)
    _same_architecture(out, _fresh_model())
    assert any(not torch.equal(out.state_dict()[k], v) for k, v in init.items())
    hist = d.report["history"]
    assert [r["phase"] for r in hist] == ["backdoor", "clean", "clean"]
    assert all(np.isfinite(r["wce"]) and np.isfinite(r["mi"]) for r in hist[1:])
    assert set(d.report["seconds"]) >= {"total", "setup", "train"}


def test_cli_train_with_abl(tmp_path, monkeypatch, capsys):
    from fipurify.cli import main
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.safetensors"
    argv = ["train", "--dataset", "synthetic", "--width", "4", "--train-limit", "200", "--reserve", "0.1",
            "--quiet", "--no-flip", "--defense", "abl", "--defense-opt", "isolation_epochs=1",
            "--defense-opt", "finetune_epochs=1", "--defense-opt", "unlearn_epochs=1",
            "--defense-opt", "batch_size=32", "--out", str(out), "--json", str(tmp_path / "m.json")]
    assert main(argv) == 0 and out.exists()
    meta = json.loads((tmp_path / "m.json").read_text())
    rep = meta["training_defense"]
    assert rep["method"] == "abl" and rep["n_isolated"] == 2 and rep["config"]["flip"] is False
    assert [r["phase"] for r in meta["history"]] == ["isolation", "finetune", "unlearn"]
    from fipurify import load_model
    _, saved = load_model(out)
    assert saved["training_defense"]["config"]["isolation_epochs"] == 1
    capsys.readouterr()
    bad = ["train", "--dataset", "synthetic", "--defense", "nope", "--out", str(tmp_path / "x.safetensors")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown training-time defense" in err[0]
    assert main(["train", "--dataset", "synthetic", "--defense", "abl", "--defense-opt", "gamma_x=1",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_train_set_checks_share_the_clean_set_model_probe():
    """check_train_set and check_clean_set run the model through one probe (defenses.base.check_model_runs):
    each refuses a class-count mismatch, a label outside the model's range and a model that cannot
    run on the items, naming its own set."""
    from fipurify.datasets.base import ArrayDataset as AD
    from fipurify.defenses.base import check_clean_set
    from fipurify.defenses.training_time import check_train_set
    from fipurify.errors import DataError

    model = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    images = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    five = AD(images, np.zeros(6, dtype=np.int64), [str(c) for c in range(5)], name="five")
    with pytest.raises(DataError, match="the training set has 5"):
        check_train_set(five, model)
    with pytest.raises(DataError, match="the clean set has 5"):
        check_clean_set(five, 1, model)
    far = torch.utils.data.TensorDataset(torch.zeros(6, 3, 16, 16), torch.full((6,), 7))  # no num_classes
    with pytest.raises(DataError, match="training label 7 is out of range"):
        check_train_set(far, model)
    with pytest.raises(DataError, match="clean label 7 is out of range"):
        check_clean_set(far, 1, model)
    wide = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    wide.conv1 = nn.Conv2d(5, 4, 3, padding=1)  # expects 5 channels
    ok = AD(images, np.zeros(6, dtype=np.int64), [str(c) for c in range(4)], name="ok")
    with pytest.raises(DataError, match="cannot process images of shape"):
        check_train_set(ok, wide)
    with pytest.raises(DataError, match="cannot process clean images of shape"):
        check_clean_set(ok, 1, wide)
    assert wide.training  # the probe restores the model's mode
