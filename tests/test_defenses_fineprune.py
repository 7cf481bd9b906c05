"""Fine-Pruning (defenses.fineprune)."""
import torch

from fipurify import defenses
from fipurify.defenses.fineprune import mean_channel_activation
from fipurify.defenses.split import holdout_split
from baseline_settings import run_fast as _run


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
