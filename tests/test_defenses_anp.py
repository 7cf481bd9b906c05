"""ANP, adversarial neuron pruning (defenses.anp)."""
import pytest
import torch
from torch import nn

from fipurify.defenses.anp import ANP
from fipurify.errors import ConfigError


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
