"""Fine-Pruning (defenses.fineprune)."""
import torch

from fipurify import defenses
from fipurify.defenses.fineprune import mean_channel_activation
from fipurify.defenses.split import holdout_split


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
