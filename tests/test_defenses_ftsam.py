"""FT-SAM (defenses.ftsam) and its SAM optimiser (defenses.sam)."""
import pytest
import torch
from torch import nn

from fipurify import defenses
from fipurify.defenses.sam import SAM
from baseline_settings import run_fast as _run


def _toy_grads():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return net, (lambda: nn.functional.cross_entropy(net(x), y))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_has_norm_rho_and_steps_with_the_gradient_there(adaptive):
    net, loss = _toy_grads()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]
    sam = SAM(params, torch.optim.SGD(params, lr=0.5), rho=0.3, adaptive=adaptive)
    loss().backward()
    sam.first_step()
    e = [p.detach() - w for p, w in zip(params, w0)]
    if adaptive:  # ASAM: the perturbation scaled by 1/|w| has norm rho
        e = [d[w != 0] / w[w != 0].abs() for d, w in zip(e, w0)]
    assert torch.linalg.vector_norm(torch.cat([d.flatten() for d in e])).item() == pytest.approx(0.3, rel=1e-5)
    sam.zero_grad()
    loss().backward()
    g_at_e = [p.grad.clone() for p in params]
    sam.second_step()
    for p, w, g in zip(params, w0, g_at_e):  # back at w, then one SGD step with the perturbed gradient
        assert torch.allclose(p.detach(), w - 0.5 * g, atol=1e-7)
    with pytest.raises(RuntimeError):
        sam.second_step()


def test_ftsam_runs_two_passes_with_cosine_schedule(tiny_backdoor):
    d, _ = _run("ft-sam", tiny_backdoor)
    hist = d.report["history"]
    assert {"ce", "sam_ce"} <= set(hist[0]) and hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
