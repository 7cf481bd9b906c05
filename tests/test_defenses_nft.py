"""NFT (Karim et al., ECCV 2024): BN-scale masks trained on MixUp data, folded into a plain copy."""
import copy
import json

import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses import nft as nft_module
from fipurify.defenses.nft import NFT, lower_bounds, mixup
from fipurify.defenses.rnp import batchnorm_layers
from fipurify.errors import ConfigError

FAST = dict(epochs=2, steps_per_epoch=4, batch_size=32)


@pytest.fixture(scope="module")
def nft_run(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = copy.deepcopy(model.state_dict())
    d = defenses.create("nft", **FAST)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    return {"model": model, "before": before, "defense": d, "out": out}


def test_paper_defaults_and_registry():
    cfg = defenses.create("nft", dataset="cifar10").config  # FIP's preset does not replace NFT's schedule
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.lr, cfg.momentum, cfg.min_lr) == (5, 200, 0.05, 0.95, 0.02)
    assert (cfg.mixup_alpha, cfg.eta, cfg.mask_alpha, cfg.mask_beta, cfg.batch_size) == (1.0, 0.001, 0.8, 0.5, 128)


def test_only_the_masks_train_and_fold_into_bn_scales(nft_run):
    before, out, d = nft_run["before"], nft_run["out"], nft_run["defense"]
    assert type(out) is type(nft_run["model"]) and out is not nft_run["model"]
    assert all(torch.equal(nft_run["model"].state_dict()[k], v) for k, v in before.items())  # input untouched
    bn_weights = {f"{name}.weight" for name, _ in batchnorm_layers(out)}
    params = dict(out.named_parameters())
    for key, value in params.items():
        if key in bn_weights:  # gamma <- m * gamma, nothing else
            mask = d.masks[key[:-len(".weight")]]
            assert torch.allclose(value.detach(), before[key] * mask, atol=1e-7)
        else:
            assert torch.equal(value.detach(), before[key]), key
    assert any(not torch.equal(params[k].detach(), before[k]) for k in bn_weights)  # the masks did move
    assert d.report["n_trainable"] == sum(len(m) for m in d.masks.values())
    assert not out.training and all(p.requires_grad for p in out.parameters())


def test_masks_stay_within_their_layerwise_range(nft_run):
    masks = list(nft_run["defense"].masks.values())
    for mask, low in zip(masks, lower_bounds(len(masks), 0.8, 0.5)):
        assert float(mask.min()) >= low - 1e-7 and float(mask.max()) <= 1.0
    assert lower_bounds(3, 0.8, 0.5) == pytest.approx([0.8 * 2.718281828 ** -0.5, 0.8 * 2.718281828 ** -1.0,
                                                       0.8 * 2.718281828 ** -1.5])


def test_bn_statistics_stay_with_bn_mode_eval(tiny_backdoor):
    model = tiny_backdoor["model"]
    d = defenses.create("nft", **FAST, bn_mode="eval")
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    buffers = dict(model.named_buffers())
    assert all(torch.equal(b, buffers[k]) for k, b in out.named_buffers())


def test_mixup_really_mixes_images_and_labels():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 5, 5)
    y = torch.arange(8)
    xm, soft, lam = mixup(x, y, 8, 1.0, gen)
    assert 0 < lam < 1
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).sum() >= 6  # soft labels (an image drawn as its own partner stays one-hot)
    assert all(soft[i, y[i]] >= lam - 1e-6 for i in range(8))
    partners = (xm - lam * x) / (1 - lam)  # each row is some image of the batch
    for p, s in zip(partners, soft):
        j = int(torch.argmin(((x - p) ** 2).flatten(1).sum(1)))
        assert torch.allclose(p, x[j], atol=1e-5)
    assert not torch.allclose(xm, x)


def test_purify_trains_on_mixed_batches(tiny_backdoor, monkeypatch):
    lams = []

    def spy(*args, **kwargs):
        out = mixup(*args, **kwargs)
        lams.append(out[2])
        return out

    monkeypatch.setattr(nft_module, "mixup", spy)
    d = defenses.create("nft", epochs=1, steps_per_epoch=3, batch_size=16)
    d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    assert len(lams) == 3 and all(0 < lam < 1 for lam in lams)
    assert d.report["mixup_lambda_mean"] == pytest.approx(sum(lams) / 3)


def test_report_fields(nft_run):
    rep = nft_run["defense"].report
    assert rep["method"] == "nft" and rep["n_holdout"] > 0 and len(rep["history"]) == FAST["epochs"]
    assert {"mix_ce", "mask_reg", "holdout_acc", "lr"} <= set(rep["history"][0])
    assert rep["history"][-1]["lr"] < rep["history"][0]["lr"]  # cosine decay toward min_lr
    assert rep["n_masks"] == sum(len(m) for m in nft_run["defense"].masks.values())
    assert 0 <= rep["mask_sparsity"] <= 1 and rep["mask_min"] <= rep["mask_mean"] <= 1
    json.dumps(rep)


def test_a_model_without_batch_norm_gives_one_clear_error(tiny_backdoor):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 4))
    with pytest.raises(ConfigError, match="no .*batch-norm layer") as err:
        NFT(**FAST).purify(net, tiny_backdoor["reserve"], progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [dict(eta=-1.0), dict(mixup_alpha=0.0), dict(mask_alpha=1.5), dict(min_lr=1.0),
                                 dict(mask_beta=-0.1), dict(epochs=0)])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        defenses.create("nft", **bad)
