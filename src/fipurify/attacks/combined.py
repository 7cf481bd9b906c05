"""Combined backdoor attack (FIP paper, Table 12): several attacks share one poison budget."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from .base import ATTACKS, Attack, dataset_labels
from .rendered import RenderedBackdoorTestSet, RenderedPoisonedDataset, Renderer
from .triggers import Trigger, _batched


class TriggerSet(Trigger):
    """The component triggers of a combined attack (one per component, in order).

    Each poisoned image carries exactly ONE of them, so :meth:`apply` is ambiguous and
    raises; use ``triggers[i].apply`` or the attack's datasets.
    """

    kind = "trigger-set"

    def __init__(self, triggers: Sequence[Trigger]):
        self.triggers = list(triggers)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _batched(x)
        raise DataError("a combined attack has one trigger per component: use "
                        "attack.components[i].apply_trigger(x)")

    def to_spec(self) -> dict:
        return {"type": self.kind, "triggers": [t.to_spec() for t in self.triggers]}


def _component_renderer(component: np.ndarray, triggers: Sequence[Trigger]) -> Renderer:
    """Renderer that applies ``triggers[component[p]]`` to the image at position ``p``."""

    def render(positions: np.ndarray, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        comp = component[positions]
        for i, t in enumerate(triggers):
            sel = comp == i
            if sel.any():
                out[torch.from_numpy(sel)] = t.apply(images[torch.from_numpy(sel)])
        return out

    return render


class Combined(Attack):
    """BadNets, Blend and Trojan (by default) each poison an equal, disjoint share of one budget.

    The budget is ``k = round(poison_rate * n_eligible)`` as for a single attack (eligible:
    non-target samples for all2one, all for all2all); each of the ``m`` components poisons
    ``k // m`` samples (so ``m * (k // m)`` in total), drawn without overlap with ``seed``.
    Every component uses its own default trigger (override with ``component_options``:
    ``{"blend": {"alpha": 0.1}}``) and the combined attack's target and mode. Components
    must be plain poison-label trigger attacks (badnets, blend, trojan, custom).

    The backdoor test set concatenates the components' backdoor test sets (component
    order), with ``component`` (index per image) and ``component_names``; its ASR is the
    mean of the per-component ASRs, which :meth:`component_metrics` reports separately.
    The poisoned set carries ``component`` too (-1 for clean samples).
    """

    name = "combined"
    summary = "BadNets + Blend + Trojan, disjoint shares"

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None,
                 components: Sequence[str] = ("badnets", "blend", "trojan"),
                 component_options: dict[str, dict[str, Any]] | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes)
        if isinstance(components, str) or not components:
            raise ConfigError(f"components must be a non-empty list of attack names, got {components!r}")
        names = [str(c) for c in components]
        if len(set(names)) != len(names):
            raise ConfigError(f"combined attack components must differ, got {names}")
        options = dict(component_options or {})
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(f"component_options for {', '.join(unknown)}, which are not components ({names})")
        self.components: list[Attack] = []
        for name in names:
            cls = ATTACKS[name] if name in ATTACKS else None
            if cls is None:
                raise ConfigError(f"unknown component attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
            if cls.clean_label or cls.poison is not Attack.poison or cls is Combined:
                raise ConfigError(f"{name} cannot be a component: only plain poison-label trigger attacks "
                                  f"(badnets, blend, trojan, custom) can share a combined budget")
            try:
                self.components.append(cls(target=target, poison_rate=self.poison_rate, mode=mode, seed=seed,
                                           num_classes=num_classes, **options.get(name, {})))
            except TypeError as exc:
                raise ConfigError(f"bad options for component {name}: {exc}") from None
        self.component_names = names
        self.component_options = {k: dict(v) for k, v in options.items()}
        self.trigger: TriggerSet = TriggerSet([a.trigger for a in self.components])

    def _bind(self, dataset: Any) -> int:
        n = super()._bind(dataset)
        for a in self.components:
            a.num_classes = n
        return n

    def poison(self, dataset) -> RenderedPoisonedDataset:
        """Poison ``k // m`` disjoint eligible samples with each of the ``m`` components."""
        n_classes = self._bind(dataset)
        labels = dataset_labels(dataset)
        candidates = np.flatnonzero(self.eligible(labels))
        m = len(self.components)
        per = round(self.poison_rate * len(candidates)) // m
        if per == 0:
            raise ConfigError(f"poison_rate {self.poison_rate} of {len(candidates)} eligible samples gives "
                              f"no sample to each of the {m} components; raise the rate")
        rng = np.random.default_rng(self.seed)
        drawn = rng.choice(candidates, size=per * m, replace=False)
        component = np.full(len(labels), -1, dtype=np.int64)
        for i in range(m):
            component[drawn[i * per:(i + 1) * per]] = i
        flags = component >= 0
        new_labels = labels.copy()
        new_labels[flags] = self.targets_for(labels[flags])
        render = _component_renderer(component, self.trigger.triggers)
        ds = RenderedPoisonedDataset(dataset, self.trigger, flags, new_labels, labels, n_classes, render)
        ds.component, ds.component_names = component, list(self.component_names)
        return ds

    def backdoor_test_set(self, dataset) -> RenderedBackdoorTestSet:
        """The components' backdoor test sets one after the other, with ``component`` per image."""
        n_classes = self._bind(dataset)
        parts = [a.backdoor_test_set(dataset) for a in self.components]
        component = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
        render = _component_renderer(component, self.trigger.triggers)
        ds = RenderedBackdoorTestSet(dataset, self.trigger, np.concatenate([p.original_index for p in parts]),
                                     np.concatenate([p.true_labels for p in parts]),
                                     np.concatenate([p.targets for p in parts]), n_classes, render)
        ds.component, ds.component_names = component, list(self.component_names)
        return ds

    def component_metrics(self, model: nn.Module, backdoor_test: RenderedBackdoorTestSet,
                          batch_size: int = 256) -> dict[str, dict[str, float]]:
        """ASR and LCR per component on a backdoor test set from :meth:`backdoor_test_set`."""
        from ..metrics import accuracy, predict

        component = getattr(backdoor_test, "component", None)
        if component is None:
            raise DataError("not a combined backdoor test set: it has no 'component' array")
        preds, targets = predict(model, backdoor_test, batch_size)
        out = {}
        for i, name in enumerate(self.component_names):
            sel = component == i
            out[name] = {"asr": accuracy(preds[sel], targets[sel]),
                         "lcr": accuracy(preds[sel], backdoor_test.true_labels[sel]), "n": int(sel.sum())}
        return out

    def _spec_args(self) -> dict:
        return {"components": list(self.component_names), "component_options": self.component_options}


ATTACKS.register(Combined.name, Combined)
