"""fipurify.analysis: Hessian spectra against exact Hessians, tracking, figures, CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from fipurify import analysis
from fipurify.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- helpers
def _bn_net(dtype=torch.float64) -> nn.Module:
    """A tiny conv net with BatchNorm whose running statistics are not the defaults."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(12, 3)).to(dtype)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 2, 6, 6, dtype=dtype))
    return net


def _batch(dtype=torch.float64, n=24):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _exact_hessian(net, x, y, names=None):
    """Dense Hessian of the mean CE in eval mode, by torch.func.hessian on the flat parameters."""
    named = dict(net.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    net.eval()

    def loss(f):
        parts = torch.split(f, [s.numel() for s in shapes])
        return F.cross_entropy(functional_call(net, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,)), y)

    return hessian(loss)(flat).detach()


@pytest.fixture(scope="module")
def exact():
    net = _bn_net()
    x, y = _batch()
    H = _exact_hessian(net, x, y)
    net.train()  # analysis must switch to eval itself, and restore this
    return net, (x, y), H, torch.linalg.eigvalsh(H)


# ----------------------------------------------------------------------------- products and spectra
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_hessian_products_match_exact_hessian_in_eval_mode(exact, backend):
    net, data, H, _ = exact
    with analysis.hessian_operator(net, data, backend=backend) as op:
        dense = op.dense()
    assert torch.allclose(dense, H, atol=1e-10, rtol=1e-8)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert all(p.requires_grad for p in net.parameters())


def test_lambda_max_lanczos_and_power_match_exact(exact):
    net, data, _, ev = exact
    top = ev.flip(0)[:3]
    lz = analysis.lambda_max(net, data, k=3, steps=ev.numel())
    assert np.allclose(lz.values, top.numpy(), rtol=1e-6)
    pw = analysis.lambda_max(net, data, method="power", max_iter=1000, tol=1e-10)
    assert pw.lambda_max == pytest.approx(float(top[0]), rel=1e-4)
    # a short Lanczos run already pins the largest eigenvalue
    assert analysis.lambda_max(net, data, steps=15).lambda_max == pytest.approx(float(top[0]), rel=1e-3)


def test_hutchinson_trace_is_unbiased_and_its_error_shrinks(exact):
    net, data, H, _ = exact
    small = analysis.hessian_trace(net, data, probes=20, seed=3)
    big = analysis.hessian_trace(net, data, probes=400, seed=3)
    true = float(H.trace())
    assert abs(big.value - true) < 4 * big.stderr
    assert big.stderr < 0.5 * small.stderr and big.n_probes == 400
    # a diagonal operator is estimated exactly by Rademacher probes
    d = torch.arange(1.0, 6.0, dtype=torch.float64)
    est = analysis.hutchinson(lambda v: d * v, 5, probes=3)
    assert est.value == pytest.approx(15.0) and est.stderr == pytest.approx(0.0)


def test_lanczos_quadrature_reproduces_moments_of_the_start_vector(exact):
    _, _, H, _ = exact
    q = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = q / q.norm()
    res = analysis.lanczos(lambda v: H @ v, H.shape[0], steps=6, v0=q)
    assert res.ritz_weights.sum().item() == pytest.approx(1.0)
    for k in range(0, 8):  # Gauss quadrature with 6 nodes is exact up to degree 11
        exact_k = float(q @ torch.linalg.matrix_power(H, k) @ q)
        assert float((res.ritz_weights * res.ritz_values ** k).sum()) == pytest.approx(exact_k, rel=1e-6, abs=1e-10)


def test_slq_density_has_unit_mass_and_the_exact_spectrum(exact):
    net, data, H, ev = exact
    full = analysis.eigen_density(net, data, runs=2, steps=ev.numel(), bandwidth=0.002)
    assert np.trapezoid(full.density, full.grid) == pytest.approx(1.0, abs=2e-3)
    ritz = np.sort(full.ritz_values[0])
    # with a full Krylov space the Ritz values are eigenvalues, and cover the spectrum's ends
    assert np.min(np.abs(ritz[:, None] - ev.numpy()[None, :]), axis=1).max() < 1e-6
    assert ritz[-1] == pytest.approx(float(ev[-1]), rel=1e-8) and ritz[0] == pytest.approx(float(ev[0]), abs=1e-8)
    many = analysis.eigen_density(net, data, runs=60, steps=8, seed=1)
    m1 = np.array([np.sum(w * v) for v, w in zip(many.ritz_values, many.ritz_weights)])
    se = m1.std(ddof=1) / np.sqrt(len(m1))
    assert abs(many.moment(1) - float(ev.mean())) < 4 * se
    assert many.trace() == pytest.approx(many.dim * many.moment(1))
    assert many.moment(2) == pytest.approx(float((ev ** 2).mean()), rel=0.35)


def test_fisher_trace_weights_chunks_by_size(exact):
    from fipurify.curvature.fisher import fisher_trace

    net, (x, y), _, _ = exact
    whole = fisher_trace(net.eval(), x, list(net.parameters()), "exact-expected", create_graph=False, sub_batch=len(x))
    net.train()
    est = analysis.fisher_trace(net, (x, y), estimator="exact-expected", chunk=7)
    assert est.value == pytest.approx(float(whole), rel=1e-8) and est.n_probes == 4
    assert net.training


# ----------------------------------------------------------------------------- spectral parameters
def test_spectral_hessian_is_projected_weight_hessian_and_model_is_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = [id(p) for p in net.parameters()]
    net[0].bias.requires_grad_(False)
    # exact: H_delta = J^T H_W J with dW/d delta_k = u_k v_k^T (W = U diag(s + delta) V^T)
    names = ["0.weight", "2.weight"]
    Hw = _exact_hessian(net, x, y, names)
    cols = []
    for layer, off in ((net[0], 0), (net[2], net[0].weight.numel())):
        u, _, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
        for k in range(len(vh)):
            col = torch.zeros(Hw.shape[0], dtype=torch.float64)
            col[off:off + layer.weight.numel()] = torch.outer(u[:, k], vh[k]).reshape(-1)
            cols.append(col)
    J = torch.stack(cols, 1)
    ev = torch.linalg.eigvalsh(J.T @ Hw @ J)
    res = analysis.lambda_max(net, (x, y), params="spectral", k=2, steps=J.shape[1])
    assert np.allclose(res.values, ev.flip(0)[:2].numpy(), rtol=1e-6)
    tr = analysis.hessian_trace(net, (x, y), params="spectral", probes=300)
    assert abs(tr.value - float(torch.trace(J.T @ Hw @ J))) < 4 * tr.stderr
    # the model is exactly as before: same objects, values, keys, order, flags
    assert [id(p) for p in net.parameters()] == ids
    assert list(net.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net[0].bias.requires_grad and net[0].weight.requires_grad
    assert not any(hasattr(m, "parametrizations") for m in net.modules())


def test_plain_model_folds_a_copy_and_leaves_the_spectral_model_working():
    from fipurify.curvature.spectral import attach_spectral, spectral_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    x = torch.rand(4, 2, 6, 6)
    attach_spectral(net)
    with torch.no_grad():
        spectral_layers(net)[0][1].delta.add_(0.1)
        want = net(x)
        plain = analysis.plain_model(net)
        assert len(spectral_layers(net)) == 2 and not spectral_layers(plain)
        assert torch.allclose(net(x), want) and torch.allclose(plain(x), want, atol=1e-6)
    assert analysis.plain_model(plain) is plain


def test_bad_inputs_raise_readable_errors(exact):
    net, data, _, _ = exact
    with pytest.raises(ConfigError, match="params"):
        analysis.lambda_max(net, data, params="weights")
    with pytest.raises(ConfigError, match="parameter of the model"):
        analysis.lambda_max(net, data, params=[torch.zeros(3, requires_grad=True)])
    with pytest.raises(DataError):
        analysis.hessian_trace(net, (data[0][:0], data[1][:0]))
    with pytest.raises(ConfigError, match="back-end"):
        analysis.lambda_max(net, data, backend="pyhessian")
    with pytest.raises(ConfigError, match="needs the model"):
        analysis.SmoothnessTracker(data)({"epoch": 1})


# ----------------------------------------------------------------------------- tracking
@pytest.fixture(scope="module")
def tiny():
    from fipurify import attacks, models
    from fipurify.datasets.synthetic import synthetic

    train = synthetic(n=160, num_classes=4, image_size=8, seed=0, split="train")
    test = synthetic(n=60, num_classes=4, image_size=8, seed=0, split="test")
    attack = attacks.create("badnets", target=0, poison_rate=0.2, seed=0, patch_size=2)
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=4, width=2, input_size=8)
    return {"model": model, "train": train, "test": test, "attack": attack,
            "bd": attack.backdoor_test_set(test), "poisoned": attack.poison(train)}


def test_tracker_in_train_model_records_every_n_epochs(tiny):
    import copy

    from fipurify.training import TrainConfig, train_model

    x = torch.stack([tiny["train"][i][0] for i in range(32)])
    y = torch.as_tensor(tiny["train"].labels[:32])
    tracker = analysis.SmoothnessTracker((x, y), every=2, measures=("lambda_max", "trace", "fisher"),
                                         clean_test=tiny["test"], backdoor_test=tiny["bd"], lanczos_steps=5, probes=3)
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32, augment=False, seed=0)
    m1, m2 = copy.deepcopy(tiny["model"]), copy.deepcopy(tiny["model"])
    hist = train_model(m1, tiny["poisoned"], cfg, progress=False, log=None, callback=tracker)
    assert [r["epoch"] for r in tracker.records] == [2, 4]
    for r in tracker.records:
        assert {"lambda_max", "trace_h", "trace_h_se", "trace_f", "acc", "asr"} <= set(r)
        assert r["lambda_max"] > 0 and r["trace_f"] > 0 and 0 <= r["asr"] <= 1
    assert "lambda_max" in hist[1] and "lambda_max" not in hist[0]  # annotated history
    # measuring does not change training: same weights with and without the tracker
    train_model(m2, tiny["poisoned"], cfg, progress=False, log=None)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("params", ["spectral", "all"])
def test_tracker_in_ffip_purification_sees_the_spectral_model(tiny, params):
    from fipurify import defenses

    clean = tiny["test"]
    d = defenses.create("ffip", epochs=2, batch_size=16, fisher_every=1, seed=0, augment=False)
    tracker = analysis.SmoothnessTracker((torch.stack([clean[i][0] for i in range(16)]),
                                          torch.as_tensor(clean.labels[:16])),
                                         measures=("lambda_max", "fisher"), params=params,
                                         clean_test=clean, lanczos_steps=4)
    out = d.purify(tiny["model"], clean, progress=False, callback=tracker)
    plain = defenses.create("ffip", epochs=2, batch_size=16, fisher_every=1, seed=0, augment=False)
    out2 = plain.purify(tiny["model"], clean, progress=False)
    assert [r["epoch"] for r in tracker.records] == [1, 2]
    assert all("acc" in r and "asr" not in r and r["lambda_max"] > 0 for r in tracker.records)
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), out2.state_dict().values()))


# ----------------------------------------------------------------------------- figures
def _check_files(paths):
    assert {p.suffix for p in paths} == {".png", ".svg"}
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000
        assert data.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in data[:2000]


def test_figures_are_written_as_png_and_svg(tmp_path, tiny, exact):
    from fipurify.analysis.plot_curves import plot_curves
    from fipurify.analysis.plot_density import DensityPanel, plot_densities
    from fipurify.analysis.plot_examples import plot_trigger_examples
    from fipurify.analysis.plot_tsne import plot_tsne

    net, data, _, _ = exact
    dens = analysis.eigen_density(net, data, runs=1, steps=6)
    _check_files(plot_densities([DensityPanel("a", dens, 1.0, 2.0, 0.9, 1.0), DensityPanel("b", dens)],
                                tmp_path / "dens.png"))
    recs = [{"epoch": e, "lambda_max": 10.0 / e, "trace_f": 5.0 / e, "acc": 0.8, "asr": 1 / e} for e in (1, 2, 3)]
    _check_files(plot_curves({"badnets": recs, "blend": recs[:2]}, tmp_path / "curves"))
    _check_files(plot_trigger_examples(tiny["attack"], tiny["test"], tmp_path / "ex", n=4))
    _check_files(plot_tsne({"before": tiny["model"]}, tiny["test"], tiny["bd"], tmp_path / "tsne",
                           n_clean=40, n_poisoned=10))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    with pytest.raises(ConfigError):
        plot_curves([{"epoch": 1}], tmp_path / "none")


# ----------------------------------------------------------------------------- CLI
def test_cli_analyze_and_scan_on_a_tiny_saved_model(tmp_path, monkeypatch, capsys):
    from fipurify.cli import main

    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    assert main(["train", "--dataset", "synthetic", "--width", "2", "--epochs", "1", "--batch-size", "64",
                 "--reserve", "0.1", "--quiet", "--out", str(model)]) == 0
    out = tmp_path / "an"
    assert main(["analyze", str(model), "--n", "24", "--lanczos-steps", "4", "--probes", "3", "--slq-runs", "1",
                 "--slq-steps", "5", "--compare", str(model), "--eval-limit", "40", "--no-tsne", "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert len(doc["models"]) == 2 and doc["data"]["n"] == 24
    first = doc["models"][0]
    assert first["smoothness"]["lambda_max"] > 0 and first["smoothness"]["trace_f"]["value"] > 0
    assert first["metrics"]["n_clean"] == 40 and first["metrics"]["asr"] is not None
    assert len(first["smoothness"]["density"]["ritz_values"]) == 1
    _check_files([p for p in out.iterdir() if p.name.startswith("density")])
    assert (out / "trigger_examples.png").exists()
    capsys.readouterr()
    assert main(["scan", str(model), "--reference", str(model), "--n", "24", "--lanczos-steps", "4",
                 "--probes", "3", "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "not a verdict" in text and "0 of 3" in text
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["ratios"]["lambda_max"] == pytest.approx(1.0)
    assert main(["analyze", str(model), "--n", "0", "--quiet"]) == 2


def test_batches_are_contiguous_even_from_channels_last_images():
    # NHWC arrays permuted to NCHW are channels-last in memory; torch 2.13's CPU double backward of a
    # convolution on such inputs corrupts the heap (the analyze CLI crashed), so batches are made contiguous.
    from fipurify.analysis.data import as_batches
    x = torch.rand(6, 8, 8, 3).permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    (bx, by), = as_batches((x, torch.zeros(6, dtype=torch.long)))
    assert bx.is_contiguous() and torch.equal(bx, x)
