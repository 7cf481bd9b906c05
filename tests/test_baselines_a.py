"""Baseline defenses, part A: FT-SAM, FP, NAD, MCR, CLP, ANP."""
import copy
import json

import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses.anp import ANP
from fipurify.defenses.baseline_common import conv_bn_pairs, make_scheduler
from fipurify.defenses.clp import CLP
from fipurify.defenses.fineprune import mean_channel_activation
from fipurify.defenses.mcr import BezierCurve
from fipurify.defenses.nad import attention_loss, attention_map
from fipurify.defenses.sam import SAM
from fipurify.defenses.split import holdout_split
from fipurify.errors import ConfigError

FAST = {
    "ft-sam": dict(epochs=2, batch_size=32),
    "fp": dict(epochs=1, batch_size=32),
    "nad": dict(epochs=2, teacher_epochs=1, batch_size=32),
    "mcr": dict(epochs=2, ft_epochs=1, batch_size=32),
    "clp": {},
    "anp": dict(epochs=2, batch_size=32),
}


def _run(name, tiny, **extra):
    d = defenses.create(name, **{**FAST[name], **extra})
    out = d.purify(tiny["model"], tiny["reserve"], progress=False)
    return d, out


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


# --- FT-SAM -------------------------------------------------------------------------------------

def _toy_grads():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return net, (lambda: nn.functional.cross_entropy(net(x), y))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_has_norm_rho_and_steps_with_the_gradient_there(adaptive):
    net, loss = _toy_grads()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    sam = SAM(params, torch.optim.SGD(params, lr=0.5), rho=0.3, adaptive=adaptive)
    loss().backward()
    sam.first_step()
    e = [p.detach() - w for p, w in zip(params, w0)]
    if adaptive:  # ASAM: the perturbation scaled by 1/|w| has norm rho
        e = [d[w != 0] / w[w != 0].abs() for d, w in zip(e, w0)]
    assert torch.linalg.vector_norm(torch.cat([d.flatten() for d in e])).item() == pytest.approx(0.3, rel=1e-5)
    sam.zero_grad()
    loss().backward()
    g_at_e = [p.grad.clone() for p in params]
    sam.second_step()
    for p, w, g in zip(params, w0, g_at_e):  # back at w, then one SGD step with the perturbed gradient
        assert torch.allclose(p.detach(), w - 0.5 * g, atol=1e-7)
    with pytest.raises(RuntimeError):
        sam.second_step()


def test_ftsam_runs_two_passes_with_cosine_schedule(tiny_backdoor):
    d, _ = _run("ft-sam", tiny_backdoor)
    hist = d.report["history"]
    assert {"ce", "sam_ce"} <= set(hist[0]) and hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


# --- FP -----------------------------------------------------------------------------------------

def test_fineprune_zeroes_exactly_the_least_active_channels_it_reports(tiny_backdoor):
    model, reserve = tiny_backdoor["model"], tiny_backdoor["reserve"]
    d, out = _run("fp", tiny_backdoor, prune_ratio=0.25)
    rep = d.report
    assert rep["layer"] == "bn" and rep["n_channels"] == 32 and rep["n_pruned"] == 8
    train, _ = holdout_split(reserve, d.config.holdout, d.config.seed)
    act = mean_channel_activation(model, model.bn, train)
    assert rep["pruned_channels"] == sorted(torch.argsort(act)[:8].tolist())
    feats = []
    h = out.bn.register_forward_hook(lambda m, i, o: feats.append(o))
    out(torch.stack([reserve[i][0] for i in range(32)]))
    h.remove()
    zero = (feats[0].abs().amax(dim=(0, 2, 3)) == 0).nonzero().flatten().tolist()
    assert zero == rep["pruned_channels"]  # those channels output 0 after fine-tuning, and only those


def test_fineprune_accuracy_rule_stops_within_the_allowed_drop(tiny_backdoor):
    d, _ = _run("fp", tiny_backdoor, acc_drop=0.0)
    rep = d.report
    assert rep["prune_check_set"] == "holdout" and rep["acc_after_prune"] >= rep["acc_before_prune"]
    assert 0 <= rep["n_pruned"] < rep["n_channels"]


# --- NAD ----------------------------------------------------------------------------------------

def test_attention_maps_are_normalised_and_the_loss_compares_them():
    a = torch.randn(3, 8, 5, 5)
    am = attention_map(a, 2.0)
    assert am.shape == (3, 25) and torch.allclose(am.norm(dim=1), torch.ones(3), atol=1e-5)
    assert attention_map(torch.randn(2, 7, 16), 2.0).shape == (2, 7)  # transformer tokens
    assert attention_loss(a, 3.0 * a, 2.0).item() < 1e-10  # scale-free
    assert attention_loss(a, torch.randn_like(a), 2.0).item() > 1e-4
    with pytest.raises(ConfigError):
        attention_map(torch.randn(2, 3), 2.0)


def test_nad_distils_on_the_last_stages_after_a_teacher(tiny_backdoor):
    d, _ = _run("nad", tiny_backdoor, betas=[100.0, 500.0])
    rep = d.report
    assert rep["layers"] == ["layer3", "layer4"]
    stages = [r["stage"] for r in rep["history"]]
    assert stages == ["teacher", "student", "student"]
    assert "at" not in rep["history"][0] and rep["history"][1]["at"] > 0
    d2, _ = _run("nad", tiny_backdoor, layers=["layer2.1"], betas=[10.0])
    assert d2.report["layers"] == ["layer2.1"]
    with pytest.raises(ConfigError, match="no layer"):
        _run("nad", tiny_backdoor, layers=["nope"], betas=[1.0])
    with pytest.raises(ConfigError, match="stages"):
        _run("nad", tiny_backdoor, betas=[1.0] * 5)


# --- MCR ----------------------------------------------------------------------------------------

def test_bezier_curve_end_points_are_the_given_models_exactly(tiny_backdoor):
    start = tiny_backdoor["model"]
    end = copy.deepcopy(start)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    curve = BezierCurve(start, end)
    with torch.no_grad():
        for m in curve.mid:
            m.add_(0.37)  # a non-trivial middle point
    for t, ref in ((0.0, start), (1.0, end)):
        got = dict(curve.point(t).named_parameters())
        assert all(torch.equal(got[n], p) for n, p in ref.named_parameters())
    mid = dict(curve.point(0.5).named_parameters())
    n, p0 = next(iter(start.named_parameters()))
    p1 = dict(end.named_parameters())[n]
    assert torch.allclose(mid[n], 0.25 * p0 + 0.5 * (0.5 * (p0 + p1) + 0.37) + 0.25 * p1, atol=1e-6)


def test_mcr_trains_the_middle_point_and_recomputes_batch_norm(tiny_backdoor):
    d, out = _run("mcr", tiny_backdoor, t=0.3)
    rep = d.report
    assert [r["stage"] for r in rep["history"]] == ["endpoint", "curve", "curve"]
    assert rep["t"] == 0.3 and rep["bn_recomputed"] and len(rep["curve_scan"]) == 11
    assert [s["t"] for s in rep["curve_scan"]][::5] == [0.0, 0.5, 1.0]
    start = tiny_backdoor["model"]
    assert not torch.equal(out.bn.running_mean, start.bn.running_mean)
    assert rep["n_trainable"] == sum(p.numel() for p in start.parameters())


# --- CLP ----------------------------------------------------------------------------------------

class _ConvNoBN(nn.Module):
    """conv_a (no BN) -> ReLU -> conv_b -> BN -> ReLU -> BN after a ReLU (not a conv's) -> head."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.conv_c = nn.Conv2d(16, 16, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv_a(x))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        x = self.bn_c(torch.relu(self.conv_c(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_clp_is_data_free_and_pairs_a_bn_only_with_the_conv_it_follows():
    torch.manual_seed(0)
    net = _ConvNoBN().eval()
    with torch.no_grad():
        net.conv_a.weight[3] *= 40  # an outlier channel without BN
        net.bn_b.weight[5] = 30.0  # an outlier through its BN scale
        net.bn_b.bias.normal_()  # non-zero, so zeroing a channel's bias shows
    pairs = conv_bn_pairs(net, torch.zeros(1, 3, 8, 8))
    assert pairs == {"conv_a": None, "conv_b": "bn_b", "conv_c": None}
    d = CLP(input_size=8)
    out = d.purify(net)  # no data at all
    assert d.report["pruned_channels"] == {"conv_a": [3], "bn_b": [5]}
    sd0, sd1 = net.state_dict(), out.state_dict()
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    assert changed == {"conv_a.weight", "conv_a.bias", "bn_b.weight", "bn_b.bias"}
    acts = {}
    for name in ("conv_a", "bn_b"):
        getattr(out, name).register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
    out(torch.rand(4, 3, 8, 8))
    assert acts["conv_a"][:, 3].abs().max() == 0 and acts["bn_b"][:, 5].abs().max() == 0
    assert acts["conv_a"][:, [0, 1, 2, 4]].abs().max() > 0
    lax = CLP(u=50.0, input_size=8)  # the threshold is relative to the layer's own spread
    lax.purify(net, None)
    assert lax.report["n_pruned"] == 0


def test_clp_on_the_backdoored_preact_resnet_without_data(tiny_backdoor):
    d = defenses.create("clp")
    d.purify(tiny_backdoor["model"], None, progress=False)
    scored = d.report["layers_scored"]
    assert scored["conv1"]["bn"] == "layer1.0.bn1"  # the stem feeds the first block's BN directly
    assert scored["layer1.0.conv1"]["bn"] == "layer1.0.bn2" and scored["layer1.0.conv2"]["bn"] is None


# --- ANP ----------------------------------------------------------------------------------------

def test_anp_masks_lie_in_unit_interval_and_pruning_zeroes_exactly_the_masked_neurons(tiny_backdoor):
    model = tiny_backdoor["model"]
    d = ANP(epochs=3, batch_size=32, threshold=0.9)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    masks = d.masks
    assert set(masks) == {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    allm = torch.cat(list(masks.values()))
    assert allm.min() >= 0 and allm.max() <= 1 and allm.min() < 0.9
    expected = {n: torch.nonzero(m < 0.9).flatten().tolist() for n, m in masks.items()}
    expected = {n: v for n, v in expected.items() if v}
    assert d.report["pruned_neurons"] == expected and d.report["n_pruned"] > 0
    sd0, sd1 = model.state_dict(), out.state_dict()
    for k in sd0:
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and layer in expected:
            idx = expected[layer]
            assert torch.all(sd1[k][idx] == 0)
            keep = [i for i in range(sd0[k].numel()) if i not in idx]
            assert torch.equal(sd1[k][keep], sd0[k][keep])
        else:
            assert torch.equal(sd0[k], sd1[k]), k


def test_anp_without_perturbation_and_on_a_model_without_norm_layers(tiny_backdoor):
    d = ANP(epochs=1, batch_size=32, eps=0.0)
    d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    assert d.report["history"][0]["adv_ce"] == 0
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="batch-norm"):
        ANP(epochs=1).purify(plain, tiny_backdoor["reserve"], progress=False)


# --- options ------------------------------------------------------------------------------------

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
