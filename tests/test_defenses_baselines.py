"""The baseline defenses together: every method's copy and report, the registry keeping each one's own
schedule, option checks (purification and training-time methods), schedulers (defenses.baseline_common)
and fipurify purify with a baseline."""
import copy
import json

import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses.anp import ANP
from fipurify.defenses.baseline_common import make_scheduler
from fipurify.defenses.training_time import create_training_defense
from fipurify.errors import ConfigError

from baseline_settings import FAST


@pytest.mark.parametrize("name", sorted(FAST))
def test_every_method_returns_a_plain_copy_and_a_full_report(name, tiny_backdoor):
    model = tiny_backdoor["model"]
    before = copy.deepcopy(model.state_dict())
    seen = []
    d = defenses.create(name, **FAST[name])
    out = d.purify(model, tiny_backdoor["reserve"], progress=False, callback=seen.append)
    assert type(out) is type(model) and out is not model
    sd = out.state_dict()
    assert list(sd) == list(before) and all(sd[k].shape == before[k].shape for k in sd)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # the input is untouched
    assert not out.training and all(p.requires_grad for p in out.parameters())
    rep = d.report
    assert rep["method"] == name and rep["config"] == d.config.to_dict()
    assert set(rep["seconds"]) >= {"total", "setup", "train"} and rep["seconds"]["total"] > 0
    assert len(rep["history"]) == len(seen)
    if name == "clp":
        assert rep["n_clean_train"] == 0 and rep["history"] == []
    else:
        assert rep["n_clean_train"] + rep["n_holdout"] == len(tiny_backdoor["reserve"]) and rep["n_holdout"] > 0
        assert rep["n_trainable"] > 0 and all("holdout_acc" in r or r.get("stage") == "curve" for r in rep["history"])
        if name != "anp":  # ANP changes nothing when no mask falls under the threshold
            assert any(not torch.equal(sd[k], before[k]) for k in sd)
    json.dumps(rep)  # the CLI writes the report as JSON


def test_registry_keeps_each_baselines_own_schedule_over_dataset_presets():
    assert defenses.create("ft-sam", dataset="cifar10").config.epochs == 100
    anp = defenses.create("anp", dataset="cifar10", epochs=3)
    assert (anp.config.epochs, anp.config.lr) == (3, 0.2)
    nad = defenses.create("nad", dataset="gtsrb")
    assert (nad.config.epochs, nad.config.lr, nad.config.milestones) == (20, 0.1, (2,))
    assert defenses.create("ffip", dataset="cifar10").config.epochs == 50  # FIP untouched


@pytest.mark.parametrize("name, options", [
    ("ft-sam", {"rho": 0.0}), ("ft-sam", {"label_smoothing": 1.0}), ("ft-sam", {"schedule": "nope"}),
    ("fp", {"acc_drop": -0.1}), ("fp", {"prune_ratio": 1.0}),
    ("nad", {"betas": [-1.0]}), ("nad", {"teacher_epochs": 0}), ("nad", {"layers": ["a", "b"], "betas": [1.0]}),
    ("nad", {"p": 0}), ("mcr", {"t": 0.0}), ("mcr", {"t": 1.0}), ("mcr", {"ft_epochs": 0}),
    ("clp", {"u": -1.0}), ("clp", {"input_size": 0}),
    ("anp", {"eps": 1.5}), ("anp", {"alpha": 2.0}), ("anp", {"threshold": -0.1}), ("anp", {"steps": 0}),
    ("anp", {"no_such_option": 1}), ("mcr", {"epochs": 0}),
])
def test_bad_options_raise_config_error(name, options):
    with pytest.raises(ConfigError):
        defenses.create(name, **options)


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler("flat-linear", 10)(opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # epoch e runs at factor(e / 10): flat to half-way, linear down to 1% at 90%, then 1%
    assert lrs[:5] == [1.0] * 5 and lrs[5] == pytest.approx(1 - 0.1 / 0.4 * 0.99)
    assert lrs[8] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.01)


def test_cli_purify_with_a_baseline(tmp_path, monkeypatch, capsys):
    from fipurify.cli import main

    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
                 "--reserve", "0.1", "--quiet", "--out", str(model)]) == 0
    out = tmp_path / "p.safetensors"
    assert main(["purify", str(model), "--method", "fp", "--clean-size", "40", "--epochs", "1",
                 "--set", "batch_size=16", "--set", "prune_ratio=0.5", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == "fp" and report["n_pruned"] == 16 and set(report["after"]) >= {"acc", "asr"}
    capsys.readouterr()
    assert main(["purify", str(model), "--method", "mcr", "--set", "t=1.5", "--quiet",
                 "--out", str(tmp_path / "q.safetensors")]) == 2
    assert "t must lie" in capsys.readouterr().err


@pytest.mark.parametrize("make", [
    lambda: defenses.create("i-bau", pert_norm=0),
    lambda: defenses.create("i-bau", fixed_point_steps=0),
    lambda: defenses.create("i-bau", perturb_share=1.5),
    lambda: defenses.create("i-bau", optimizer="rmsprop"),
    lambda: defenses.create("awm", alpha=1.5),
    lambda: defenses.create("awm", trigger_norm=-1.0),
    lambda: defenses.create("awm", trigger="noise"),
    lambda: defenses.create("awm", nope=1),
    lambda: defenses.create("rnp", prune_by="size"),
    lambda: defenses.create("rnp", clean_threshold=2.0),
    lambda: defenses.create("rnp", prune_ratio=1.0),
    lambda: create_training_defense("abl", isolation_ratio=0.0),
    lambda: create_training_defense("abl", isolation_epochs=0),
    lambda: create_training_defense("abl", nope=1),
    lambda: create_training_defense("cbd", critic_dropout=1.0),
    lambda: create_training_defense("cbd", lr=-1.0),
    lambda: create_training_defense("nope"),
])
def test_bad_options_of_post_and_training_time_defenses_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_baselines_keep_their_own_schedule_under_a_dataset_preset():
    ibau = defenses.create("i-bau", dataset="cifar10")
    assert ibau.config.epochs == 10 and ibau.config.lr == pytest.approx(1e-3)
    assert defenses.create("awm", dataset="cifar10").config.epochs == 100
    assert defenses.create("rnp", dataset="cifar10", epochs=3).config.epochs == 3
