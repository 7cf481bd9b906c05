"""Baseline defenses, part B: I-BAU, AWM, RNP (post-training), ABL and CBD (training-time)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fipurify import defenses, models
from fipurify.datasets.base import ArrayDataset
from fipurify.defenses.loop import finetune
from fipurify.defenses.rnp import batchnorm_layers
from fipurify.defenses.training_time import create_training_defense
from fipurify.errors import ConfigError


def _same_architecture(out: nn.Module, model: nn.Module) -> None:
    assert type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())
    assert all(out.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def _fresh_model() -> nn.Module:
    torch.manual_seed(1)
    return models.create("preactresnet18", num_classes=4, width=4, input_size=16)


def test_finetune_hooks_objective_epoch_start_and_stop(tiny_backdoor):
    model = _fresh_model()
    started = []
    cfg = defenses.DefenseConfig(epochs=5, lr=0.01, batch_size=32, holdout=0.0, augment=False)
    hist = finetune(model, list(model.parameters()), tiny_backdoor["reserve"], cfg, progress=False,
                    objective=lambda m, x, y, s: {"neg": -nn.functional.cross_entropy(m(x), y)},
                    epoch_start=started.append, stop=lambda rec: rec["epoch"] >= 2)
    assert [r["epoch"] for r in hist] == [1, 2] and started == [1, 2]  # stopped after epoch 2
    assert "neg" in hist[0] and "ce" not in hist[0] and hist[0]["neg"] < 0


def test_ibau_returns_same_architecture_and_bounds_the_perturbation(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = defenses.create("i-bau", epochs=2, batch_size=32, pert_norm=0.5, pert_steps=2, fixed_point_steps=2,
                        perturb_share=0.5)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    _same_architecture(out, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # input untouched
    assert any(not torch.equal(out.state_dict()[k], v) for k, v in before.items())
    norms = d.report["perturbation_norms"]
    assert len(norms) == 2 and max(norms) <= 0.5 * (1 + 1e-5)
    assert max(norms) > 0.4  # pert_lr 10 drives it to the bound: the projection is active
    assert float(d.perturbation.norm()) <= 0.5 * (1 + 1e-5)
    rec = d.report["history"][-1]
    assert {"ce", "hyper", "holdout_acc", "pert_norm"} <= set(rec) and rec["hyper"] != 0
    assert {"method", "config", "n_clean_train", "n_holdout", "n_trainable", "seconds", "history"} <= set(d.report)
    assert set(d.report["seconds"]) >= {"total", "setup", "train"}


@pytest.mark.parametrize("trigger", ["additive", "mask-pattern"])
def test_awm_multiplies_conv_weights_by_masks_in_unit_interval(tiny_backdoor, trigger):
    model = tiny_backdoor["model"]
    d = defenses.create("awm", epochs=2, batch_size=32, trigger_steps=2, trigger_norm=2.0, alpha=0.5, trigger=trigger)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    _same_architecture(out, model)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    changed = 0
    for key, w0 in model.state_dict().items():
        w1 = out.state_dict()[key]
        if key.rsplit(".", 1)[0] in convs and key.endswith("weight"):
            nz = w0 != 0
            ratio = w1[nz] / w0[nz]  # the applied soft mask
            assert ratio.min() >= -1e-6 and ratio.max() <= 1 + 1e-6
            changed += int(not torch.equal(w0, w1))
        else:
            assert torch.equal(w0, w1), key  # BN, linear and buffers are not masked
    assert changed > 0
    assert d.report["n_trainable"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(0 < v <= 2.0 + 1e-4 for v in d.report["trigger_l1"])  # ||delta||_1 / ||M||_1 capped at trigger_norm
    if trigger == "additive":
        assert d.trigger["delta"].abs().sum() == pytest.approx(d.report["trigger_l1"][-1], rel=1e-5)
    else:
        assert d.trigger["mask"].min() >= 0 and d.trigger["mask"].max() <= 1


def test_rnp_masks_in_unit_interval_and_pruning_zeroes_exactly_the_masked_neurons(tiny_backdoor):
    model = tiny_backdoor["model"]
    d = defenses.create("rnp", epochs=4, recover_epochs=2, batch_size=32, clean_threshold=0.5,
                        prune_by="ratio", prune_ratio=0.1)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    _same_architecture(out, model)
    values = torch.cat(list(d.masks.values()))
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    n_prune = int(round(0.1 * len(values)))
    assert d.report["n_pruned"] == n_prune
    cut = torch.sort(values).values[n_prune - 1]
    bns = dict(batchnorm_layers(out))
    pruned = {(p["layer"], p["index"]) for p in d.report["pruned"]}
    for name, mk in d.masks.items():
        for i in range(len(mk)):
            w, b = bns[name].weight[i], bns[name].bias[i]
            if (name, i) in pruned:
                assert mk[i] <= cut and w == 0 and b == 0
            else:
                assert mk[i] >= cut
                assert w == model.state_dict()[f"{name}.weight"][i] and b == model.state_dict()[f"{name}.bias"][i]
    for k, v in model.state_dict().items():  # nothing but the pruned BN entries changed
        if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in d.masks):
            assert torch.equal(out.state_dict()[k], v), k
    # a pruned neuron's output is exactly zero
    name, idx = next(iter(pruned))
    seen = {}
    h = bns[name].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    out(tiny_backdoor["test"][0][0][None])
    h.remove()
    assert torch.count_nonzero(seen["out"][:, idx]) == 0
    # the unlearning stopped at the first epoch whose clean training accuracy fell to the threshold
    accs = [r["train_acc"] for r in d.report["history"] if r["phase"] == "unlearn"]
    assert all(a > 0.5 for a in accs[:-1])
    assert d.report["threshold_reached"] == (accs[-1] <= 0.5)


def test_rnp_threshold_mode_prunes_all_masks_at_or_below_it(tiny_backdoor):
    d = defenses.create("rnp", epochs=2, recover_epochs=1, batch_size=32, prune_threshold=0.95)
    out = d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    expected = {(n, i) for n, mk in d.masks.items() for i in range(len(mk)) if mk[i] <= 0.95}
    assert {(p["layer"], p["index"]) for p in d.report["pruned"]} == expected
    bns = dict(batchnorm_layers(out))
    assert all(bns[n].weight[i] == 0 for n, i in expected)


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
def test_bad_options_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_baselines_keep_their_own_schedule_under_a_dataset_preset():
    ibau = defenses.create("i-bau", dataset="cifar10")
    assert ibau.config.epochs == 10 and ibau.config.lr == pytest.approx(1e-3)
    assert defenses.create("awm", dataset="cifar10").config.epochs == 100
    assert defenses.create("rnp", dataset="cifar10", epochs=3).config.epochs == 3


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


def test_ibau_hypergradient_matches_finite_differences_of_the_minimax_objective():
    # Toy problem with a strongly convex inner problem: the surrogate's gradient must equal
    # d/dtheta L_out(delta*(theta), theta), with delta* the inner minimiser.
    from fipurify.defenses.ibau import IBAUConfig, implicit_terms
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = (0.5 + 0.05 * torch.randn(8, 3, 2, 2)).double()
    y = torch.randint(0, 3, (8,))
    cfg = IBAUConfig(pert_reg=5.0, inner_lr=0.05, fixed_point_steps=200)

    def inner_min() -> torch.Tensor:
        d = torch.zeros(1, 3, 2, 2, dtype=torch.double, requires_grad=True)
        for _ in range(2000):
            loss = -nn.functional.cross_entropy(model(x + d), y) + cfg.pert_reg * d.pow(2).sum()
            (g,) = torch.autograd.grad(loss, [d])
            d = (d - 0.05 * g).detach().requires_grad_(True)
        return d.detach()

    everyone = torch.arange(8)
    delta = inner_min()
    assert (x + delta).min() > 0 and (x + delta).max() < 1  # the clamp is inactive
    terms = implicit_terms(model, x, y, delta, everyone, cfg)
    plain_grad = torch.autograd.grad(terms["ce"], [model[1].weight], retain_graph=True)[0]
    grad = torch.autograd.grad(terms["ce"] + terms["hyper"], [model[1].weight])[0]
    direction = torch.randn_like(grad)
    eps = 1e-4
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            model[1].weight.add_(sign * eps * direction)
        d_star = inner_min()
        with torch.no_grad():
            vals.append(float(nn.functional.cross_entropy(model(x + d_star), y)))
        with torch.no_grad():
            model[1].weight.sub_(sign * eps * direction)
    fd = (vals[0] - vals[1]) / (2 * eps)
    plain = float((plain_grad * direction).sum())
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=1e-3, abs=1e-7)
    assert abs(plain - fd) > 1e-3 * abs(fd)  # the implicit term matters here
