"""The rendered-trigger attacks (attacks.rendered): WaNet, CBA, CLB, BPPA and the combined attack,
high poison rates, CIFAR/GTSRB shapes and fipurify train with each."""
import json

import numpy as np
import pytest
import torch

from fipurify import attacks, models
from fipurify.attacks.bppa import QuantizeTrigger, quantize_levels
from fipurify.attacks.cba import HalfMixTrigger
from fipurify.attacks.clb import CornerPatchTrigger
from fipurify.attacks.triggers import trigger_from_spec
from fipurify.attacks.wanet import BICUBIC_GAIN, WarpTrigger
from fipurify.cli import main
from fipurify.datasets.synthetic import synthetic
from fipurify.errors import ConfigError, DataError, ModelFileError
from fipurify.metrics import evaluate
from fipurify.training import TrainConfig, train_model


NEW = ("wanet", "cba", "clb", "bppa", "combined")


# Small, fast CLB settings (the defaults train a width-16 surrogate for 10 epochs).
CLB_FAST = {"surrogate_epochs": 1, "surrogate_width": 4, "pgd_steps": 5, "pgd_step_size": 2 / 255}


@pytest.fixture(scope="module")
def train():
    return synthetic(n=400, num_classes=4, image_size=16, seed=0, split="train")


@pytest.fixture(scope="module")
def test_set():
    return synthetic(n=120, num_classes=4, image_size=16, seed=0, split="test")


@pytest.fixture(scope="module")
def clb(train, tmp_path_factory):
    attack = attacks.create("clb", target=1, seed=0, **CLB_FAST)
    attack.prepare(train, cache_dir=tmp_path_factory.mktemp("clb-cache"))
    return attack


def clean_images(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def roundtrip(attack):
    return attacks.from_spec(json.loads(json.dumps(attack.to_spec())))


def base_flags(train, rate, seed=0, mode="all2one"):
    """Poison flags of the plain base-class rule (BadNets uses it unchanged)."""
    return attacks.create("badnets", poison_rate=rate, seed=seed, mode=mode).poison(train).poison_flag


# ----------------------------------------------------------------------------- BPPA
def _reference_dither(img: np.ndarray, levels: int) -> np.ndarray:
    """Plain raster-order Floyd-Steinberg on one C x H x W image (level indices)."""
    img = img.astype(np.float64).copy()
    q = levels - 1
    c, h, w = img.shape
    out = np.zeros(img.shape, dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            old = img[:, y, x].copy()
            lev = np.clip(np.rint(old * q), 0, q)
            out[:, y, x] = lev
            err = old - lev / q
            for dy, dx, wgt in ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    img[:, y + dy, x + dx] += err * wgt
    return out


# ----------------------------------------------------------------------------- registry / base
def test_new_names_registered_and_base_prepare_is_a_noop(train):
    assert set(NEW) <= set(attacks.available())
    badnets = attacks.create("badnets")
    assert badnets.needs_preparation is False and badnets.prepare(train) is None
    assert attacks.create("clb").needs_preparation is True


# ----------------------------------------------------------------------------- WaNet
def test_wanet_field_is_smooth_and_bounded():
    t = WarpTrigger(k=4, s=0.5, field_seed=3)
    p = t.control_grid()
    assert p.abs().mean().item() == pytest.approx(1.0, rel=1e-5)
    for size in (16, 32):
        f = t.field(size, size)                                    # H x W x 2, grid_sample units
        bound = t.s * p.abs().max().item() * BICUBIC_GAIN / size
        assert f.abs().max().item() <= bound + 1e-6
        # Smooth: neighbouring displacements differ by a small fraction of the largest one,
        # unlike an i.i.d. random field of the same size.
        step = max((f[1:] - f[:-1]).abs().max().item(), (f[:, 1:] - f[:, :-1]).abs().max().item())
        assert step < 0.6 * f.abs().max().item()
        rough = torch.rand(size, size, 2) * 2 - 1
        assert (rough[1:] - rough[:-1]).abs().max() > 0.9 * rough.abs().max()
    assert not torch.equal(WarpTrigger(field_seed=4).control_grid(), p)


def test_wanet_poisoned_set_noise_mode_and_round_trip(train):
    attack = attacks.create("wanet", target=0, poison_rate=0.1, seed=2)
    ds = attack.poison(train)
    flags, cover = ds.poison_flag, ds.cover_flag
    assert np.array_equal(flags, base_flags(train, 0.1, seed=2))
    k = round(0.1 * int((train.labels != 0).sum()))
    assert flags.sum() == k and cover.sum() == round(2 * k) and not (flags & cover).any()
    assert (ds.labels[flags] == 0).all() and np.array_equal(ds.labels[~flags], train.labels[~flags])
    x, y = ds.as_arrays()
    clean = clean_images(train)
    assert (x[flags] - clean[flags]).abs().amax(dim=(1, 2, 3)).min() > 0     # every warped image changed
    assert (x[cover] - clean[cover]).abs().amax(dim=(1, 2, 3)).min() > 0
    assert torch.equal(x[~(flags | cover)], clean[~(flags | cover)])
    # Noise-mode images are not the plain warp.
    assert not torch.allclose(x[cover], attack.apply_trigger(clean[cover]))
    assert torch.equal(x[flags], attack.apply_trigger(clean[flags]))
    again = roundtrip(attack).poison(train)
    assert torch.equal(again.as_arrays()[0], x) and np.array_equal(again.cover_flag, cover)
    i = int(np.flatnonzero(cover)[0])
    assert torch.equal(ds[i][0], x[i]) and ds[i][1] == train.labels[i]


def test_wanet_all2all_and_small_images(train, test_set):
    attack = attacks.create("wanet", mode="all2all", poison_rate=0.2)
    ds = attack.poison(train)
    f = ds.poison_flag
    assert np.array_equal(ds.labels[f], (train.labels[f] + 1) % 4)
    bd = attack.backdoor_test_set(test_set)
    assert len(bd) == len(test_set) and np.array_equal(bd.targets, (test_set.labels + 1) % 4)
    with pytest.raises(DataError, match="at least 4x4"):
        WarpTrigger(k=4).apply(torch.rand(3, 3, 3))
    with pytest.raises(ConfigError):
        attacks.create("wanet", s=0)


def test_wanet_is_learned_by_a_tiny_model(train, test_set):
    """The paper's warp (k=4, s=0.5) with noise mode OFF reaches a high ASR in seconds.

    With noise mode on (cross_ratio=2) a width-4 model needs far longer to tell the exact
    warp from the jittered ones (ASR about 0.5 after 15 epochs on this data), so the
    seconds-scale check runs without it.
    """
    attack = attacks.create("wanet", target=0, poison_rate=0.2, cross_ratio=0, seed=0)
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
    train_model(model, attack.poison(train), TrainConfig(epochs=6, lr=0.05, batch_size=32, augment=False),
                progress=False, log=None)
    res = evaluate(model, test_set, attack.backdoor_test_set(test_set))
    assert res["asr"] >= 0.8 and res["acc"] >= 0.8


# ----------------------------------------------------------------------------- CBA
def test_half_mixer_takes_one_half_from_each_image():
    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.8)
    rng = np.random.default_rng(0)
    t = HalfMixTrigger(jitter=3)
    for _ in range(30):
        out = t.mix(a, b, rng.random((1, 5)))[0]
        share = (out == 0.2).float().mean().item()
        assert torch.all((out == 0.2) | (out == 0.8))
        assert 5 / 16 - 1e-6 <= share <= 11 / 16 + 1e-6                # split at 8 +- 3
    with pytest.raises(DataError, match="at least 8"):
        t.mix(a[..., :6, :6], b[..., :6, :6], np.full((1, 5), 0.3))
    with pytest.raises(DataError):
        attacks.create("cba").apply_trigger(a)


def test_cba_poisoned_mixed_benign_and_test_set(train, test_set):
    attack = attacks.create("cba", target=0, poison_rate=0.1, seed=1)
    assert attack.classes_for(4) == (1, 2)
    ds = attack.poison(train)
    k = round(0.1 * int((train.labels != 0).sum()))
    p, c = ds.poison_flag, ds.cover_flag
    assert np.array_equal(p, base_flags(train, 0.1, seed=1))
    assert p.sum() == k and c.sum() == round(3 * k) and not (p & c).any()
    assert (ds.labels[p] == 0).all() and np.array_equal(ds.labels[c], train.labels[c])
    src = ds.mix_sources
    assert (train.labels[src[p, 0]] == 1).all() and (train.labels[src[p, 1]] == 2).all()   # A + B -> target
    assert np.array_equal(src[c, 0], np.flatnonzero(c))                                  # own image ...
    assert np.array_equal(train.labels[src[c, 1]], train.labels[c])                      # ... + same class
    x, _ = ds.as_arrays()
    clean = clean_images(train)
    assert torch.equal(x[~(p | c)], clean[~(p | c)])
    i = int(np.flatnonzero(p)[0])
    assert torch.equal(ds[i][0], x[i]) and not torch.equal(x[i], clean[i])
    assert torch.equal(roundtrip(attack).poison(train).as_arrays()[0], x)

    bd = attack.backdoor_test_set(test_set)
    assert len(bd) == int((test_set.labels == 1).sum())
    assert (bd.true_labels == 1).all() and (bd.partner_labels == 2).all() and (bd.targets == 0).all()
    xb, _ = bd.as_arrays()
    assert torch.equal(bd[3][0], xb[3])
    with pytest.raises(ConfigError, match="all2one"):
        attacks.create("cba", mode="all2all")
    with pytest.raises(ConfigError):
        attacks.create("cba", target=1, mix_classes=[1, 2])


# ----------------------------------------------------------------------------- CLB
def test_clb_clean_label_perturbation_within_eps_plus_patch(train, clb):
    ds = clb.poison(train)
    assert np.array_equal(ds.labels, train.labels)                      # clean-label: nothing relabelled
    f = ds.poison_flag
    assert f.sum() == round(0.8 * int((train.labels == 1).sum())) and (train.labels[f] == 1).all()
    x, _ = ds.as_arrays()
    clean = clean_images(train)
    region = clb.trigger.region_mask(16, 16)
    delta = (x[f] - clean[f])[:, :, ~region]
    assert delta.abs().max().item() <= clb.eps + 1e-6
    assert (delta.abs().amax(dim=(1, 2)) > 0).float().mean() > 0.9       # PGD moved (nearly) every image
    pattern = clb.trigger.pattern[0]
    assert torch.equal(x[f][:, :, -3:, -3:], pattern.expand(int(f.sum()), 3, 3, 3))
    assert torch.equal(x[f][:, :, :3, :3], pattern.expand(int(f.sum()), 3, 3, 3))
    assert torch.equal(x[~f], clean[~f])


def test_clb_spec_references_the_surrogate_and_rebuilds_the_same_set(train, test_set, clb, tmp_path):
    spec = clb.to_spec()
    assert set(spec["surrogate"]) == {"path", "sha256"} and len(spec["surrogate"]["sha256"]) == 64
    x1 = clb.poison(train).as_arrays()[0]
    again = roundtrip(clb)
    assert torch.equal(again.poison(train).as_arrays()[0], x1)
    bd = again.backdoor_test_set(test_set)                                 # the patch only
    first = test_set[int(bd.original_index[0])][0]
    assert (bd.true_labels != 1).all() and torch.equal(bd[0][0], clb.apply_trigger(first))
    # prepare() again finds the recorded file and trains nothing.
    again.prepare(train)
    assert again.surrogate == spec["surrogate"]
    # A changed surrogate file is refused.
    copy = tmp_path / "s.safetensors"
    copy.write_bytes(open(spec["surrogate"]["path"], "rb").read()[:-1] + b" ")
    bad = attacks.from_spec({**spec, "surrogate": {"path": str(copy), "sha256": spec["surrogate"]["sha256"]}})
    with pytest.raises(ModelFileError, match="SHA-256"):
        bad.poison(train)


def test_bppa_wavefront_dithering_equals_raster_order():
    x = np.random.default_rng(0).random((2, 3, 9, 13))
    fast = quantize_levels(x, 8, dither=True)
    for i in range(2):
        assert np.array_equal(fast[i], _reference_dither(x[i], 8))


def test_bppa_trigger_levels_and_quantisation_step(train):
    clean = clean_images(train)[:50]
    plain = attacks.create("bppa", bits=3, dither=False).apply_trigger(clean)
    levels = torch.arange(8, dtype=torch.float32) / 7
    assert torch.isin(plain, levels).all()
    assert (plain - clean).abs().max().item() <= 0.5 / 7 + 1e-6
    dithered = attacks.create("bppa").apply_trigger(clean)               # default: 5 bits, dithering
    assert torch.isin(dithered, torch.arange(32, dtype=torch.float32) / 31).all()
    assert not torch.equal(dithered, clean)
    assert (dithered - clean).abs().mean().item() < 2 / 31              # error diffused, small on average


@pytest.mark.parametrize("trigger", [WarpTrigger(k=3, s=0.75, grid_rescale=0.98, field_seed=5),
                                     QuantizeTrigger(bits=3, dither=False), QuantizeTrigger(bits=4),
                                     CornerPatchTrigger(torch.rand(3, 3, 3), corners=4, amplitude=0.5),
                                     HalfMixTrigger(jitter=2)],
                         ids=["warp", "quantize", "quantize-dither", "clb-corners", "cba-half-mix"])
def test_new_triggers_rebuild_from_spec(trigger):
    spec = json.loads(json.dumps(trigger.to_spec()))
    again = trigger_from_spec(spec)
    assert type(again) is type(trigger)
    assert again.to_spec() == trigger.to_spec()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    if isinstance(trigger, HalfMixTrigger):  # mixes two images
        u = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)).numpy()
        assert torch.equal(again.mix(x, x.flip(0), u), trigger.mix(x, x.flip(0), u))
    else:
        assert torch.equal(again.apply(x), trigger.apply(x))
    with pytest.raises(ConfigError, match="bad"):
        trigger_from_spec({**spec, "unknown_option": 1})


def test_bppa_poisoned_set_negatives_and_all2all(train, test_set):
    attack = attacks.create("bppa", target=0, poison_rate=0.1, seed=3)
    ds = attack.poison(train)
    p, neg = ds.poison_flag, ds.cover_flag
    k = round(0.1 * int((train.labels != 0).sum()))
    assert np.array_equal(p, base_flags(train, 0.1, seed=3))
    assert neg.sum() == k and not (p & neg).any() and np.array_equal(ds.labels[neg], train.labels[neg])
    x, _ = ds.as_arrays()
    clean = clean_images(train)
    assert torch.equal(x[p], attack.apply_trigger(clean[p]))
    i = int(np.flatnonzero(neg)[0])
    d = int(ds.donor_index[i])
    assert d != i
    expected = (clean[i] + attack.apply_trigger(clean[d]) - clean[d]).clamp(0, 1)
    assert torch.allclose(x[i], expected, atol=1e-6) and torch.equal(ds[i][0], x[i])
    assert torch.equal(roundtrip(attack).poison(train).as_arrays()[0], x)
    bd = attack.backdoor_test_set(test_set)
    assert torch.equal(bd.as_arrays()[0], attack.apply_trigger(clean_images(test_set)[bd.original_index]))

    a2 = attacks.create("bppa", mode="all2all", poison_rate=0.1)
    ds2 = a2.poison(train)
    assert np.array_equal(ds2.labels[ds2.poison_flag], (train.labels[ds2.poison_flag] + 1) % 4)


# ----------------------------------------------------------------------------- combined
def test_combined_equal_disjoint_shares_and_per_component_test_set(train, test_set, tiny_backdoor):
    attack = attacks.create("combined", target=0, poison_rate=0.3, seed=0)
    ds = attack.poison(train)
    k = round(0.3 * int((train.labels != 0).sum()))
    counts = [int((ds.component == i).sum()) for i in range(3)]
    assert counts == [k // 3] * 3 and ds.poison_flag.sum() == 3 * (k // 3)
    assert np.array_equal(ds.poison_flag, ds.component >= 0)             # one component per sample
    assert (train.labels[ds.poison_flag] != 0).all() and (ds.labels[ds.poison_flag] == 0).all()
    x, _ = ds.as_arrays()
    clean = clean_images(train)
    for i, comp in enumerate(attack.components):
        sel = ds.component == i
        assert torch.equal(x[sel], comp.apply_trigger(clean[sel]))
    assert torch.equal(roundtrip(attack).poison(train).as_arrays()[0], x)

    bd = attack.backdoor_test_set(test_set)
    n_nt = int((test_set.labels != 0).sum())
    assert len(bd) == 3 * n_nt and [int((bd.component == i).sum()) for i in range(3)] == [n_nt] * 3
    per = attack.component_metrics(tiny_backdoor["model"], bd)
    assert set(per) == {"badnets", "blend", "trojan"}
    assert per["badnets"]["asr"] > 0.9                                   # the fixture model has BadNets
    overall = evaluate(tiny_backdoor["model"], test_set, bd)["asr"]
    assert overall == pytest.approx(np.mean([v["asr"] for v in per.values()]))

    a2 = attacks.create("combined", mode="all2all", poison_rate=0.3)
    ds2 = a2.poison(train)
    assert np.array_equal(ds2.labels[ds2.poison_flag], (train.labels[ds2.poison_flag] + 1) % 4)
    with pytest.raises(ConfigError, match="cannot be a component"):
        attacks.create("combined", components=["badnets", "sig"])


# ----------------------------------------------------------------------------- high poison rates
@pytest.mark.parametrize("name", ["badnets", "blend", "trojan"])
@pytest.mark.parametrize("rate", [0.25, 0.35, 0.5])
def test_high_poison_rates(train, test_set, name, rate):
    attack = attacks.create(name, target=0, poison_rate=rate, seed=0)
    ds = attack.poison(train)
    eligible = train.labels != 0
    assert ds.poison_flag.sum() == round(rate * int(eligible.sum()))
    assert not (ds.poison_flag & ~eligible).any() and (ds.labels[ds.poison_flag] == 0).all()
    assert np.array_equal(ds.labels[~ds.poison_flag], train.labels[~ds.poison_flag])
    assert len(attack.backdoor_test_set(test_set)) == int((test_set.labels != 0).sum())


# ----------------------------------------------------------------------------- other shapes
@pytest.mark.parametrize("classes, size", [(10, 32), (43, 32)])
def test_attacks_run_on_cifar_and_gtsrb_shapes(classes, size, tmp_path):
    tr = synthetic(n=4 * classes, num_classes=classes, image_size=size, seed=1, split="train")
    te = synthetic(n=2 * classes, num_classes=classes, image_size=size, seed=1, split="test")
    for name in NEW:
        opts = dict(CLB_FAST, pgd_steps=1) if name == "clb" else {}
        attack = attacks.create(name, target=0, poison_rate=0.8 if name == "clb" else 0.1, seed=0, **opts)
        attack.prepare(tr, cache_dir=tmp_path)
        x, _ = attack.poison(tr).as_arrays()
        xb, _ = attack.backdoor_test_set(te).as_arrays()
        assert x.shape == (len(tr), 3, size, size) and xb.shape[1:] == (3, size, size)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", NEW)
def test_cli_trains_each_new_attack(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FIPURIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "m.safetensors"
    argv = ["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
            "--lr", "0.05", "--attack", name, "--quiet", "--eval-every", "1", "--out", str(out),
            "--json", str(tmp_path / "m.json")]
    if name == "clb":
        argv += [f"--attack-opt={k}={v}" for k, v in CLB_FAST.items()]
    if name == "combined":
        argv += ["--poison-rate", "0.3", "--smoothness-penalty", "0.001"]
    assert main(argv) == 0 and out.exists()
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["attack"]["name"] == name and meta["metrics"]["asr"] is not None
    if name == "combined":
        assert meta["train_config"]["smoothness_penalty"] == 0.001
    if name == "clb":
        assert (tmp_path / "cache" / "attacks").is_dir()
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
