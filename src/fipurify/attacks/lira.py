"""LIRA (Doan et al., ICCV 2021): a learned, imperceptible additive trigger.

A conv autoencoder ``g`` gives each image a perturbation bounded in L_inf by ``eps``:
``T(x) = clamp(x + eps * tanh(g(x)), 0, 1)``, so ``|T(x) - x| <= eps`` pixel-wise.
Stage 1 of the paper learns ``g`` jointly with the classifier ``f`` by alternating

* a generator step on the backdoor loss of the classifier after one look-ahead SGD step,
  ``CE(f_{theta'}(T(x)), eta(y))`` with
  ``theta' = theta - lr * grad_theta[alpha * CE(f(x), y) + (1 - alpha) * CE(f(T(x)), eta(y))]``
  (back-propagated through the look-ahead step), and
* a classifier step on ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(T(x)), eta(y))``,

where ``eta(y)`` is the target (all2one) or ``(y + 1) % C`` (all2all). Stage 2 fine-tunes
the classifier with ``g`` fixed.

Simplification (documented): :meth:`prepare` runs stage 1 with a small surrogate CNN as
``f`` and freezes ``g``; stage 2 is replaced by training the victim normally on the
poisoned set (``poison_rate`` of the eligible images carry ``T(x)`` and the target
label), so the victim never sees the generator. ``eps`` is in [0, 1] pixel units.
Paper / official-code defaults: eps 0.01 (applied there to normalised CIFAR-10 inputs,
i.e. about 0.0025 in pixel units), alpha 0.5, classifier SGD lr 0.01, generator Adam
lr 1e-4. CPU-scale defaults here: eps 0.01, ``gen_epochs=10``, generator lr 1e-3
(few epochs need a larger step), width-16 networks. At the paper's tiny eps a victim
trained from scratch for a few epochs may not pick the trigger up; raise eps (e.g. 0.05)
for short runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .base import ATTACKS
from .generative import ConvAutoencoder, GeneratorAttack, ImageSource, SmallCNN, real_in


class LIRA(GeneratorAttack):
    """LIRA attack. Options: ``eps`` (L_inf bound, 0.01), ``alpha`` (clean-loss weight, 0.5),
    ``gen_epochs`` (10), ``gen_width`` (16), ``clf_width`` (16), ``gen_lr`` (1e-3),
    ``clf_lr`` (0.01), ``gen_batch_size`` (128). See the module docstring.
    """

    name = "lira"
    summary = "learned additive trigger (L-infinity 0.01)"
    label_dependent = True

    def __init__(self, target: int = 0, poison_rate: float | None = None, mode: str = "all2one",
                 seed: int = 0, num_classes: int | None = None, eps: float = 0.01, alpha: float = 0.5,
                 gen_epochs: int = 10, gen_width: int = 16, clf_width: int = 16, gen_lr: float = 1e-3,
                 clf_lr: float = 0.01, gen_batch_size: int = 128, image_shape=None, generator=None,
                 cache_dir: str | None = None):
        super().__init__(target, poison_rate, mode, seed, num_classes, image_shape, generator, cache_dir)
        self.eps = real_in("eps", eps, 0.0, 1.0, low_open=True)
        self.alpha = real_in("alpha", alpha, 0.0, 1.0)
        self._set_generator_options(gen_epochs, gen_width, gen_lr, gen_batch_size)
        self._set_surrogate_options(clf_width, clf_lr)
        self.finish_init()

    def generator_options(self) -> dict:
        return {"eps": self.eps, "alpha": self.alpha, "gen_epochs": self.gen_epochs, "gen_width": self.gen_width,
                "clf_width": self.clf_width, "gen_lr": self.gen_lr, "clf_lr": self.clf_lr,
                "gen_batch_size": self.gen_batch_size}

    def build_nets(self, channels: int, num_classes: int) -> nn.Module:
        return nn.ModuleDict({"generator": ConvAutoencoder(channels, channels, self.gen_width)})

    def _triggered(self, nets: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (x + self.eps * torch.tanh(nets["generator"](x))).clamp(0.0, 1.0)

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return self._triggered(self.nets, x)

    def fit(self, nets: nn.Module, source: ImageSource, device: torch.device, progress: bool) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        clf = SmallCNN(self.image_shape[0], self.num_classes, self.clf_width).to(device)
        opt_c = torch.optim.SGD(clf.parameters(), self.clf_lr, momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(nets.parameters(), self.gen_lr)
        a = self.alpha
        for _ in tqdm(range(self.gen_epochs), desc="lira generator", disable=not progress, leave=False):
            for idx in source.batches(self.gen_batch_size, gen):
                x, y = source.batch(idx, device), source.labels[idx].to(device)
                yt = torch.from_numpy(self.targets_for(y.cpu().numpy())).to(device)
                # generator step through a differentiable look-ahead of the classifier
                params = dict(clf.named_parameters())
                xa = self._triggered(nets, x)
                inner = a * F.cross_entropy(clf(x), y) + (1 - a) * F.cross_entropy(clf(xa), yt)
                grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
                ahead = {k: p - self.clf_lr * g for (k, p), g in zip(params.items(), grads)}
                loss_g = F.cross_entropy(functional_call(clf, ahead, (xa,)), yt)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                # classifier step with the generator fixed
                with torch.no_grad():
                    xa = self._triggered(nets, x)
                loss_c = a * F.cross_entropy(clf(x), y) + (1 - a) * F.cross_entropy(clf(xa), yt)
                opt_c.zero_grad(set_to_none=True)
                loss_c.backward()
                opt_c.step()


ATTACKS.register(LIRA.name, LIRA)
