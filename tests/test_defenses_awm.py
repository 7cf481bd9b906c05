"""AWM, adversarial weight masking (defenses.awm)."""
import pytest
import torch
from torch import nn

from fipurify import defenses


def _same_architecture(out: nn.Module, model: nn.Module) -> None:
    assert type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())
    assert all(out.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


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
