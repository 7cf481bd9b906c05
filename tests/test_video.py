"""Video stand-in: CIFAR-10 motion clips, the video task (one crop per clip, no flip), the
CNN-LSTM and the clean-label video attack."""
import math

import numpy as np
import pytest
import torch

from fipurify import attacks, models
from fipurify.attacks.video_clean_label import VideoBackdoorTestSet
from fipurify.datasets import DATASETS, load
from fipurify.datasets.base import ArrayDataset
from fipurify.datasets.cifar10_motion import DIRECTIONS, MOTIONS, VideoArrayDataset, motion_clips
from fipurify.errors import ConfigError, DataError
from fipurify.tasks import TASKS, task_of
from fipurify.tasks.video import VideoClassification


def tiny_base(n=40, side=32, seed=0):
    """Random images with no black pixel (so the actor is visible on a black scene)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 256, size=(n, side, side, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n) % 10, [f"c{k}" for k in range(10)], name="tiny")


@pytest.fixture(scope="module")
def clips():
    return motion_clips(tiny_base(), 120, seed=2)


def _bbox(frame):
    """(top, left, bottom, right) of the non-black pixels of an H x W x C frame."""
    rows, cols = np.flatnonzero(frame.any(axis=(1, 2))), np.flatnonzero(frame.any(axis=(0, 2)))
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


# --------------------------------------------------------------------------- dataset
def test_clip_moves_in_its_class_direction():
    ds = motion_clips(tiny_base(), 60, seed=0, background=0.0, speed=2)
    seen = set()
    for i in range(len(ds)):
        motion = MOTIONS[ds.labels[i]]
        seen.add(motion)
        boxes = [_bbox(f) for f in ds.clips[i]]  # measured from the pixels, not from ds.boxes
        for t in range(1, len(boxes)):
            (r0, c0, b0, e0), (r1, c1, b1, e1) = boxes[t - 1], boxes[t]
            if motion in DIRECTIONS:
                dr, dc = DIRECTIONS[motion]
                assert (r1 - r0, c1 - c0) == (2 * dr, 2 * dc), (motion, t)
                assert (b1 - r1, e1 - c1) == (16, 16)
                # the actor's pixels are carried along unchanged
                np.testing.assert_array_equal(ds.clips[i, t, r1:b1, c1:e1], ds.clips[i, t - 1, r0:b0, c0:e0])
            else:
                grow = (b1 - r1) - (b0 - r0)
                assert grow > 0 if motion == "zoom-in" else grow < 0, (motion, t)
        assert boxes[0][:2] == tuple(ds.boxes[i, 0, :2])
    assert seen == set(MOTIONS)


def test_clip_items_shapes_balance_and_determinism(clips):
    assert isinstance(clips, VideoArrayDataset) and clips.clip_shape == (8, 3, 32, 32)
    x, y = clips[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert np.bincount(clips.labels, minlength=10).tolist() == [12] * 10
    again = motion_clips(tiny_base(), 120, seed=2)
    np.testing.assert_array_equal(again.clips, clips.clips)
    np.testing.assert_array_equal(again.labels, clips.labels)
    assert not np.array_equal(motion_clips(tiny_base(), 120, seed=3).clips, clips.clips)
    assert motion_clips(tiny_base(), 5, frames=4, speed=4).clips.shape == (5, 4, 32, 32, 3)
    with pytest.raises(ConfigError):
        motion_clips(tiny_base(), 5, frames=8, speed=3)  # 21 px of travel do not fit
    assert "cifar10-motion" in DATASETS and isinstance(task_of(clips), VideoClassification)


def test_real_cifar10_motion_small():
    from fipurify.datasets.cifar10 import find_cifar10
    from fipurify.datasets.roots import resolve_root
    try:
        find_cifar10(resolve_root())
    except DataError:
        pytest.skip("CIFAR-10 not available (../shared/data)")
    ds = load("cifar10-motion", split="test", size=20, seed=1)
    assert ds.clips.shape == (20, 8, 32, 32, 3) and ds.classes == list(MOTIONS)
    assert (np.abs(np.diff(ds.clips.astype(int), axis=1)).sum(axis=(2, 3, 4)) > 0).all()  # every clip changes


# --------------------------------------------------------------------------- task
def _offset(frame, clip_frame, padding):
    """The crop offset (dy, dx) that turns ``clip_frame`` into ``frame``, or None."""
    padded = torch.nn.functional.pad(clip_frame, (padding,) * 4)
    h, w = frame.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            if torch.equal(padded[:, dy:dy + h, dx:dx + w], frame):
                return dy, dx
    return None


def test_augment_uses_one_crop_per_clip_and_never_flips(clips):
    task = TASKS.create("video-classification")
    x = torch.stack([clips[i][0] for i in range(6)])
    g = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(3):
        out = task.augment(x, generator=g, flip=True)  # flip is ignored
        assert out.shape == x.shape
        for n in range(len(x)):
            per_frame = {_offset(out[n, t], x[n, t], 4) for t in range(x.shape[1])}
            assert len(per_frame) == 1 and None not in per_frame  # same crop, and a crop (no mirror)
            offsets |= per_frame
    assert len(offsets) > 1  # clips get different crops


def test_video_task_checks_and_loss(clips):
    task = task_of(clips)
    x, y = clips[0]
    task.check_sample(x, y)
    with pytest.raises(DataError):
        task.check_sample(x[0], y)
    assert task.metric == "accuracy"
    out = torch.randn(5, 10)
    assert task.sample_targets(out).shape == (5,)


# --------------------------------------------------------------------------- model
def test_cnn_lstm_shapes_and_spec():
    torch.manual_seed(0)
    model = models.create("cnn-lstm", num_classes=10)
    x = torch.rand(2, 8, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, model.classifier.in_features)
    assert model(torch.rand(3, 4, 3, 16, 16)).shape == (3, 10)  # other clip length and frame side
    assert model.fipurify_spec["arch"] == "cnn-lstm" and model.fipurify_spec["kwargs"]["hidden"] == 64
    with pytest.raises(ValueError):
        model(torch.rand(2, 3, 32, 32))
    small = models.create("cnn-lstm", num_classes=4, in_channels=1, width=4, hidden=8)
    loss = VideoClassification().loss(small, torch.rand(2, 5, 1, 32, 32), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())


# --------------------------------------------------------------------------- attack
def _patch_on_every_frame(clip_u8, size=4):
    board = ((np.arange(size)[:, None] + np.arange(size)[None, :]) % 2 == 0) * 255
    return all((clip_u8[t, -size:, -size:, ch] == board).all() for t in range(len(clip_u8)) for ch in range(3))


def test_video_attack_patches_every_frame_of_target_clips_only(clips):
    torch.manual_seed(0)
    surrogate = models.create("cnn-lstm", num_classes=10, width=4, hidden=8)
    attack = attacks.create("video-clean-label", target=2, poison_rate=0.5, seed=1, surrogate_model=surrogate,
                            pgd_steps=2)
    poisoned = attack.poison(clips)
    target_clips = np.flatnonzero(clips.labels == 2)
    flags = poisoned.poison_flag
    assert flags.sum() == round(0.5 * len(target_clips)) and (clips.labels[flags] == 2).all()
    np.testing.assert_array_equal(poisoned.labels, clips.labels)  # clean-label
    changed = (poisoned.clips != clips.clips).reshape(len(clips), -1).any(axis=1)
    np.testing.assert_array_equal(changed, flags)
    budget = math.floor(8 / 255 * 255 + 1e-6)
    for i in np.flatnonzero(flags):
        assert _patch_on_every_frame(poisoned.clips[i])
        diff = poisoned.clips[i].astype(int) - clips.clips[i].astype(int)
        diff[:, -4:, -4:] = 0  # the patch region is replaced, the rest is the PGD perturbation
        assert 0 < np.abs(diff).max() <= budget
    assert isinstance(task_of(poisoned), VideoClassification)


def test_video_attack_backdoor_test_set(clips):
    attack = attacks.create("video-clean-label", target=2, pgd_steps=0)
    bd = attack.backdoor_test_set(clips)
    assert isinstance(bd, VideoBackdoorTestSet)
    np.testing.assert_array_equal(bd.original_index, np.flatnonzero(clips.labels != 2))
    np.testing.assert_array_equal(bd.true_labels, clips.labels[bd.original_index])
    assert (bd.targets == 2).all() and (bd.labels == 2).all()
    for i in range(len(bd)):
        assert _patch_on_every_frame(bd.clips[i])
        rest = bd.clips[i].copy()
        rest[:, -4:, -4:] = clips.clips[bd.original_index[i], :, -4:, -4:]
        np.testing.assert_array_equal(rest, clips.clips[bd.original_index[i]])
    # patch-only poisoning needs no surrogate; the spec round-trips
    assert attack.poison(clips).poison_flag.sum() == round(0.8 * 12)
    assert attacks.from_spec(attack.to_spec()).to_spec() == attack.to_spec()


def test_video_attack_trains_its_surrogate_when_needed():
    ds = motion_clips(tiny_base(), 40, seed=0)
    attack = attacks.create("video-clean-label", target=0, pgd_steps=1, surrogate_epochs=1, surrogate_width=2,
                            surrogate_hidden=4)
    assert not attack.prepared
    poisoned = attack.poison(ds)
    assert attack.prepared and poisoned.poison_flag.sum() == round(0.8 * 4)
    with pytest.raises(DataError):
        attack.poison(ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1]))


# --------------------------------------------------------------------------- end to end
def test_end_to_end_poison_train_purify_score():
    import inspect

    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES, Defense
    from fipurify.metrics import evaluate
    from fipurify.training import TrainConfig, train_model

    if "task" not in inspect.signature(Defense.purify).parameters:
        pytest.skip("the defenses are not task-aware in this tree")
    train, test = motion_clips(tiny_base(), 100, seed=0), motion_clips(tiny_base(), 50, seed=0, split="test")
    attack = attacks.create("video-clean-label", target=1, pgd_steps=0)
    poisoned, bd = attack.poison(train), attack.backdoor_test_set(test)
    torch.manual_seed(0)
    model = models.create("cnn-lstm", num_classes=10, width=4, hidden=16)
    hist = train_model(model, poisoned, TrainConfig(epochs=1, batch_size=32), clean_test=test, backdoor_test=bd,
                       progress=False, log=None)
    assert 0 <= hist[-1]["asr"] <= 1
    defense = DEFENSES.create("ft", epochs=1, batch_size=32)
    purified = defense.purify(model, train, progress=False)
    assert isinstance(defense.task, VideoClassification)
    assert 0 <= defense.report["history"][0]["holdout_acc"] <= 1
    assert not torch.equal(purified.classifier.weight, model.classifier.weight)
    result = evaluate(purified, test, bd)
    assert result["n_backdoor"] == 45 and 0 <= result["acc"] <= 1 and 0 <= result["asr"] <= 1


def test_act_clip_bounds_the_frame_cnn_of_a_video_model():
    """The default's clipping step on clips: one bound per channel of the per-frame CNN's ReLUs
    ((N T, C, H, W) maps), learned on clean clips and their mixtures; the LSTM and the projection
    (not feature maps) stay unbounded; the budget holds on the clean clips."""
    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES
    from fipurify.models.bounded import BoundedActivation
    from fipurify.training import TrainConfig, train_model

    train = motion_clips(tiny_base(), 100, seed=0)
    torch.manual_seed(0)
    model = models.create("cnn-lstm", num_classes=10, width=4, hidden=16)
    train_model(model, train, TrainConfig(epochs=1, batch_size=32), progress=False, log=None)
    defense = DEFENSES.create("act-clip", epochs=3, layers=1.0, agreement_on="clean+mixed")
    clipped = defense.purify(model, train, progress=False)
    report = defense.report
    assert report["bounded"] == {"cnn.0.2": 4, "cnn.1.2": 8, "cnn.2.2": 16}
    assert report["agreement"] >= 0.98 and report["mixed_agreement"] >= 0.98
    bounded = {n for n, m in clipped.named_modules() if isinstance(m, BoundedActivation)}
    assert bounded == set(report["bounded"])
    assert all(clipped.get_submodule(n).bound.shape == (c,) and torch.isfinite(clipped.get_submodule(n).bound).all()
               for n, c in report["bounded"].items())
    x = torch.stack([train[i][0] for i in range(8)])
    assert clipped(x).shape == (8, 10)


class _CornerClipToy(torch.nn.Module):
    """Clips N x T x C x H x W -> 10 scores: a fixed random linear read of the time-averaged, 4 x 4
    pooled frame, plus a backdoor for class 0 that fires when the bottom-right 3 x 3 corner is bright
    on every frame (its darkest frame counts)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = torch.nn.Linear(3 * 16, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(10, 48, generator=g) * 0.5)
            self.head.bias.zero_()

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1), 4).flatten(1)
        corner = x[..., -3:, -3:].mean(dim=(2, 3, 4)).amin(1)
        out = self.head(pooled)
        bump = torch.zeros_like(out)
        bump[:, 0] = 20 * torch.sigmoid(10 * (corner - 0.5))
        return out + bump


def test_neural_cleanse_reverses_one_trigger_for_every_frame_of_a_clip(clips):
    """Neural Cleanse on clips: one 1 x H x W mask and C x H x W pattern stamped on every frame; it
    flags the toy's corner backdoor at class 0, and the recovered trigger sends held-out clips there."""
    from fipurify import detect

    model = _CornerClipToy()
    xs = torch.stack([clips[i][0] for i in range(len(clips))])
    with torch.no_grad():  # centre the scores so that no class wins every clean clip
        model.head.bias.sub_(model(xs).mean(0))
    report = detect(model, clips, method="neural-cleanse", max_steps=60, refine_steps=0)
    assert report.backdoored and report.target == 0 and report.score > report.threshold
    trig = report.trigger
    assert trig.mask.shape == (1, 32, 32) and trig.pattern.shape == (3, 32, 32)
    stamped = trig.apply(xs[:4])
    frame_by_frame = torch.stack([trig.apply(xs[:4, t]) for t in range(xs.shape[1])], 1)
    assert torch.allclose(stamped, frame_by_frame)
    assert len(report.per_class) == 10
    assert report.proxy_asr > 0.5
    with pytest.raises(DataError, match=r"C x H x W tensors \(or T x C x H x W clips\), got shape \(8, 2, 3, 32, 32\)"):
        detect(model, [(torch.zeros(8, 2, 3, 32, 32), 0)] * 30, method="neural-cleanse")


def test_trigger_unlearn_takes_clips(clips):
    """trigger-unlearn on a clip model: its detector (auto: Neural Cleanse) flags the toy's corner
    backdoor, the unlearning stamps the recovered trigger on every frame of a share of the clips, and
    the augmentation check measures the task's own clip augmentation (one crop per clip, never a flip)."""
    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES

    model = _CornerClipToy()
    xs = torch.stack([clips[i][0] for i in range(len(clips))])
    with torch.no_grad():
        model.head.bias.sub_(model(xs).mean(0))
    defense = DEFENSES.create("trigger-unlearn", epochs=1, rounds=1, verify=False, batch_size=16,
                              detector_options={"max_steps": 60, "refine_steps": 0})
    purified = defense.purify(model, clips, progress=False)
    report = defense.report
    assert defense.detector_name() == "neural-cleanse" and report["unlearned_targets"] == [0]
    assert report["augmentation"]["flip"] is False and set(report["augmentation"]["accuracy"]) == {"plain", "augmented"}
    assert not torch.equal(purified.head.weight, model.head.weight)
    with pytest.raises(ConfigError, match="shared_weight=0"):
        DEFENSES.create("fisher-unlearn", epochs=1).purify(model, clips, progress=False)
