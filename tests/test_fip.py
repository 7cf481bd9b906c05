import copy

import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.datasets.synthetic import synthetic
from fipurify.errors import ConfigError, DataError


def _model_and_data():
    from fipurify import models
    torch.manual_seed(0)
    m = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    return m.eval(), synthetic(n=48, num_classes=4, image_size=16, split="reserve")


def test_ffip_changes_only_singular_values():
    model, data = _model_and_data()
    before = copy.deepcopy(model.state_dict())
    d = defenses.create("ffip", epochs=2, lr=0.05, batch_size=16, fisher_every=1, bn_mode="eval")
    out = d.purify(model, data, progress=False)
    after = out.state_dict()
    assert list(after) == list(before)                      # same keys, same order: a plain model
    assert not any("parametrizations" in k for k in after)
    assert torch.equal(model.state_dict()["classifier.weight"], before["classifier.weight"])  # input untouched
    changed = 0
    for name, mod in out.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w0 = before[f"{name}.weight"].flatten(1).double()
            w1 = after[f"{name}.weight"].flatten(1).double()
            u, s, vh = torch.linalg.svd(w0, full_matrices=False)
            core = u.T @ w1 @ vh.T                            # diagonal iff only singular values moved
            off = core - torch.diag(torch.diagonal(core))
            assert off.abs().max() < 1e-4 * s.max()
            changed += int(not torch.allclose(w0, w1))
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
            assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])
    assert changed > 0
    rep = d.report
    assert rep["n_trainable"] < sum(p.numel() for p in model.parameters()) / 20
    assert rep["history"][0]["trf"] > 0 and "lr" in rep["history"][0]
    assert set(rep["seconds"]) >= {"total", "setup", "fisher_diag", "train"}


def test_proximal_anchor_step_is_the_exact_minimiser():
    model, data = _model_and_data()
    from fipurify.defenses.fisher import diag_fisher

    d = defenses.create("fip", epochs=1, lr=0.1, eta_f=0.0, eta_r=1e6, batch_size=16, momentum=0.0,
                        holdout=0.0, augment=False)
    out = d.purify(model, data, progress=False)
    # An enormous eta_r pins every parameter with clean Fisher information to its anchor (no
    # divergence), where a plain gradient step would explode. Each step shrinks the distance to
    # the anchor by 1 / (1 + lr * eta_r * F), so only entries with F ~ 0 may move.
    fdiag = diag_fisher(model, data, [model.classifier.weight], normalize="mean")[0]
    moved = (out.state_dict()["classifier.weight"] - model.state_dict()["classifier.weight"]).abs()
    important = fdiag > 1e-2
    assert important.sum() > 0.5 * fdiag.numel()
    assert moved[important].max() < 1e-5
    assert moved[~important].max() > moved[important].max()
    with pytest.raises(defenses.PurificationDiverged):
        defenses.create("fip", epochs=8, lr=0.1, eta_f=0.0, eta_r=1e6, batch_size=16, momentum=0.0,
                        anchor_update="gradient").purify(model, data, progress=False)


def test_weights_space_trains_everything_and_ft_has_no_penalties():
    model, data = _model_and_data()
    d = defenses.create("ft", epochs=1, lr=0.05, batch_size=16)
    out = d.purify(model, data, progress=False)
    assert set(d.report["history"][0]) >= {"ce", "holdout_acc"} and "trf" not in d.report["history"][0]
    assert not torch.equal(out.state_dict()["layer1.0.conv1.weight"], model.state_dict()["layer1.0.conv1.weight"])
    assert d.report["method"] == "ft"


def test_bad_input_is_refused():
    model, data = _model_and_data()
    with pytest.raises(DataError, match="empty"):
        defenses.purify(model, data.subset([]), progress=False)
    with pytest.raises(DataError, match="at least 10"):
        defenses.purify(model, data.subset(range(5)), progress=False)
    with pytest.raises(DataError, match="class count mismatch"):
        defenses.purify(model, synthetic(n=20, num_classes=3, image_size=16), progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        defenses.create("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        defenses.create("ffip", bogus=1)
    with pytest.raises(ConfigError, match="eta_f"):
        defenses.create("ffip", eta_f=-1)
    no_layers = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises((ConfigError, DataError)):
        defenses.purify(no_layers, data, progress=False)


class _NaNAfterFirst(torch.utils.data.Dataset):
    """Clean images, except that every image but the first is NaN (a corrupt clean set)."""

    def __init__(self, base):
        self.base, self.num_classes = base, base.num_classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x if i == 0 else torch.full_like(x, float("nan"))), y


def test_nan_loss_stops_with_a_message():
    model, data = _model_and_data()
    with pytest.raises(defenses.PurificationDiverged, match="lower lr"):
        defenses.create("ft", epochs=1, batch_size=16).purify(model, _NaNAfterFirst(data), progress=False)


def _purify_and_evaluate(tiny_backdoor, method: str, **opts):
    from fipurify.metrics import evaluate
    purified = defenses.create(method, epochs=20, augment=False, **opts).purify(
        tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    return evaluate(purified, tiny_backdoor["test"], tiny_backdoor["backdoor_test"])


def test_ffip_keeps_clean_accuracy_on_a_tiny_backdoored_model(tiny_backdoor):
    before = tiny_backdoor["history"][-1]
    after = _purify_and_evaluate(tiny_backdoor, "ffip")
    assert before["asr"] >= 0.9
    assert after["acc"] >= before["acc"] - 0.10


@pytest.mark.xfail(strict=True, reason="negative finding: with the paper's objective and settings f-FIP does not "
                   "remove the backdoor at small scale (docs/fip-calibration.md); strict, so a fix shows up")
def test_ffip_removes_the_backdoor_of_a_tiny_model(tiny_backdoor):
    # The end-to-end target: ASR from >= 90 % to <= 20 % with ACC drop <= 10 points.
    before = tiny_backdoor["history"][-1]
    after = _purify_and_evaluate(tiny_backdoor, "ffip")
    assert before["asr"] >= 0.9
    assert after["asr"] <= 0.2 and after["acc"] >= before["acc"] - 0.10
