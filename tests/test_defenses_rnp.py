"""RNP, reconstructive neuron pruning (defenses.rnp)."""
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses.rnp import batchnorm_layers


def _same_architecture(out: nn.Module, model: nn.Module) -> None:
    assert type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())
    assert all(out.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def test_rnp_masks_in_unit_interval_and_pruning_zeroes_exactly_the_masked_neurons(tiny_backdoor):
    model = tiny_backdoor["model"]
    d = defenses.create("rnp", epochs=4, recover_epochs=2, batch_size=32, clean_threshold=0.5,
                        prune_by="ratio", prune_ratio=0.1)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    _same_architecture(out, model)
    values = torch.cat(list(d.masks.values()))
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    n_prune = int(round(0.1 * len(values)))
    assert d.report["n_pruned"] == n_prune
    cut = torch.sort(values).values[n_prune - 1]
    bns = dict(batchnorm_layers(out))
    pruned = {(p["layer"], p["index"]) for p in d.report["pruned"]}
    for name, mk in d.masks.items():
        for i in range(len(mk)):
            w, b = bns[name].weight[i], bns[name].bias[i]
            if (name, i) in pruned:
                assert mk[i] <= cut and w == 0 and b == 0
            else:
                assert mk[i] >= cut
                assert w == model.state_dict()[f"{name}.weight"][i] and b == model.state_dict()[f"{name}.bias"][i]
    for k, v in model.state_dict().items():  # nothing but the pruned BN entries changed
        if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in d.masks):
            assert torch.equal(out.state_dict()[k], v), k
    # a pruned neuron's output is exactly zero
    name, idx = next(iter(pruned))
    seen = {}
    h = bns[name].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    out(tiny_backdoor["test"][0][0][None])
    h.remove()
    assert torch.count_nonzero(seen["out"][:, idx]) == 0
    # the unlearning stopped at the first epoch whose clean training accuracy fell to the threshold
    accs = [r["train_acc"] for r in d.report["history"] if r["phase"] == "unlearn"]
    assert all(a > 0.5 for a in accs[:-1])
    assert d.report["threshold_reached"] == (accs[-1] <= 0.5)


def test_rnp_threshold_mode_prunes_all_masks_at_or_below_it(tiny_backdoor):
    d = defenses.create("rnp", epochs=2, recover_epochs=1, batch_size=32, prune_threshold=0.95)
    out = d.purify(tiny_backdoor["model"], tiny_backdoor["reserve"], progress=False)
    expected = {(n, i) for n, mk in d.masks.items() for i in range(len(mk)) if mk[i] <= 0.95}
    assert {(p["layer"], p["index"]) for p in d.report["pruned"]} == expected
    bns = dict(batchnorm_layers(out))
    assert all(bns[n].weight[i] == 0 for n, i in expected)
