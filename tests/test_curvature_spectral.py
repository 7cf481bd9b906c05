"""f-FIP spectral re-parametrisation: exactness at delta = 0, training only delta, folding."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fipurify.curvature.spectral import (SpectralShift, attach_spectral, fold_spectral,
                                        spectral_layers, spectral_parameters)
from fipurify.errors import ConfigError


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, groups=2, bias=False)  # grouped, no bias
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.head(self.conv2(x).flatten(1))


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 7, 3)
        self.fc = nn.Linear(7 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


CASES = [
    (lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3)), (8, 6)),
    (Net2d, (8, 3, 5, 5)),
    (Net1d, (8, 2, 6)),
    (lambda: nn.Sequential(nn.Conv3d(2, 3, 2, groups=1), nn.Flatten(), nn.Linear(3 * 8, 2)),
     (4, 2, 3, 3, 3)),
]


def build(case, seed=0):
    torch.manual_seed(seed)
    make, shape = case
    model = make().eval()
    return model, torch.randn(*shape)


@pytest.mark.parametrize("case", CASES)
def test_zero_shift_reproduces_the_model(case):
    model, x = build(case)
    before = model(x).detach()
    keys = list(model.state_dict())
    layers = attach_spectral(model)
    assert len(layers) == sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
                              for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    for _, shift in layers:
        assert torch.all(shift.delta == 0)
    # fold at delta = 0 gives back the same function and the same keys, in order
    fold_spectral(model)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)


def test_rank_is_min_of_out_and_rest_for_grouped_conv():
    model, _ = build(CASES[1])
    layers = dict(attach_spectral(model))
    assert layers["conv1"].delta.shape == (6,)       # 6 x 27
    assert layers["conv2"].delta.shape == (4,)       # 4 x (3*9) with groups=2
    assert layers["head"].delta.shape == (5,)        # 5 x 36
    assert layers["conv2"].Vh.shape == (4, 27)


def test_only_deltas_train_and_original_is_not_kept():
    model, x = build(CASES[1])
    layers = attach_spectral(model)
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations["weight"]
            assert not plist.original.requires_grad and plist.original.numel() == 0
            trainable = [n for n, p in plist.named_parameters() if p.requires_grad]
            assert trainable == ["0.delta"]
            assert all(not b.requires_grad for b in plist.buffers())
    assert spectral_parameters(model) == [s.delta for _, s in layers]
    assert [n for n, _ in spectral_layers(model)] == ["conv1", "conv2", "head"]

    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("delta")}
    out0 = model(x).detach()
    opt = torch.optim.SGD(spectral_parameters(model), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 5)
    loss.backward()
    for _, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            assert module.parametrizations["weight"].original.grad is None
    opt.step()
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert all(torch.any(d != 0) for d in spectral_parameters(model))
    assert not torch.allclose(model(x), out0)


@pytest.mark.parametrize("case", CASES)
def test_fold_gives_plain_model_with_same_function_and_keys(case):
    model, x = build(case)
    keys = list(model.state_dict())
    weight_ids = {n: id(m.weight) for n, m in model.named_modules() if hasattr(m, "weight")}
    attach_spectral(model)
    with torch.no_grad():
        for d in spectral_parameters(model):
            d.normal_(0, 0.3)
    shifted = model(x).detach()
    assert fold_spectral(model) is model
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, SpectralShift) for m in model.modules())
    torch.testing.assert_close(model(x), shifted, atol=1e-5, rtol=1e-5)
    for n, m in model.named_modules():
        if n in weight_ids:
            assert type(m.weight) is nn.Parameter and m.weight.requires_grad
            assert id(m.weight) == weight_ids[n]  # optimiser references stay valid
            assert type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d)
    assert all(p.numel() > 0 for p in model.parameters())


def test_fold_restores_frozen_flag():
    model, _ = build(CASES[0])
    model[0].weight.requires_grad_(False)
    attach_spectral(model)
    fold_spectral(model)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_relu_clamps_negative_singular_values():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    ((_, shift),) = attach_spectral(nn.Sequential(lin))
    with torch.no_grad():
        shift.delta.copy_(-shift.s)
        shift.delta[0] = 0.0
        shift.delta[1] = -2 * shift.s[1] - 1.0  # s + delta < 0: clamped to 0, not negated
    w = lin.weight.detach()
    expected = shift.s[0] * torch.outer(shift.U[:, 0], shift.Vh[0])
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
    assert torch.linalg.matrix_rank(w) == 1


def test_assigning_a_weight_redecomposes_it():
    torch.manual_seed(0)
    lin = nn.Linear(3, 7)
    ((_, shift),) = attach_spectral(nn.Sequential(lin))
    with torch.no_grad():
        shift.delta.fill_(0.5)
    new = torch.randn(7, 3)
    lin.weight = new
    assert torch.all(shift.delta == 0)
    torch.testing.assert_close(lin.weight, new, atol=1e-6, rtol=1e-6)


def test_include_exclude_and_min_size():
    model, _ = build(CASES[1])
    names = [n for n, _ in attach_spectral(model, include="conv*", exclude=["conv2"])]
    assert names == ["conv1"]
    assert not parametrize.is_parametrized(model.conv2)
    with pytest.raises(ConfigError, match="already"):
        attach_spectral(model, include="conv1")

    model, _ = build(CASES[1])
    names = [n for n, _ in attach_spectral(model, include=lambda n, m: isinstance(m, nn.Linear))]
    assert names == ["head"]


def test_min_size_skips_small_weights():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 40))  # 6 and 120 elements
    assert [n for n, _ in attach_spectral(model, min_size=100)] == ["1"]


def test_no_matching_layer_raises():
    with pytest.raises(ConfigError, match="no Conv or Linear"):
        attach_spectral(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    model, _ = build(CASES[0])
    with pytest.raises(ConfigError, match="no Conv or Linear"):
        attach_spectral(model, exclude="*")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
