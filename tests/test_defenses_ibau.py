"""I-BAU (defenses.ibau)."""
import pytest
import torch
from torch import nn

from fipurify import defenses


def _same_architecture(out: nn.Module, model: nn.Module) -> None:
    assert type(out) is type(model)
    assert list(out.state_dict()) == list(model.state_dict())
    assert all(out.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def test_ibau_returns_same_architecture_and_bounds_the_perturbation(tiny_backdoor):
    model = tiny_backdoor["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = defenses.create("i-bau", epochs=2, batch_size=32, pert_norm=0.5, pert_steps=2, fixed_point_steps=2,
                        perturb_share=0.5)
    out = d.purify(model, tiny_backdoor["reserve"], progress=False)
    _same_architecture(out, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # input untouched
    assert any(not torch.equal(out.state_dict()[k], v) for k, v in before.items())
    norms = d.report["perturbation_norms"]
    assert len(norms) == 2 and max(norms) <= 0.5 * (1 + 1e-5)
    assert max(norms) > 0.4  # pert_lr 10 drives it to the bound: the projection is active
    assert float(d.perturbation.norm()) <= 0.5 * (1 + 1e-5)
    rec = d.report["history"][-1]
    assert {"ce", "hyper", "holdout_acc", "pert_norm"} <= set(rec) and rec["hyper"] != 0
    assert {"method", "config", "n_clean_train", "n_holdout", "n_trainable", "seconds", "history"} <= set(d.report)
    assert set(d.report["seconds"]) >= {"total", "setup", "train"}


def test_ibau_hypergradient_matches_finite_differences_of_the_minimax_objective():
    # Toy problem with a strongly convex inner problem: the surrogate's gradient must equal
    # d/dtheta L_out(delta*(theta), theta), with delta* the inner minimiser.
    from fipurify.defenses.ibau import IBAUConfig, implicit_terms
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = (0.5 + 0.05 * torch.randn(8, 3, 2, 2)).double()
    y = torch.randint(0, 3, (8,))
    cfg = IBAUConfig(pert_reg=5.0, inner_lr=0.05, fixed_point_steps=200)

    def inner_min() -> torch.Tensor:
        d = torch.zeros(1, 3, 2, 2, dtype=torch.double, requires_grad=True)
        for _ in range(2000):
            loss = -nn.functional.cross_entropy(model(x + d), y) + cfg.pert_reg * d.pow(2).sum()
            (g,) = torch.autograd.grad(loss, [d])
            d = (d - 0.05 * g).detach().requires_grad_(True)
        return d.detach()

    everyone = torch.arange(8)
    delta = inner_min()
    assert (x + delta).min() > 0 and (x + delta).max() < 1  # the clamp is inactive
    terms = implicit_terms(model, x, y, delta, everyone, cfg)
    plain_grad = torch.autograd.grad(terms["ce"], [model[1].weight], retain_graph=True)[0]
    grad = torch.autograd.grad(terms["ce"] + terms["hyper"], [model[1].weight])[0]
    direction = torch.randn_like(grad)
    eps = 1e-4
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            model[1].weight.add_(sign * eps * direction)
        d_star = inner_min()
        with torch.no_grad():
            vals.append(float(nn.functional.cross_entropy(model(x + d_star), y)))
        with torch.no_grad():
            model[1].weight.sub_(sign * eps * direction)
    fd = (vals[0] - vals[1]) / (2 * eps)
    plain = float((plain_grad * direction).sum())
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=1e-3, abs=1e-7)
    assert abs(plain - fd) > 1e-3 * abs(fd)  # the implicit term matters here
