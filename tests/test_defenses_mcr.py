"""MCR, mode connectivity repair (defenses.mcr)."""
import copy

import torch

from fipurify import defenses
from fipurify.defenses.mcr import BezierCurve
from baseline_settings import run_fast as _run


def test_bezier_curve_end_points_are_the_given_models_exactly(tiny_backdoor):
    start = tiny_backdoor["model"]
    end = copy.deepcopy(start)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    curve = BezierCurve(start, end)
    with torch.no_grad():
        for m in curve.mid:
            m.add_(0.37)  # a non-trivial middle point
    for t, ref in ((0.0, start), (1.0, end)):
        got = dict(curve.point(t).named_parameters())
        assert all(torch.equal(got[n], p) for n, p in ref.named_parameters())
    mid = dict(curve.point(0.5).named_parameters())
    n, p0 = next(iter(start.named_parameters()))
    p1 = dict(end.named_parameters())[n]
    assert torch.allclose(mid[n], 0.25 * p0 + 0.5 * (0.5 * (p0 + p1) + 0.37) + 0.25 * p1, atol=1e-6)


def test_mcr_trains_the_middle_point_and_recomputes_batch_norm(tiny_backdoor):
    d, out = _run("mcr", tiny_backdoor, t=0.3)
    rep = d.report
    assert [r["stage"] for r in rep["history"]] == ["endpoint", "curve", "curve"]
    assert rep["t"] == 0.3 and rep["bn_recomputed"] and len(rep["curve_scan"]) == 11
    assert [s["t"] for s in rep["curve_scan"]][::5] == [0.0, 0.5, 1.0]
    start = tiny_backdoor["model"]
    assert not torch.equal(out.bn.running_mean, start.bn.running_mean)
    assert rep["n_trainable"] == sum(p.numel() for p in start.parameters())
