"""The shared fine-tuning loop (defenses.loop)."""
import torch
from torch import nn

from fipurify import defenses, models
from fipurify.defenses.loop import finetune


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
