"""FST (Feature Shift Tuning): head detection, the head shift at fixed norm, the defense."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.datasets.base import ArrayDataset
from fipurify.defenses.fst import FST, FSTConfig, head_cosine, linear_head
from fipurify.errors import ConfigError
from fipurify.metrics import evaluate

FAST = dict(epochs=3, batch_size=32)


def _head_weight(model):
    return model.classifier.weight.detach().clone()


def test_linear_head_is_the_last_linear_with_one_output_per_class():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    assert linear_head(net, 5) == ("3", net[3])  # the last of the two 5-output layers
    assert linear_head(net, 3) == ("5", net[5])
    with pytest.raises(ConfigError, match="no linear head"):
        linear_head(net, 7)


def test_model_without_a_linear_head_raises_config_error():
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 4 logits, no Linear
    data = ArrayDataset(np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 4)
    with pytest.raises(ConfigError, match="no linear head"):
        defenses.create("fst", **FAST).purify(conv_only, data, progress=False)


def test_fst_shifts_the_head_away_at_the_original_norm(tiny_backdoor):
    model = tiny_backdoor["model"]
    w0 = _head_weight(model)
    before_sd = copy.deepcopy(model.state_dict())
    seen = []
    d = defenses.create("fst", **FAST)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False, callback=seen.append)
    assert out is not model and type(out) is type(model) and not out.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_sd.items())  # input untouched
    assert all(not torch.equal(out.state_dict()[k], v) for k, v in before_sd.items()
               if k.startswith("classifier."))
    w = _head_weight(out)
    assert torch.allclose(w.norm(), w0.norm(), rtol=1e-5)  # the norm is held at the original's
    cos_fst = head_cosine(w, w0)
    # the alpha term pushes the head away: compared with the same tuning without it (alpha=0,
    # i.e. FT-init) and with plain fine-tuning (no re-initialisation), whose head stays put
    init_only = defenses.create("fst", **FAST, alpha=0.0)
    cos_init = head_cosine(_head_weight(init_only.purify(model, tiny_backdoor["reserve"], progress=False)), w0)
    plain = defenses.create("ft", **FAST, lr=0.01)
    cos_ft = head_cosine(_head_weight(plain.purify(model, tiny_backdoor["reserve"], progress=False)), w0)
    assert cos_fst < 0 and cos_fst < cos_init - 0.03 and cos_ft > 0.9
    assert cos_fst < d.report["head_cosine_init"]  # it moved further away during tuning
    rep = d.report
    assert rep["method"] == "fst" and rep["config"] == d.config.to_dict() and rep["head"] == "classifier"
    assert {"n_clean_train", "n_holdout", "n_trainable", "seconds", "history", "head_norm",
            "head_cosine"} <= set(rep)
    assert rep["head_cosine"][-1] == pytest.approx(cos_fst, abs=1e-6) and len(rep["head_cosine"]) == len(seen) == 3
    assert rep["head_norm"] == pytest.approx(float(w0.norm()), rel=1e-6)
    assert {"ce", "shift", "holdout_acc", "head_cosine"} <= set(seen[-1]) and seen[-1]["shift"] < 0
    json.dumps(rep)
    # the backdoor: lower ASR (here already the re-initialised head does much of it)
    test, bd = tiny_backdoor["test"], tiny_backdoor["backdoor_test"]
    assert evaluate(out, test, bd)["asr"] < evaluate(model, test, bd)["asr"] - 0.2


def test_registry_defaults_are_the_papers():
    d = defenses.create("fst", dataset="cifar10")  # a dataset preset holds FIP's schedule, not FST's
    c = d.config
    assert isinstance(d, FST) and isinstance(c, FSTConfig)
    assert (c.epochs, c.lr, c.momentum, c.weight_decay, c.batch_size) == (10, 0.01, 0.9, 0.0, 128)
    assert (c.schedule, c.alpha, c.augment, c.eta_r) == ("cosine", 0.2, True, 0.0)
    f = defenses.create("fisher-fst", dataset="cifar10").config
    assert f.eta_r == 1.0 and (f.epochs, f.lr, f.alpha, f.schedule) == (10, 0.01, 0.2, "cosine")


def _fisher_distance(model, before, fdiag, names):
    """sum_i F_i (theta_i - theta0_i)^2 over the named (body) parameters."""
    params = dict(model.named_parameters())
    return float(sum((fdiag[n] * (params[n].detach() - before[n]) ** 2).sum() for n in names))


def test_fisher_fst_keeps_the_body_where_the_clean_fisher_is_large_and_still_shifts_the_head(tiny_backdoor):
    """The anchor is an exact proximal step on every weight but the head: the larger eta_r, the smaller the
    Fisher-weighted move of the body; the head is still re-initialised and pushed away, at its norm."""
    from torch.utils.data import DataLoader

    from fipurify.curvature.fisher import diag_fisher

    model, reserve = tiny_backdoor["model"], tiny_backdoor["reserve"]
    body = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
    named = dict(model.named_parameters())
    fdiag = dict(zip(body, diag_fisher(model, DataLoader(reserve, batch_size=64),
                                       [named[n] for n in body], normalize="mean")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moves, cosines = {}, {}
    for eta in (0.0, 1.0, 1e4):
        d = defenses.create("fisher-fst" if eta else "fst", **FAST, **({"eta_r": eta} if eta else {}))
        out = d.purify(model, reserve, progress=False)
        moves[eta] = _fisher_distance(out, before, fdiag, body)
        cosines[eta] = head_cosine(_head_weight(out), before["classifier.weight"])
        assert torch.allclose(_head_weight(out).norm(), before["classifier.weight"].norm(), rtol=1e-5)
        if eta:
            assert "anchor" in d.report["history"][-1] and d.report["config"]["eta_r"] == eta
    assert moves[1e4] < 0.01 * moves[0.0] and moves[1.0] < moves[0.0], moves
    assert all(c < 0.5 for c in cosines.values()), cosines  # the head is replaced and shifted in every case


@pytest.mark.parametrize("bad", [dict(alpha=-0.1), dict(alpha=float("inf")), dict(lr=0.0), dict(eta_r=-1.0),
                                 dict(eta_r=float("nan")),
                                 dict(schedule="step"), dict(unknown=1)])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        defenses.create("fst", **bad)
