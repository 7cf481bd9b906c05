"""Fisher quantities: estimators against brute force, gradients against finite differences."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fipurify.curvature.fisher import diag_fisher, fisher_anchor_loss, fisher_trace, snapshot
from fipurify.curvature.spectral import attach_spectral, spectral_parameters
from fipurify.errors import ConfigError, DataError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run thousands of tiny ops; on a loaded machine, OpenMP threads waiting on
    each other made softmax on an 8 x 3 tensor take ~8 ms instead of ~0.01 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def conv_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def warm_bn(model, x):
    """Give BatchNorm non-trivial running statistics (and bring model back to train mode)."""
    model.train()
    with torch.no_grad():
        model(x * 2 + 0.5)


def sq_norm(grads):
    return sum(g.pow(2).sum() for g in grads)


def brute_trace(model, x, params, labels=None):
    """Loop over examples (and classes): mean_i sum_c p(c|x_i) ||grad log p(c|x_i)||^2,
    or with fixed ``labels`` mean_i ||grad log p(y_i|x_i)||^2. Model evaluated in eval mode."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i:i + 1]), -1)[0]
        if labels is None:
            for c in range(len(logp)):
                g = torch.autograd.grad(logp[c], params, retain_graph=True)
                total += logp[c].exp().item() * sq_norm(g).item()
        else:
            g = torch.autograd.grad(logp[int(labels[i])], params)
            total += sq_norm(g).item()
    model.train(was)
    return total / len(x)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- exact values
def test_exact_expected_matches_brute_force_mlp():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    got = fisher_trace(model, x, params, "exact-expected")
    assert got.item() == pytest.approx(brute_trace(model, x, params), rel=1e-10)
    # sub_batch takes the leading examples only
    got4 = fisher_trace(model, x, params, "exact-expected", sub_batch=4, chunk_size=3)
    assert got4.item() == pytest.approx(brute_trace(model, x[:4], params), rel=1e-10)


def test_exact_expected_conv_bn_uses_running_stats_and_restores_mode():
    model, x = conv_bn(), torch.randn(8, 2, 5, 5, dtype=torch.float64)
    warm_bn(model, x)
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    params = dict(model.named_parameters())
    got = fisher_trace(model, x, params, "exact-expected")
    assert model.training and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert got.item() == pytest.approx(brute_trace(model, x, list(params.values())), rel=1e-10)


def test_exact_expected_wrt_spectral_deltas_matches_brute_force():
    model, x = conv_bn(), torch.randn(6, 2, 5, 5, dtype=torch.float64)
    warm_bn(model, x)
    attach_spectral(model)
    deltas = spectral_parameters(model)
    with torch.no_grad():
        for d in deltas:
            d.normal_(0, 0.1)
    got = fisher_trace(model, x, deltas, "exact-expected")
    assert got.item() == pytest.approx(brute_trace(model, x, deltas), rel=1e-10)


def test_empirical_matches_brute_force_with_true_labels():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    params = list(model.parameters())
    got = fisher_trace(model, x, params, "empirical", y=y)
    assert got.item() == pytest.approx(brute_trace(model, x, params, labels=y), rel=1e-10)


def test_sampled_is_batch_gradient_norm_times_batch_size():
    """One draw of 'sampled' is B * ||mean_i grad CE(x_i, y_hat_i)||^2 = (1/B)||sum_i g_i||^2."""
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    got = fisher_trace(model, x, params, "sampled", generator=seeded(3))
    with torch.no_grad():
        y_hat = torch.multinomial(torch.softmax(model(x), -1), 1, generator=seeded(3))[:, 0]
    per_example = [torch.autograd.grad(-torch.log_softmax(model(x[i:i + 1]), -1)[0, y_hat[i]],
                                       params) for i in range(len(x))]
    summed = [sum(gs) for gs in zip(*per_example)]
    assert got.item() == pytest.approx(sq_norm(summed).item() / len(x), rel=1e-10)


# ----------------------------------------------------------------------------- unbiasedness
def test_exact_with_sampled_labels_is_unbiased():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    truth = fisher_trace(model, x, params, "exact-expected", create_graph=False).item()
    xr = x.repeat(100, 1)  # each call: 100 label draws per example, 800 per-example gradients
    means = torch.tensor([fisher_trace(model, xr, params, "exact", create_graph=False,
                                       sub_batch=len(xr), generator=seeded(i)).item()
                          for i in range(20)])
    mean, se = means.mean().item(), means.std().item() / math.sqrt(len(means))
    assert se < 0.02 * truth
    assert abs(mean - truth) < 4 * se


def test_sampled_estimator_is_unbiased_in_eval_mode():
    """Cross terms g_i . g_j have zero mean (a score has zero mean), so B*||g_mean||^2 is an
    unbiased per-example trace estimate when examples do not interact."""
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    truth = fisher_trace(model, x, params, "exact-expected", create_graph=False).item()
    gen = seeded(0)
    draws = torch.tensor([fisher_trace(model, x, params, "sampled", create_graph=False,
                                       generator=gen).item() for _ in range(800)])
    mean, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert se < 0.05 * truth  # the test has power
    assert abs(mean - truth) < 4 * se
    # the un-rescaled squared batch gradient would be B times too small
    assert abs(mean / len(x) - truth) > 10 * se


# ----------------------------------------------------------------------------- gradients
def central_differences(fn, params, eps=1e-6):
    out = []
    with torch.no_grad():
        for p in params:
            g = torch.zeros_like(p)
            flat, gflat = p.view(-1), g.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = fn().item()
                flat[j] = old - eps
                down = fn().item()
                flat[j] = old
                gflat[j] = (up - down) / (2 * eps)
            out.append(g)
    return out


@pytest.mark.parametrize("estimator", ["exact-expected", "sampled", "exact"])
def test_gradient_matches_finite_differences(estimator):
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())

    def value():
        return fisher_trace(model, x, params, estimator, generator=seeded(11))

    auto = torch.autograd.grad(value(), params)
    numeric = central_differences(value, params)
    for a, n in zip(auto, numeric):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-8)
    assert sq_norm(auto) > 0


def test_gradient_wrt_deltas_matches_finite_differences():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    attach_spectral(model)
    deltas = spectral_parameters(model)

    def value():
        return fisher_trace(model, x, deltas, "exact-expected")

    auto = torch.autograd.grad(value(), deltas)
    for a, n in zip(auto, central_differences(value, deltas)):
        torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-8)


def test_create_graph_false_is_detached_and_equal():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    for est in ["exact-expected", "exact", "sampled"]:
        a = fisher_trace(model, x, params, est, generator=seeded(1))
        b = fisher_trace(model, x, params, est, create_graph=False, generator=seeded(1))
        assert a.requires_grad and not b.requires_grad
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert all(p.grad is None for p in params)


def test_sampled_reuses_given_logits():
    model, x = mlp(), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    a = fisher_trace(model, x, params, "sampled", generator=seeded(5))
    b = fisher_trace(model, None, params, "sampled", generator=seeded(5), logits=model(x))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_fisher_trace_bad_input():
    model, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    params = list(model.parameters())
    with pytest.raises(ConfigError):
        fisher_trace(model, x, params, "hutchinson")
    with pytest.raises(ConfigError):
        fisher_trace(model, x, params, "empirical")
    with pytest.raises(ConfigError):
        fisher_trace(model, x, [torch.zeros(3, requires_grad=True)], "exact")
    with pytest.raises(ConfigError):
        fisher_trace(model, x, [], "sampled")
    with pytest.raises(DataError):
        fisher_trace(model, x[:0], params, "exact")


# ----------------------------------------------------------------------------- diag(F_bar)
def brute_diag(model, xs, ys, params):
    model.eval()
    sums = [torch.zeros_like(p) for p in params]
    for xi, yi in zip(xs, ys):
        logp = torch.log_softmax(model(xi[None]), -1)[0, yi]
        for s, g in zip(sums, torch.autograd.grad(logp, params)):
            s += g.pow(2)
    return [s / len(xs) for s in sums]


def test_diag_fisher_matches_brute_force_and_leaves_model_alone():
    model = conv_bn()
    xs, ys = torch.randn(7, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    warm_bn(model, xs)
    model[5].eval()  # a sub-module in its own mode must keep it
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    params = dict(model.named_parameters())
    loader = DataLoader(TensorDataset(xs, ys), batch_size=3)
    fd = diag_fisher(model, loader, params, chunk_size=2)
    assert list(fd) == list(params)
    assert model.training and bn.training and not model[5].training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert all(p.grad is None for p in params.values())
    assert all(not f.requires_grad for f in fd.values())
    expected = brute_diag(model, xs, ys, list(params.values()))
    for f, e in zip(fd.values(), expected):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-14)
    # max_examples cuts in the middle of a batch; a map-style Dataset is batched internally
    fd4 = diag_fisher(model, TensorDataset(xs, ys), list(params.values()), max_examples=4)
    for f, e in zip(fd4, brute_diag(model, xs[:4], ys[:4], list(params.values()))):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-14)


def test_diag_fisher_normalisation():
    model = mlp()
    xs, ys = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = list(model.parameters())
    raw = diag_fisher(model, [(xs, ys)], params)
    by_mean = diag_fisher(model, [(xs, ys)], params, normalize="mean")
    by_max = diag_fisher(model, [(xs, ys)], params, normalize="max")
    flat = lambda fs: torch.cat([f.flatten() for f in fs])  # noqa: E731
    assert flat(by_mean).mean().item() == pytest.approx(1.0)
    assert flat(by_max).max().item() == pytest.approx(1.0)
    ratio = flat(raw)[0] / flat(by_mean)[0]
    torch.testing.assert_close(flat(raw), flat(by_mean) * ratio)
    with pytest.raises(ConfigError):
        diag_fisher(model, [(xs, ys)], params, normalize="sum")
    with pytest.raises(DataError):
        diag_fisher(model, [], params)


# ----------------------------------------------------------------------------- L_r
def test_fisher_anchor_loss_value_and_gradient():
    model = mlp()
    params = dict(model.named_parameters())
    anchor = snapshot(params)
    fdiag = {k: torch.rand_like(v) for k, v in params.items()}
    zero = fisher_anchor_loss(params, anchor, fdiag)
    assert zero.item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    loss = fisher_anchor_loss(params, anchor, fdiag)
    expected = sum((fdiag[k] * (params[k] - anchor[k]) ** 2).sum() for k in params)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    grads = torch.autograd.grad(loss, list(params.values()))
    for k, g in zip(params, grads):
        torch.testing.assert_close(g, 2 * fdiag[k] * (params[k] - anchor[k]).detach())
    lst = list(params.values())
    assert fisher_anchor_loss(lst, list(anchor.values()), list(fdiag.values())).item() == \
        pytest.approx(loss.item(), rel=1e-12)
    with pytest.raises(ConfigError):
        fisher_anchor_loss(params, list(anchor.values()), fdiag)
    with pytest.raises(ConfigError):
        fisher_anchor_loss(lst, list(anchor.values())[:-1], list(fdiag.values()))
