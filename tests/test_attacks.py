"""Tests for fipurify.attacks: triggers, poisoning, backdoor test sets, specs, registry."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fipurify import attacks
from fipurify.attacks import (BadNets, Blend, BlendTrigger, CustomAttack, PatchTrigger, SIG,
                              SinusoidalTrigger, Trojan, create, from_spec)
from fipurify.attacks.triggers import trigger_from_spec
from fipurify.datasets.synthetic import synthetic
from fipurify.errors import ConfigError, DataError

C, H, W, K = 3, 12, 12, 4


@pytest.fixture(scope="module")
def train():
    return synthetic(n=200, num_classes=K, image_size=H, channels=C, seed=1, split="train")


@pytest.fixture(scope="module")
def test_set():
    return synthetic(n=80, num_classes=K, image_size=H, channels=C, seed=1, split="test")


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """H x W bool map of pixels that differ in any channel."""
    return (a != b).any(dim=0)


# --------------------------------------------------------------------------- triggers
def test_badnets_changes_exactly_the_corner_checkerboard(train):
    attack = BadNets()
    x, _ = train[0]
    out = attack.apply_trigger(x)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[-3:, -3:] = True
    assert torch.equal(out[:, ~expected], x[:, ~expected])  # nothing else touched
    board = torch.tensor([[1., 0., 1.], [0., 1., 0.], [1., 0., 1.]])
    for c in range(C):
        assert torch.equal(out[c, -3:, -3:], board)
    assert not torch.equal(x, out) and out is not x
    assert torch.equal(x, train[0][0])  # input not modified


def test_badnets_margin_and_batch_equals_single(train):
    x = torch.stack([train[i][0] for i in range(5)])
    attack = BadNets(margin=1)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape
    for i in range(5):
        assert torch.equal(out[i], attack.apply_trigger(x[i]))
    changed = _changed(out[0], x[0])
    assert not changed[-1, :].any() and not changed[:, -1].any()
    assert torch.equal(out[0, 0, -4:-1, -4:-1], torch.tensor([[1., 0., 1.], [0., 1., 0.], [1., 0., 1.]]))


def test_trojan_patch_location_differs_from_badnets(train):
    x, _ = train[3]
    out = Trojan().apply_trigger(x)
    region = torch.zeros(H, W, dtype=torch.bool)
    region[H - 4:H - 1, W - 4:W - 1] = True
    assert torch.equal(out[:, ~region], x[:, ~region])
    patch = out[:, H - 4:H - 1, W - 4:W - 1]
    assert torch.equal(patch, Trojan().trigger.pattern)
    assert patch.std(dim=0).max() > 0.05  # colourful: channels differ
    assert not torch.equal(Trojan(pattern_seed=1).trigger.pattern, Trojan().trigger.pattern)
    # an "optimised" pattern passed in replaces the default
    mine = torch.full((C, 3, 3), 0.5)
    assert torch.equal(Trojan(pattern=mine).apply_trigger(x)[:, H - 4:H - 1, W - 4:W - 1], mine)


def test_blend_is_exact_mix_with_seeded_noise(train):
    attack = Blend()
    x = torch.stack([train[i][0] for i in range(4)])
    out = attack.apply_trigger(x)
    pattern = attack.trigger.pattern_for((C, H, W))
    assert pattern.shape == (C, H, W) and 0 <= pattern.min() and pattern.max() < 1
    assert pattern.std() > 0.2  # noise, not a constant
    assert torch.equal(out, (0.8 * x + 0.2 * pattern).clamp(0, 1))
    assert torch.allclose(out, 0.8 * x + 0.2 * pattern, atol=1e-6)
    assert torch.equal(pattern, Blend().trigger.pattern_for((C, H, W)))
    assert not torch.equal(pattern, Blend(pattern_seed=5).trigger.pattern_for((C, H, W)))


def test_blend_user_pattern_is_resized(train):
    small = torch.rand(C, 4, 4)
    out = Blend(pattern=small, alpha=0.5).apply_trigger(train[0][0])
    assert out.shape == (C, H, W)
    assert BlendTrigger(small, 0.5).pattern_for((C, H, W)).shape == (C, H, W)


def test_sinusoid_formula_vertical_stripes():
    x = torch.full((C, H, W), 0.5)
    trig = SinusoidalTrigger()  # additive, delta 20/255, f 6
    out = trig.apply(x)
    j = torch.arange(W, dtype=torch.float64)
    v = (20 / 255) * torch.sin(2 * math.pi * j * 6 / W)
    assert torch.allclose(out, (0.5 + v).float().expand(C, H, W), atol=1e-6)
    assert torch.equal(out, out[:, :1, :].expand_as(out))  # constant down each column
    assert torch.equal(trig.apply(torch.ones(C, H, W)).max(), torch.tensor(1.0))  # clipped
    blend = SinusoidalTrigger(style="blend", alpha=0.2).apply(x)
    assert torch.allclose(blend, (0.8 * 0.5 + 0.2 * (0.5 + 0.5 * torch.sin(2 * math.pi * j * 6 / W))).float()
                          .expand(C, H, W), atol=1e-6)


def test_trigger_shape_checks():
    trig = PatchTrigger(torch.ones(3, 3))
    grey = torch.zeros(1, 8, 8)
    assert trig.apply(grey)[0, -3:, -3:].eq(1).all()  # 1-channel pattern on any channel count
    colour = PatchTrigger(torch.rand(3, 2, 2))
    assert colour.apply(grey).shape == (1, 8, 8)  # RGB pattern turned grey
    with pytest.raises(DataError, match="does not fit"):
        PatchTrigger(torch.ones(5, 5)).apply(torch.zeros(3, 4, 4))
    with pytest.raises(DataError, match="channels"):
        colour.apply(torch.zeros(2, 8, 8))
    with pytest.raises(DataError, match="float"):
        trig.apply(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="position"):
        PatchTrigger(torch.ones(2, 2), position="middle")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        PatchTrigger(torch.full((2, 2), 2.0))


def test_patch_position_and_mask():
    x = torch.zeros(1, 6, 6)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = PatchTrigger(torch.ones(2, 2), position=(1, 2), mask=mask).apply(x)
    assert out[0].nonzero().tolist() == [[1, 2], [2, 3]]
    out = PatchTrigger(torch.ones(2, 2), position=(-2, 0)).apply(x)  # negative counts from bottom
    assert out[0, 4:, :2].eq(1).all() and out.sum() == 4


def test_trigger_spec_round_trip():
    for trig in (PatchTrigger(torch.rand(3, 2, 2), (0, 1), mask=torch.ones(2, 2)),
                 BlendTrigger(noise_seed=3, alpha=0.3), SinusoidalTrigger(style="blend")):
        again = trigger_from_spec(json.loads(json.dumps(trig.to_spec())))
        x = torch.rand(2, 3, 8, 8)
        assert torch.equal(trig.apply(x), again.apply(x))


# --------------------------------------------------------------------------- poisoning
@pytest.mark.parametrize("rate", [0.1, 0.25, 1.0])
def test_poison_count_flags_labels_indices(train, rate):
    attack = BadNets(target=1, poison_rate=rate, seed=3)
    ds = attack.poison(train)
    labels = train.labels
    eligible = np.flatnonzero(labels != 1)
    flags = ds.poison_flag
    assert flags.dtype == bool and flags.sum() == round(rate * len(eligible))
    assert not flags[labels == 1].any()  # target class never poisoned (all2one)
    assert np.array_equal(ds.original_index, np.arange(len(train)))
    assert np.array_equal(ds.original_label, labels)
    assert np.array_equal(ds.labels[flags], np.ones(flags.sum()))
    assert np.array_equal(ds.labels[~flags], labels[~flags])
    assert ds.num_classes == K and ds.classes == train.classes and len(ds) == len(train)
    i_p, i_c = np.flatnonzero(flags)[0], np.flatnonzero(~flags)[0]
    img, y = ds[i_p]
    assert y == 1 and torch.equal(img, attack.apply_trigger(train[i_p][0]))
    img, y = ds[i_c]
    assert y == labels[i_c] and torch.equal(img, train[i_c][0])


def test_as_arrays_equals_item_access(train):
    ds = Blend(poison_rate=0.3).poison(train)
    x, y = ds.as_arrays()
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(len(ds))]))
    assert torch.equal(y, torch.as_tensor(ds.labels))
    bd = Blend().backdoor_test_set(train)
    xb, tb = bd.as_arrays()
    assert torch.equal(xb[:5], torch.stack([bd[i][0] for i in range(5)]))
    assert torch.equal(tb, torch.as_tensor(bd.targets))


def test_seed_determinism(train):
    a = BadNets(seed=7).poison(train).poison_flag
    b = BadNets(seed=7).poison(train).poison_flag
    c = BadNets(seed=8).poison(train).poison_flag
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.sum() == c.sum()


def test_all2all_labels_and_backdoor_test_set(train, test_set):
    attack = create("troj-all", poison_rate=0.5)
    assert attack.mode == "all2all"
    ds = attack.poison(train)
    flags = ds.poison_flag
    assert flags.sum() == round(0.5 * len(train))  # every sample eligible
    assert np.array_equal(ds.labels[flags], (train.labels[flags] + 1) % K)
    assert attack.target_for(K - 1) == 0 and attack.target_for(1) == 2
    bd = attack.backdoor_test_set(test_set)
    assert len(bd) == len(test_set)
    assert np.array_equal(bd.true_labels, test_set.labels)
    assert np.array_equal(bd.targets, (test_set.labels + 1) % K)
    img, t = bd[0]
    assert t == (test_set.labels[0] + 1) % K and torch.equal(img, attack.apply_trigger(test_set[0][0]))


def test_backdoor_test_set_excludes_target_class(test_set):
    attack = BadNets(target=2)
    bd = attack.backdoor_test_set(test_set)
    keep = np.flatnonzero(test_set.labels != 2)
    assert np.array_equal(bd.original_index, keep) and len(bd) == len(keep)
    assert (bd.targets == 2).all() and (bd.true_labels != 2).all()
    assert np.array_equal(bd.true_labels, test_set.labels[keep])
    img, t = bd[0]
    assert t == 2 and torch.equal(img, attack.apply_trigger(test_set[int(keep[0])][0]))
    assert bd.num_classes == K and bd.classes == test_set.classes


def test_sig_is_clean_label_on_target_class_only(train, test_set):
    attack = create("sig", target=1)
    assert attack.poison_rate == 0.8  # SIG default: share of target-class images
    ds = attack.poison(train)
    n_target = int((train.labels == 1).sum())
    assert ds.poison_flag.sum() == round(0.8 * n_target)
    assert (train.labels[ds.poison_flag] == 1).all()
    assert np.array_equal(ds.labels, train.labels)  # labels unchanged
    i = int(np.flatnonzero(ds.poison_flag)[0])
    assert torch.equal(ds[i][0], attack.apply_trigger(train[i][0]))
    bd = attack.backdoor_test_set(test_set)
    assert (bd.true_labels != 1).all() and (bd.targets == 1).all()
    with pytest.raises(ConfigError, match="clean-label"):
        SIG(mode="all2all")


def test_generic_dataset_without_arrays(train):
    class ListDataset(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]

        def __init__(self):
            self.items = [(torch.rand(1, 6, 6), i % 3) for i in range(30)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    data = ListDataset()
    ds = BadNets(poison_rate=0.5).poison(data)
    assert ds.poison_flag.sum() == 10 and ds.num_classes == 3
    x, y = ds.as_arrays()
    assert x.shape == (30, 1, 6, 6) and torch.equal(x[5], ds[5][0])


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, True])
def test_bad_poison_rate(rate):
    with pytest.raises(ConfigError, match="poison_rate"):
        BadNets(poison_rate=rate)


def test_target_errors(train):
    with pytest.raises(ConfigError, match=">= 0"):
        BadNets(target=-1)
    with pytest.raises(ConfigError, match="target label 12 out of range for 10 classes"):
        BadNets(target=12, num_classes=10)
    with pytest.raises(ConfigError, match="target label 4 out of range for 4 classes"):
        BadNets(target=4).poison(train)
    with pytest.raises(ConfigError, match="poisons none"):
        BadNets(poison_rate=0.001).poison(train)
    with pytest.raises(ConfigError, match="10 classes"):
        BadNets(num_classes=10).poison(train)


def test_registry_errors():
    with pytest.raises(ConfigError, match="badnets") as info:
        create("no-such-attack")
    assert "unknown attack" in str(info.value)
    with pytest.raises(ConfigError, match="unknown option"):
        create("badnets", alpha=0.3)
    with pytest.raises(ConfigError, match="all2one"):
        create("badnets", mode="blend")
    with pytest.raises(ConfigError, match="troj-one"):
        create("troj-one", mode="all2all")
    assert set(attacks.available()) >= {"badnets", "blend", "trojan", "sig", "custom", "troj-one", "troj-all"}
    assert isinstance(create("BadNets"), BadNets)


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize("name,kw", [
    ("badnets", {"target": 2, "margin": 1}),
    ("blend", {"pattern_seed": 4, "alpha": 0.15}),
    ("blend", {"pattern": np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)}),
    ("troj-all", {"seed": 5}),
    ("sig", {"style": "blend", "target": 3}),
    ("custom", {"pattern": torch.rand(3, 2, 4), "position": (1, 2)}),
    ("custom", {"pattern": torch.rand(1, 4, 4), "style": "blend", "alpha": 0.3}),
])
def test_spec_round_trip_identical(train, name, kw):
    attack = create(name, **kw)
    spec = json.loads(json.dumps(attack.to_spec()))
    assert spec["name"] == attack.name and "trigger" in spec
    again = from_spec(spec)
    assert type(again) is type(attack) and again.to_spec() == attack.to_spec()
    x = torch.stack([train[i][0] for i in range(6)])
    assert torch.equal(attack.apply_trigger(x), again.apply_trigger(x))
    assert np.array_equal(attack.poison(train).poison_flag, again.poison(train).poison_flag)


def test_spec_with_mismatching_trigger_is_rejected():
    spec = BadNets().to_spec()
    spec["trigger"]["margin"] = 2
    with pytest.raises(ConfigError, match="trigger"):
        from_spec(spec)


# --------------------------------------------------------------------------- custom
def test_custom_trigger_from_png(tmp_path, train):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    path = tmp_path / "trigger.png"
    Image.fromarray(rgb).save(path)
    attack = CustomAttack(str(path), position=(0, 0))
    x, _ = train[0]
    out = attack.apply_trigger(x)
    assert torch.equal(out[:, :2, :2], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(out[:, 2:, :], x[:, 2:, :]) and torch.equal(out[:, :, 2:], x[:, :, 2:])
    again = from_spec(json.loads(json.dumps(attack.to_spec())))
    assert again.to_spec()["pattern"] == str(path) and torch.equal(again.apply_trigger(x), out)

    # alpha channel of an RGBA file acts as the mask; a separate grey mask file works too
    rgba = np.dstack([rgb, np.array([[255, 0], [0, 255]], dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = CustomAttack(tmp_path / "t.png", position=(0, 0)).apply_trigger(x)
    assert _changed(out, x)[:2, :2].tolist() == [[True, False], [False, True]]
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "m.png")
    out = CustomAttack(str(path), mask=str(tmp_path / "m.png"), position=(0, 0)).apply_trigger(x)
    assert _changed(out, x)[:2, :2].tolist() == [[False, True], [True, False]]


def test_custom_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CustomAttack(str(tmp_path / "missing.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read"):
        CustomAttack(tmp_path / "junk.png")
    with pytest.raises(DataError, match="shape"):
        CustomAttack(np.zeros((2, 2, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        CustomAttack(np.full((2, 2), 3.0))
    with pytest.raises(ConfigError, match="style"):
        CustomAttack(np.ones((2, 2)), style="stamp")
    with pytest.raises(ConfigError, match="position"):
        CustomAttack(np.ones((2, 2)), style="blend", position=(0, 0))
    big = CustomAttack(np.ones((20, 20), dtype=np.uint8) * 255)
    with pytest.raises(DataError, match="does not fit"):
        big.apply_trigger(torch.zeros(3, 8, 8))


def test_custom_attack_refuses_non_numeric_options():
    from fipurify import attacks
    from fipurify.errors import ConfigError
    with pytest.raises(ConfigError, match="alpha"):
        attacks.create("custom", pattern=[[1.0, 0.0], [0.0, 1.0]], alpha="abc")
    with pytest.raises(ConfigError, match="margin"):
        attacks.create("custom", pattern=[[1.0, 0.0], [0.0, 1.0]], margin="x")
