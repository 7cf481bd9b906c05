"""NAD, attention distillation (defenses.nad)."""
import pytest
import torch

from fipurify import defenses
from fipurify.defenses.nad import attention_loss, attention_map
from fipurify.errors import ConfigError
from baseline_settings import run_fast as _run


def test_attention_maps_are_normalised_and_the_loss_compares_them():
    a = torch.randn(3, 8, 5, 5)
    am = attention_map(a, 2.0)
    assert am.shape == (3, 25) and torch.allclose(am.norm(dim=1), torch.ones(3), atol=1e-5)
    assert attention_map(torch.randn(2, 7, 16), 2.0).shape == (2, 7)  # transformer tokens
    assert attention_loss(a, 3.0 * a, 2.0).item() < 1e-10  # scale-free
    assert attention_loss(a, torch.randn_like(a), 2.0).item() > 1e-4
    with pytest.raises(ConfigError):
        attention_map(torch.randn(2, 3), 2.0)


def test_nad_distils_on_the_last_stages_after_a_teacher(tiny_backdoor):
    d, _ = _run("nad", tiny_backdoor, betas=[100.0, 500.0])
    rep = d.report
    assert rep["layers"] == ["layer3", "layer4"]
    stages = [r["stage"] for r in rep["history"]]
    assert stages == ["teacher", "student", "student"]
    assert "at" not in rep["history"][0] and rep["history"][1]["at"] > 0
    d2, _ = _run("nad", tiny_backdoor, layers=["layer2.1"], betas=[10.0])
    assert d2.report["layers"] == ["layer2.1"]
    with pytest.raises(ConfigError, match="no layer"):
        _run("nad", tiny_backdoor, layers=["nope"], betas=[1.0])
    with pytest.raises(ConfigError, match="stages"):
        _run("nad", tiny_backdoor, betas=[1.0] * 5)
