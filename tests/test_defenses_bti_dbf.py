"""BTI-DBF(U) (Xu et al., ICLR 2024) and its PAM variant (Min et al., NeurIPS 2024)."""
import copy
import json

import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses import bti_dbf as bti
from fipurify.defenses.bti_dbf import BTIDBF, FeatureSplit, TriggerGenerator, pam_point, project_budget
from fipurify.errors import ConfigError

# feat_bound is in the model's feature units: the paper's 5 suits a ResNet-18's last feature map,
# the tiny width-4 model's features are about 100x smaller
FAST = dict(rounds=2, mask_epochs=2, gen_epochs=6, epochs=2, gen_width=4, gen_depth=2, batch_size=32, feat_bound=0.02)


@pytest.fixture(scope="module")
def bti_run(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = copy.deepcopy(model.state_dict())
    seen = []
    d = defenses.create("bti-dbf", **FAST)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False, callback=seen.append)
    return {"model": model, "before": before, "defense": d, "out": out, "seen": seen}


def test_paper_defaults_and_the_pam_configuration():
    cfg = defenses.create("bti-dbf", dataset="cifar10").config
    assert (cfg.rounds, cfg.mask_epochs, cfg.gen_epochs, cfg.epochs) == (5, 20, 30, 30)
    assert (cfg.mask_lr, cfg.gen_lr, cfg.lr, cfg.optimizer) == (0.01, 1e-3, 1e-4, "adam")
    assert (cfg.poison_share, cfg.feat_bound, cfg.gen_width, cfg.gen_depth, cfg.pam) == (0.1, 5.0, 32, 4, False)
    pam = defenses.create("bti-dbf-pam").config
    assert type(defenses.create("bti-dbf-pam")) is BTIDBF
    assert (pam.pam, pam.pam_rho, pam.optimizer, pam.lr, pam.momentum, pam.rounds) == (True, 0.5, "sgd", 0.01, 0.1, 3)


def test_generator_output_stays_in_budget_and_in_unit_range():
    torch.manual_seed(0)
    g = TriggerGenerator(3, budget=0.01, width=4, depth=2)
    with torch.no_grad():
        g.out.weight.normal_(std=5.0)  # a wild generator: the budget must still hold
        g.out.bias.fill_(0.7)
        x = torch.rand(6, 3, 16, 16)
        delta = g.delta(x)
        y = g(x)
    assert delta.pow(2).flatten(1).mean(1).max() <= 0.01 * (1 + 1e-5)
    assert float(delta.pow(2).flatten(1).mean(1).max()) == pytest.approx(0.01, rel=1e-4)  # it was projected
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).pow(2).flatten(1).mean(1).max() <= 0.01 * (1 + 1e-5)
    small = torch.full((2, 3, 4, 4), 0.01)
    assert torch.equal(project_budget(small, 0.01), small)  # inside the budget: untouched


def test_trained_generator_keeps_budget_benign_features_and_finds_the_target(bti_run, tiny_backdoor):
    d = bti_run["defense"]
    x = torch.stack([tiny_backdoor["reserve"][i][0] for i in range(40)])
    with torch.no_grad():
        xg = d.generator(x)
    assert xg.min() >= 0 and xg.max() <= 1
    assert (xg - x).pow(2).flatten(1).mean(1).max() <= d.config.norm_bound * (1 + 1e-5)
    for r in d.report["rounds"]:
        assert r["gen_pixel_mse_max"] <= d.config.norm_bound * (1 + 1e-5) and r["gen_pixel_mse"] > 1e-4
        assert r["benign_agreement"] >= 0.6  # the benign features of G(x) still give x's prediction
    # the inversion points at the attack's target (clean data only), and unlearning keeps clean predictions
    assert d.report["target_label"] == tiny_backdoor["attack"].target
    masks = [rec for rec in d.report["history"] if rec["phase"] == "mask" and rec["round"] == 1]
    assert masks[-1]["pos_ce"] < -masks[-1]["neg_ce"]  # masked features predict better than the rest
    assert masks[-1]["pos_ce"] + masks[-1]["neg_ce"] < masks[0]["pos_ce"] + masks[0]["neg_ce"]  # and it trains
    assert d.report["generated_clean_acc_after"] >= 0.6
    assert d.report["history"][-1]["holdout_acc"] >= 0.6


def test_input_model_unchanged_and_a_plain_copy_returned(bti_run):
    model, out, before = bti_run["model"], bti_run["out"], bti_run["before"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(out) is type(model) and out is not model and not out.training
    assert list(out.state_dict()) == list(before)
    assert any(not torch.equal(out.state_dict()[k], before[k]) for k in before)


def test_report_fields(bti_run, tiny_backdoor):
    rep = bti_run["defense"].report
    assert rep["method"] == "bti-dbf" and rep["config"] == bti_run["defense"].config.to_dict()
    assert rep["n_clean_train"] + rep["n_holdout"] == len(tiny_backdoor["reserve"]) and rep["n_holdout"] > 0
    assert rep["rounds_run"] == 2 and [r["round"] for r in rep["rounds"]] == [1, 2]
    assert {"target", "gen_budget", "gen_pixel_mse", "benign_agreement", "mask_mean", "predicted_share", "gen_loss",
            "benign_feat", "backdoor_feat"} <= set(rep["rounds"][0])
    assert rep["feature_space"] == "map" and rep["gen_budget"] == 0.012
    phases = [(rec["round"], rec["phase"]) for rec in rep["history"]]
    assert phases == [(r, p) for r in (1, 2) for p, n in (("mask", 2), ("generator", 6), ("unlearn", 2))
                      for _ in range(n)]
    assert all("holdout_acc" in rec for rec in rep["history"] if rec["phase"] == "unlearn")
    assert {"gen_loss", "benign_feat", "backdoor_feat", "pixel_mse"} <= set(rep["history"][2])
    # from the second round on, G is also pulled toward the detected target
    assert "target_ce" not in rep["history"][2] and "target_ce" in rep["history"][12]
    assert len(bti_run["seen"]) == len(rep["history"])
    assert set(rep["seconds"]) >= {"total", "mask", "generator", "unlearn", "train"}
    json.dumps(rep)


def test_pam_point_lies_between_current_and_original_weights():
    torch.manual_seed(1)
    cur = [torch.randn(3, 4), torch.randn(5)]
    far = [c + 10 * torch.randn_like(c) for c in cur]
    point, t = pam_point(cur, far, rho=0.5)
    dist = float(torch.sqrt(sum((f - c).pow(2).sum() for c, f in zip(cur, far))))
    assert 0 < t < 1 and t == pytest.approx(0.5 / dist)
    for c, f, p in zip(cur, far, point):
        assert torch.allclose(p, c + t * (f - c))
    assert float(torch.sqrt(sum((p - c).pow(2).sum() for c, p in zip(cur, point)))) == pytest.approx(0.5, rel=1e-4)
    near = [c + 1e-3 * torch.randn_like(c) for c in cur]  # closer than rho: the point is theta_0, not beyond
    point, t = pam_point(cur, near, rho=0.5)
    assert t == 1.0 and all(torch.allclose(p, n) for p, n in zip(point, near))
    point, t = pam_point(cur, cur, rho=0.5)
    assert t == 0.0 and all(torch.equal(p, c) for p, c in zip(point, cur))


def test_pam_takes_the_unlearning_gradient_at_the_path_point(tiny_backdoor, monkeypatch):
    model = tiny_backdoor["model"]
    theta0 = [p.detach().clone() for p in model.parameters()]
    calls, seen_at = [], []

    def spy_point(current, original, rho):
        point, t = pam_point(current, original, rho)
        calls.append({"current": [c.clone() for c in current], "original": original, "point": point, "t": t})
        return point, t

    real_encode = FeatureSplit.encode

    def spy_encode(self, m, x):
        if m.training:  # the unlearning forward passes (the inversion runs a frozen copy in eval mode)
            seen_at.append(next(m.parameters()).detach().clone())
        return real_encode(self, m, x)

    monkeypatch.setattr(bti, "pam_point", spy_point)
    monkeypatch.setattr(FeatureSplit, "encode", spy_encode)
    d = defenses.create("bti-dbf-pam", **{**FAST, "rounds": 1, "epochs": 2, "pam_rho": 0.05})
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    assert len(calls) == len(seen_at) == 8  # 2 epochs x 4 batches: one forward per step, at the point
    for call, first in zip(calls, seen_at):
        assert all(torch.equal(o, t0) for o, t0 in zip(call["original"], theta0))  # theta_0 = the input model
        assert 0 <= call["t"] <= 1
        for c, o, p in zip(call["current"], call["original"], call["point"]):
            assert torch.allclose(p, c + call["t"] * (o - c), atol=1e-6)
        assert torch.equal(first, call["point"][0])  # the loss was evaluated at the point
    assert calls[0]["t"] == 0.0 and any(0 < c["t"] < 1 for c in calls[1:])
    assert not torch.equal(next(out.parameters()).detach(), calls[-1]["point"][0])  # restored, then stepped
    assert d.report["method"] == "bti-dbf-pam" and d.report["pam"] and d.report["pam_t_mean"] > 0


def test_model_without_features_is_refused(tiny_backdoor):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 4))
    with pytest.raises(ConfigError, match="features") as err:
        BTIDBF(**FAST).purify(net, tiny_backdoor["reserve"], progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(norm_bound=0.0), dict(norm_bound=1.5), dict(poison_share=0.0),
                                 dict(optimizer="rmsprop"), dict(pam=True, pam_rho=0.0), dict(gen_depth=0),
                                 dict(mask_lr=-1.0), dict(feature_weight=-1.0), dict(rounds=1.5)])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        defenses.create("bti-dbf", **bad)
