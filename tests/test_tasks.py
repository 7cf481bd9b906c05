"""The Task seam: defenses, the loop, the Fisher code and training ask the task, not images + CE.

A toy task that is neither images nor classification (regression of a vector from a 1-D input,
Gaussian likelihood) is defined here and counts what is asked of it: FT and f-FIP run on it
through the seam, an image-only or classification-only defense refuses it in one line before
any compute, and images stay the default.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fipurify import defenses, models
from fipurify.curvature.fisher import diag_fisher, fisher_trace
from fipurify.datasets.synthetic import synthetic
from fipurify.errors import ConfigError, DataError
from fipurify.tasks import ImageClassification, Task, task_of
from fipurify.training import TrainConfig, train_model

LENGTH, OUT = 6, 2


class CountingRegression(Task):
    """Vector regression with a unit-variance Gaussian likelihood; counts every call.

    ``-log p(y|x) = 1/2 ||y - f(x)||^2`` (+ a constant), targets drawn as ``f(x) + N(0, I)``;
    the valid augmentation is a small jitter; the metric ``exp(-MSE)`` lies in (0, 1].
    """

    name = "toy-regression"
    metric = "fit"

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def check_sample(self, x, y) -> None:
        self.calls["check_sample"] += 1
        if not torch.is_tensor(x) or x.shape != (LENGTH,):
            raise DataError(f"toy inputs must be vectors of length {LENGTH}, got {getattr(x, 'shape', x)!r}")

    def forward(self, model, x, y=None):
        self.calls["forward"] += 1
        self.calls["forward_with_target"] += y is not None
        return model(x)

    def per_sample_loss(self, output, y):
        self.calls["per_sample_loss"] += 1
        return 0.5 * (output - y).pow(2).sum(-1)

    def loss(self, model, x, y):
        self.calls["loss"] += 1
        return super().loss(model, x, y)

    def sample_targets(self, output, generator=None):
        self.calls["sample_targets"] += 1
        return output.detach() + torch.randn(output.shape, generator=generator).to(output.device)

    def augment(self, x, generator=None, **options):
        self.calls["augment"] += 1
        return x + 0.01 * torch.randn(x.shape, generator=generator).to(x.device)

    def score(self, model, dataset, batch_size=256) -> float:
        self.calls["score"] += 1
        model.eval()
        with torch.no_grad():
            xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
            ys = torch.stack([dataset[i][1] for i in range(len(dataset))])
            return float(torch.exp(-(model(xs) - ys).pow(2).mean()))


class ToyData(Dataset):
    """``n`` (vector, target) pairs of a fixed linear map plus noise; names its task."""

    def __init__(self, task: Task, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, LENGTH, generator=g)
        self.y = self.x @ torch.randn(LENGTH, OUT, generator=g) + 0.1 * torch.randn(n, OUT, generator=g)
        self.task = task

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(LENGTH, 8), nn.ReLU(), nn.Linear(8, OUT))


SHORT = dict(epochs=2, batch_size=16, lr=0.01, holdout=0.2, milestones=())


@pytest.mark.parametrize("method", ["ft", "ffip"])
def test_ft_and_ffip_purify_a_toy_regression_task_through_the_seam(method):
    task = CountingRegression()
    data = ToyData(task)
    model = _toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    defense = defenses.DEFENSES.create(method, **SHORT)
    purified = defense.purify(model, data, progress=False)
    assert defense.task is task  # task_of(dataset) found the dataset's own task
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # input model untouched
    assert any(not torch.equal(p, q) for p, q in zip(purified.parameters(), before))
    hist = defense.report["history"]
    assert len(hist) == 2 and all("ce" in r and "holdout_fit" in r and "holdout_acc" not in r for r in hist)
    steps = 2 * 2  # 2 epochs x ceil(32 / 16) batches
    assert task.calls["check_sample"] == 1 and task.calls["score"] == 2
    assert task.calls["augment"] == steps  # the loop augments as the task allows
    assert task.calls["per_sample_loss"] >= steps
    if method == "ft":
        assert task.calls["loss"] == steps and task.calls["sample_targets"] == 0
    else:  # f-FIP: the task loss through its shared forward pass, Tr(F) and diag(F) of its likelihood
        assert "trf" in hist[0] and "anchor" in hist[0]
        assert task.calls["sample_targets"] == 1  # Tr(F) on every 10th step: step 0 only
    assert task.calls["forward_with_target"] >= steps  # the model is run as the task says, target at hand


def test_fisher_code_takes_the_task_likelihood():
    """Gaussian likelihood: the score of one example is J^T (y - f), so for the output layer's bias
    (J = I) ``diag(F)`` is the mean of (y - f)^2 and the per-example trace has a closed form."""
    task = CountingRegression()
    data = ToyData(task, n=8)
    model = _toy_model().eval()
    bias = model[2].bias
    x, y = data.x, data.y
    fdiag = diag_fisher(model, [(x, y)], [bias], task=task)[0]
    with torch.no_grad():
        expected = (y - model(x)).pow(2).mean(0)
    assert torch.allclose(fdiag, expected, rtol=1e-5, atol=1e-6)
    trace = fisher_trace(model, x, [bias], "empirical", y=y, create_graph=False, task=task)
    assert torch.allclose(trace, expected.sum(), rtol=1e-5)
    sampled = fisher_trace(model, x, [bias], "exact", create_graph=False, task=task,
                           generator=torch.Generator().manual_seed(0))
    assert sampled > 0 and task.calls["sample_targets"] == 1
    with pytest.raises(ConfigError, match="needs a classification task"):
        fisher_trace(model, x, [bias], "exact-expected", task=task)


@pytest.mark.parametrize("method, reason", [("awm", "pixel trigger"), ("i-bau", "pixel range"),
                                            ("bti-dbf", "image-to-image"), ("sau", "pixel box"),
                                            ("rnp", "training accuracy"), ("fst", "classification head")])
def test_a_defense_refuses_a_task_it_cannot_purify_in_one_line(method, reason):
    task = CountingRegression()
    defense = defenses.DEFENSES.create(method)
    with pytest.raises(ConfigError, match=f"^{method} cannot purify a toy-regression model: .*{reason}") as err:
        defense.purify(_toy_model(), ToyData(task), progress=False)
    assert "\n" not in str(err.value)
    assert sum(task.calls.values()) == 0  # refused before any compute, before even checking the data


def test_a_task_given_by_argument_or_name_wins_over_the_dataset():
    task = CountingRegression()
    data = ToyData(task)
    defense = defenses.DEFENSES.create("ft", **SHORT)
    other = CountingRegression()
    defense.purify(_toy_model(), data, task=other, progress=False)
    assert defense.task is other and other.calls["loss"] > 0 and task.calls["loss"] == 0
    with pytest.raises(ConfigError, match="cannot purify a classification model"):
        defenses.DEFENSES.create("awm").purify(_toy_model(), data, task="classification", progress=False)


def test_training_time_defenses_ask_the_task_too():
    task = CountingRegression()
    abl = defenses.TRAINING_DEFENSES.create("abl", isolation_epochs=1, finetune_epochs=1, unlearn_epochs=1,
                                            batch_size=16, isolation_ratio=0.1, lr=0.01)
    abl.train(_toy_model(), ToyData(task), progress=False)
    assert abl.task is task and abl.report["n_isolated"] == 4  # isolated on the task's per-sample loss
    assert task.calls["loss"] == 3 + 3 + 1 and task.calls["augment"] == 3 + 3  # no augmentation when unlearning
    with pytest.raises(ConfigError, match="^cbd cannot train a toy-regression model: .*cross-entropies"):
        defenses.TRAINING_DEFENSES.create("cbd").train(_toy_model(), ToyData(CountingRegression()), progress=False)


def test_train_model_trains_a_toy_task_with_its_loss_and_augmentation():
    task = CountingRegression()
    data = ToyData(task)
    hist = train_model(_toy_model(), data, TrainConfig(epochs=2, batch_size=20, lr=0.01, schedule="constant"),
                       clean_test=ToyData(task, n=10, seed=1), progress=False, log=None)
    assert [r["epoch"] for r in hist] == [1, 2] and "train_acc" not in hist[0] and 0 < hist[-1]["fit"] <= 1
    assert task.calls["augment"] == 4 and task.calls["per_sample_loss"] == 4 and task.calls["score"] == 2


def test_images_stay_the_default_task():
    data = synthetic(n=40, num_classes=4, image_size=16, seed=0, split="reserve")
    assert isinstance(task_of(data), ImageClassification)

    def run(**task):
        torch.manual_seed(1)
        model = models.create("preactresnet18", num_classes=4, width=4, input_size=16)
        defense = defenses.DEFENSES.create("ft", epochs=1, batch_size=16, holdout=0.2)
        return defense, defense.purify(model, data, progress=False, **task)

    default, a = run()
    explicit, b = run(task=ImageClassification())
    assert isinstance(default.task, ImageClassification)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert default.report["history"][0]["ce"] == explicit.report["history"][0]["ce"]
    with pytest.raises(DataError, match=r"clean images must be C x H x W tensors, got shape \(6,\)"):
        defenses.DEFENSES.create("ft").purify(_toy_model(), ToyData(CountingRegression()), progress=False,
                                              task="image-classification")
