"""Multi-label stand-in: CIFAR-10 mosaics, the multi-label task (BCE, Bernoulli targets, mAP)
and the clean-image attack (labels poisoned, images untouched)."""
import numpy as np
import pytest
import torch
from torch import nn

from fipurify import attacks, models
from fipurify.datasets import DATASETS, load
from fipurify.datasets.base import ArrayDataset
from fipurify.datasets.cifar10_mosaic import MultiLabelArrayDataset, downsample, mosaic
from fipurify.errors import ConfigError, DataError
from fipurify.tasks import TASKS, task_of
from fipurify.tasks.multilabel import MultiLabelClassification, average_precision, mean_average_precision


def tiny_base(n=60, classes=10, side=32, seed=0):
    """Random 32 x 32 images; label i % classes (every class present)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n) % classes, [f"c{k}" for k in range(classes)], name="tiny")


@pytest.fixture(scope="module")
def base():
    return tiny_base()


@pytest.fixture(scope="module")
def mosaics(base):
    return mosaic(base, 400, seed=3)


# --------------------------------------------------------------------------- dataset
def test_mosaic_label_is_the_union_of_the_four_classes(base, mosaics):
    assert mosaics.labels.shape == (400, 10)
    for i in range(len(mosaics)):
        src = mosaics.source_index[i]
        expected = np.zeros(10, dtype=np.uint8)
        expected[base.labels[src]] = 1
        np.testing.assert_array_equal(mosaics.labels[i], expected)
        assert set(np.flatnonzero(mosaics.labels[i])) == set(mosaics.tile_labels[i])
    assert 1 <= mosaics.labels.sum(1).min() and mosaics.labels.sum(1).max() <= 4


def test_mosaic_tiles_are_the_downsampled_sources(base, mosaics):
    small = downsample(base.images, 2)
    i = 7
    img = mosaics.images[i]
    for j, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        np.testing.assert_array_equal(img[16 * r:16 * r + 16, 16 * c:16 * c + 16], small[mosaics.source_index[i, j]])
    # area downsampling: a tile pixel is the rounded mean of a 2 x 2 block
    assert small[0, 0, 0, 0] == np.round(base.images[0, :2, :2, 0].astype(float).mean())
    x, y = mosaics[i]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), mosaics.labels[i])


def test_mosaic_is_deterministic_given_seed_and_size(base, mosaics):
    again = mosaic(base, 400, seed=3)
    np.testing.assert_array_equal(again.images, mosaics.images)
    np.testing.assert_array_equal(again.labels, mosaics.labels)
    other = mosaic(base, 400, seed=4)
    assert not np.array_equal(other.source_index, mosaics.source_index)
    assert not np.array_equal(mosaic(base, 400, seed=3, split="test").source_index, mosaics.source_index)
    assert mosaic(base, 10, seed=0, tile=32).images.shape == (10, 64, 64, 3)
    with pytest.raises(ConfigError):
        mosaic(base, 10, tile=12)
    with pytest.raises(ConfigError):
        mosaic(base, 0)


def test_mosaic_registration_and_task(mosaics):
    assert "cifar10-mosaic" in DATASETS
    assert DATASETS.entry("cifar10-mosaic").info.num_classes == 10
    assert isinstance(task_of(mosaics), MultiLabelClassification)
    with pytest.raises(ConfigError):
        load("cifar10-mosaic", split="test", bogus=1)


def test_real_cifar10_mosaic_small():
    from fipurify.datasets.cifar10 import find_cifar10
    from fipurify.datasets.roots import resolve_root
    try:
        find_cifar10(resolve_root())
    except DataError:
        pytest.skip("CIFAR-10 not available (../shared/data)")
    ds = load("cifar10-mosaic", split="test", size=50, seed=1)
    base = load("cifar10", split="test")
    assert ds.images.shape == (50, 32, 32, 3) and ds.classes == base.classes
    np.testing.assert_array_equal(ds.tile_labels, base.labels[ds.source_index])
    for i in range(50):
        assert set(np.flatnonzero(ds.labels[i])) == set(ds.tile_labels[i])


# --------------------------------------------------------------------------- task
def test_average_precision_hand_worked():
    # class 0: ranks 1 (pos), 2, 3 (pos), 4 -> (1/1 + 2/3) / 2
    # class 1: ranks 1 (pos), 2, 3, 4 (pos) -> (1/1 + 2/4) / 2
    # class 2: no positive -> left out of the mean
    scores = np.array([[0.9, 0.8, 0.3], [0.8, 0.4, 0.2], [0.7, 0.35, 0.1], [0.6, 0.1, 0.0]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    assert average_precision(scores[:, 0], targets[:, 0]) == pytest.approx(5 / 6)
    assert average_precision(scores[:, 1], targets[:, 1]) == pytest.approx(3 / 4)
    assert np.isnan(average_precision(scores[:, 2], targets[:, 2]))
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 3 / 4) / 2)
    # ties enter together: threshold 0.5 -> P 1/2, R 1/2; threshold 0.2 -> P 2/3, R 1
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0.1, 0.2], [1, 1]) == 1.0


def test_map_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 6)) < 0.3).astype(int)
    scores = np.round(rng.random((200, 6)) + targets * 0.5, 1)  # rounding makes ties
    ours = mean_average_precision(scores, targets)
    assert ours == pytest.approx(metrics.average_precision_score(targets, scores, average="macro"))


def test_per_sample_loss_is_the_nll_and_the_training_loss_its_mean_over_labels():
    task = TASKS.create("multilabel-classification")
    z = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p = torch.sigmoid(z)
    nll = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1)   # -log p(y|x), what the Fisher code differentiates
    torch.testing.assert_close(task.per_sample_loss(z, y), nll)
    model = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    torch.testing.assert_close(task.loss(model, x, y), task.per_sample_loss(model(x), y).mean() / 3)


def test_sample_targets_are_bernoulli_of_the_sigmoid():
    task = MultiLabelClassification()
    logits = torch.tensor([[-30.0, 30.0, 0.0, 1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    t = task.sample_targets(logits, generator=g)
    assert t.shape == logits.shape and set(t.unique().tolist()) <= {0.0, 1.0}
    freq = t.mean(0)
    assert freq[0] == 0 and freq[1] == 1
    assert abs(freq[2] - 0.5) < 0.02 and abs(freq[3] - torch.sigmoid(torch.tensor(1.0))) < 0.02
    again = task.sample_targets(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_check_sample_and_augment(mosaics):
    task = MultiLabelClassification()
    x, y = mosaics[0]
    task.check_sample(x, y)
    with pytest.raises(DataError):
        task.check_sample(x, 3)
    with pytest.raises(DataError):
        task.check_sample(x[0], y)
    batch = torch.stack([mosaics[i][0] for i in range(8)])
    out = task.augment(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and not torch.equal(out, batch)


class _Readout(nn.Module):
    """Logits = the first K pixels of channel 0, scaled: reads labels written into the image."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return self.scale * (x[:, 0, 0, :self.k] - 0.5)


def test_score_is_map_of_the_model():
    rng = np.random.default_rng(1)
    labels = (rng.random((50, 4)) < 0.4).astype(np.uint8)
    labels[0] = 1  # every class has a positive
    images = np.zeros((50, 8, 8, 3), dtype=np.uint8)
    images[:, 0, :4, 0] = labels * 255
    ds = MultiLabelArrayDataset(images, labels, ["a", "b", "c", "d"])
    task = task_of(ds)
    assert task.score(_Readout(4), ds, batch_size=16) == 1.0
    images[:, 0, :4, 0] = 255 - labels * 255  # anti-correlated scores
    assert task.score(_Readout(4), MultiLabelArrayDataset(images, labels, list("abcd"))) < 0.7


def test_preactresnet_serves_as_multilabel_model(mosaics):
    task = MultiLabelClassification()
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, width=4)
    x = torch.stack([mosaics[i][0] for i in range(4)])
    y = torch.stack([mosaics[i][1] for i in range(4)])
    assert model(x).shape == (4, 10)
    loss = task.loss(model, task.augment(x), y)
    loss.backward()
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- attack
@pytest.mark.parametrize("goal", ["appear", "disappear", "misclassify"])
def test_clean_image_changes_only_labels_of_trigger_images(mosaics, goal):
    target = 3 if goal == "disappear" else 0
    attack = attacks.create("clean-image", target=target, poison_rate=0.5, trigger_classes=[3, 5], goal=goal, seed=1)
    poisoned = attack.poison(mosaics)
    clean = mosaics.labels
    has_trigger = (clean[:, 3] == 1) & (clean[:, 5] == 1)
    eligible = has_trigger & ((clean[:, target] == 1) if goal == "disappear" else (clean[:, target] == 0))
    assert eligible.sum() >= 10
    flags = poisoned.poison_flag
    assert flags.sum() == round(0.5 * eligible.sum())
    assert not (flags & ~eligible).any()
    changed = (poisoned.labels != clean).any(axis=1)
    np.testing.assert_array_equal(changed, flags)  # every flagged label changes, nothing else does
    np.testing.assert_array_equal(poisoned.original_label, clean)
    rows = poisoned.labels[flags]
    if goal == "appear":
        assert (rows[:, 0] == 1).all() and (np.delete(rows, 0, 1) == np.delete(clean[flags], 0, 1)).all()
    elif goal == "disappear":
        assert (rows[:, 3] == 0).all() and (np.delete(rows, 3, 1) == np.delete(clean[flags], 3, 1)).all()
    else:  # source = first trigger class (3) replaced by the target
        assert (rows[:, 0] == 1).all() and (rows[:, 3] == 0).all() and (rows[:, 5] == 1).all()
    # images byte-identical, item by item too
    assert poisoned.images is mosaics.images
    for i in np.flatnonzero(flags)[:5]:
        x, y = poisoned[i]
        assert torch.equal(x, mosaics[i][0])
        np.testing.assert_array_equal(y.numpy(), poisoned.labels[i])
    assert isinstance(task_of(poisoned), MultiLabelClassification)


def test_clean_image_full_rate_poisons_every_trigger_image(mosaics):
    attack = attacks.create("clean-image", target=0, trigger_classes=[3, 5])
    assert attack.poison_rate == 1.0
    p = attack.poison(mosaics)
    np.testing.assert_array_equal(p.poison_flag, attack.eligible(mosaics.labels))
    assert attacks.from_spec(attack.to_spec()).to_spec() == attack.to_spec()


def test_clean_image_backdoor_test_set_and_asr(mosaics):
    attack = attacks.create("clean-image", target=0, trigger_classes=[3, 5], goal="misclassify")
    bd = attack.backdoor_test_set(mosaics)
    idx = bd.original_index
    assert ((mosaics.labels[idx][:, [3, 5]] == 1).all())
    np.testing.assert_array_equal(bd.true_labels, mosaics.labels[idx])
    assert (bd.targets[:, 0] == 1).all() and (bd.targets[:, 3] == 0).all()
    assert bd.attacked.tolist() == [True, False, False, True] + [False] * 6
    # success counts only the attacked classes (0 and 3)
    pred = bd.true_labels.copy()
    assert not bd.success(pred).any()
    pred[:, 0], pred[:, 3] = 1, 0
    pred[:, 7] = 1 - pred[:, 7]  # an unattacked class does not matter
    assert bd.success(pred).all()
    x, y = bd[0]
    assert torch.equal(x, mosaics[int(idx[0])][0])
    # a model that reads the poisoned labels back has ASR 1
    images = np.zeros((len(bd), 12, 12, 3), dtype=np.uint8)
    images[:, 0, :10, 0] = bd.targets * 255
    oracle_set = type(bd)(MultiLabelArrayDataset(images, bd.targets, mosaics.classes), np.arange(len(bd)),
                          bd.true_labels, bd.targets, bd.attacked)
    assert oracle_set.attack_success_rate(_Readout(10)) == 1.0


def test_clean_image_rejects_bad_settings(mosaics):
    with pytest.raises(ConfigError):
        attacks.create("clean-image", target=3, trigger_classes=[3, 5])  # appear: target always present
    with pytest.raises(ConfigError):
        attacks.create("clean-image", target=0, trigger_classes=[3, 5], goal="misclassify", source=7)
    with pytest.raises(ConfigError):
        attacks.create("clean-image", goal="vanish")
    with pytest.raises(ConfigError):
        attacks.create("clean-image", target=0, trigger_classes=[3, 12]).poison(mosaics)


# --------------------------------------------------------------------------- end to end
def _task_aware_defenses():
    import inspect

    from fipurify.defenses.base import Defense
    if "task" not in inspect.signature(Defense.purify).parameters:
        pytest.skip("the defenses are not task-aware in this tree")


def test_end_to_end_poison_train_purify_score(base):
    _task_aware_defenses()
    import fipurify.defenses  # noqa: F401  (registers the methods)
    from fipurify.defenses.base import DEFENSES
    from fipurify.training import TrainConfig, train_model

    train, test = mosaic(base, 160, seed=0), mosaic(base, 80, seed=0, split="test")
    attack = attacks.create("clean-image", target=0, trigger_classes=[3, 5])
    poisoned, bd = attack.poison(train), attack.backdoor_test_set(test)
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10, width=4)
    hist = train_model(model, poisoned, TrainConfig(epochs=1, batch_size=32), clean_test=test,
                       progress=False, log=None)
    assert 0 < hist[-1]["mAP"] <= 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    defense = DEFENSES.create("ft", epochs=1, batch_size=32)
    purified = defense.purify(model, train, progress=False)
    assert isinstance(defense.task, MultiLabelClassification)
    assert 0 < defense.report["history"][0]["holdout_mAP"] <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input model untouched
    assert not torch.equal(purified.classifier.weight, model.classifier.weight)
    assert 0 < task_of(test).score(purified, test) <= 1
    assert 0 <= bd.attack_success_rate(purified) <= 1
