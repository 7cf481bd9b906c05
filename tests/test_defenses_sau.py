"""SAU (Shared Adversarial Unlearning): the shared-adversarial-example search and the defense."""
import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader

from fipurify import defenses
from fipurify.defenses.sau import SAU, SAUConfig, log_one_minus_prob, shared_adversarial_examples
from fipurify.errors import ConfigError
from fipurify.metrics import evaluate

FAST = dict(epochs=2, batch_size=32, lr=3e-4)  # 1e-4 (the paper's) needs more epochs here


def _batch(tiny, n=48):
    x, y = next(iter(DataLoader(tiny["reserve"], batch_size=n, shuffle=False)))
    return x, y


def _noisy_copy(model, scale=0.02, seed=3):
    """A second model close to ``model`` but not identical (its own adversarial examples)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return out


def test_shared_adversarial_examples_fool_both_models_towards_one_label(tiny_backdoor):
    reference = tiny_backdoor["model"]
    model = _noisy_copy(reference)
    model.train()  # the search must run in eval mode and restore the mode
    grads = [None if p.grad is None else p.grad.clone() for p in [*model.parameters(), *reference.parameters()]]
    x, y = _batch(tiny_backdoor)
    sae = shared_adversarial_examples(model, reference, x, y, eps=0.2, steps=5, step_size=0.2)
    assert model.training and not reference.training
    after = [p.grad for p in [*model.parameters(), *reference.parameters()]]  # no parameter gradient touched
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))
    delta = sae.x_adv - x
    assert float(delta.abs().max()) <= 0.2 + 1e-6 and float(delta.abs().max()) > 0.1  # the budget is used
    assert float(sae.x_adv.min()) >= 0 and float(sae.x_adv.max()) <= 1
    # recompute every claim independently
    model.eval()
    with torch.no_grad():
        pred, pred_ref = model(sae.x_adv).argmax(1), reference(sae.x_adv).argmax(1)
        clean_ref = reference(x).argmax(1)
    assert torch.equal(sae.ref_pred, pred_ref)
    assert torch.equal(sae.ref_fooled, (pred_ref != y) & (pred_ref != clean_ref))
    s = sae.shared
    assert int(s.sum()) >= len(x) // 4  # they exist here, and PGD finds many of them
    assert torch.equal(pred[s], pred_ref[s])  # both models give the same label ...
    assert bool((pred_ref[s] != y[s]).all() and (pred_ref[s] != clean_ref[s]).all())  # ... a wrong, new one
    assert torch.equal(s, sae.ref_fooled & (pred == pred_ref))


def test_no_shared_examples_when_the_models_can_never_agree(tiny_backdoor):
    """A model whose head is the reference's with the classes rotated (pred = ref + 1 mod C)
    can be fooled like the reference but never towards the same label: nothing is shared."""
    reference = tiny_backdoor["model"]
    rotated = copy.deepcopy(reference)
    with torch.no_grad():
        rotated.classifier.weight.copy_(reference.classifier.weight.roll(1, 0))
        rotated.classifier.bias.copy_(reference.classifier.bias.roll(1, 0))
    x, y = _batch(tiny_backdoor)
    sae = shared_adversarial_examples(rotated, reference, x, y)
    assert int(sae.ref_fooled.sum()) > 0 and int(sae.shared.sum()) == 0


def test_log_one_minus_prob_is_exact_and_finite_at_saturation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [60.0, 0.0, 0.0]])
    label = torch.tensor([0, 0])
    got = log_one_minus_prob(logits, label)
    assert torch.allclose(got[0], torch.log(1 - logits[0].softmax(0)[0]))
    assert torch.isfinite(got[1]) and float(got[1]) < -55  # 1 - p underflows in float32; the formula does not


def test_sau_returns_a_copy_lowers_asr_and_unlearns_shared_examples(tiny_backdoor):
    model = tiny_backdoor["model"]
    before_sd = copy.deepcopy(model.state_dict())
    seen = []
    d = defenses.create("sau", **FAST)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False, callback=seen.append)
    assert out is not model and type(out) is type(model) and not out.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_sd.items())  # input untouched
    assert any(not torch.equal(out.state_dict()[k], v) for k, v in before_sd.items())
    rep = d.report
    assert rep["method"] == "sau" and rep["config"] == d.config.to_dict()
    assert {"n_clean_train", "n_holdout", "n_trainable", "seconds", "history",
            "shared_share", "ref_fooled_share"} <= set(rep)
    assert set(rep["seconds"]) >= {"total", "setup", "train", "pgd"}
    assert len(rep["history"]) == len(seen) == 2 and len(rep["shared_share"]) == 2
    assert {"ce", "sar", "holdout_acc", "shared_share", "ref_fooled_share"} <= set(seen[-1])
    assert all(0 <= s <= f <= 1 for s, f in zip(rep["shared_share"], rep["ref_fooled_share"]))
    json.dumps(rep)
    # mechanism: with the shared-adversarial term the two models stop sharing adversarial
    # examples much faster than with the clean (and PGD) part alone (sar_weight=0)
    ablation = defenses.create("sau", **FAST, sar_weight=0.0)
    abl_out = ablation.purify(model, tiny_backdoor["reserve"], progress=False)
    sau_share, abl_share = rep["shared_share"][-1], ablation.report["shared_share"][-1]
    assert sau_share < 0.5 * rep["shared_share"][0] and sau_share < abl_share - 0.15
    # and it removes more of the backdoor than that ablation, keeping clean accuracy
    test, bd = tiny_backdoor["test"], tiny_backdoor["backdoor_test"]
    before, after, abl = evaluate(model, test, bd), evaluate(out, test, bd), evaluate(abl_out, test, bd)
    assert after["asr"] < abl["asr"] < before["asr"] + 1e-9 and after["asr"] < before["asr"] - 0.2
    assert after["acc"] >= before["acc"] - 0.1


def test_registry_defaults_are_the_papers():
    d = defenses.create("sau", dataset="cifar10")  # a dataset preset holds FIP's schedule, not SAU's
    c = d.config
    assert isinstance(d, SAU) and isinstance(c, SAUConfig)
    assert (c.epochs, c.lr, c.optimizer, c.batch_size, c.milestones) == (100, 1e-4, "adam", 256, ())
    assert (c.eps, c.pgd_steps, c.pgd_step_size, c.pgd_init) == (0.2, 5, 0.2, "max")
    assert (c.clean_weight, c.sar_weight, c.adv_weight, c.share_weight, c.at_weight) == (1, 1, 0.01, 1, 0)
    assert (c.bn_mode, c.augment) == ("eval", False)


@pytest.mark.parametrize("bad", [dict(eps=0.0), dict(eps=1.5), dict(pgd_steps=0), dict(pgd_step_size=-1.0),
                                 dict(pgd_init="gauss"), dict(sar_weight=-1.0), dict(optimizer="rmsprop"),
                                 dict(epochs=0), dict(unknown=1)])
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        defenses.create("sau", **bad)


def test_cli_purify_runs_sau_and_fst(tmp_path, monkeypatch, capsys):
    from fipurify.cli import main

    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
                 "--reserve", "0.1", "--quiet", "--out", str(model)]) == 0
    for method, key in [("sau", "shared_share"), ("fst", "head_cosine")]:
        out = tmp_path / f"{method}.safetensors"
        assert main(["purify", str(model), "--method", method, "--clean-size", "40", "--epochs", "1",
                     "--set", "batch_size=16", "--quiet", "--no-eval", "--out", str(out)]) == 0
        report = json.loads(out.with_suffix(".json").read_text())
        assert report["method"] == method and len(report[key]) == 1 and len(report["history"]) == 1
