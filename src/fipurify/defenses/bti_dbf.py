"""BTI-DBF(U): backdoor trigger inversion by decoupling benign features, then unlearning
(Xu et al., ICLR 2024, "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features"), optionally with PAM (Min et al., NeurIPS 2024, "Uncovering,
Explaining, and Mitigating the Superficial Safety of Backdoor Defense").

Each round, on a frozen copy of the current model with features ``f(x)`` and head ``h``:

1. *Decoupling benign features*: a soft mask ``m = tanh(w) / 2 + 1/2`` over the feature
   tensor minimises ``CE(h(m * f(x)), y) - CE(h((1 - m) * f(x)), y)``: the masked part
   alone predicts the clean label (benign features), the rest cannot.
2. *Trigger inversion*: a generator ``G`` (image -> image, ``G(x) = clip(x + delta(x), 0, 1)``
   with a per-image budget ``mean(delta^2) <= norm_bound``) keeps the benign features and
   moves the others as far as possible::

       L_G = MSE(x, G(x))                                   if MSE(x, G(x)) > norm_bound
                                                           or MSE(m f(x), m f(G(x))) > feat_bound
       L_G = -MSE((1-m) f(x), (1-m) f(G(x))) + 0.01 MSE(m f(x), m f(G(x)))   otherwise
             (+ CE(f(G(x)), t) from the second round on, t the detected target label)

   After the first round's inversion the target label ``t`` is the class the model gives
   most often to ``G(x + N(0, 0.03^2))`` over the clean set.
3. *Unlearning*: fine-tune the model with a share of each batch replaced by generated
   images under their true labels: ``CE(f(x'), y) + MSE(f(x), f(x'))``.

``pam=True`` (Path-Aware Minimisation) takes each unlearning gradient at a point moved from the
current weights ``theta`` toward the backdoored (input) weights ``theta_0``::

    theta_r = theta + min(rho, ||theta_0 - theta||) (theta_0 - theta) / ||theta_0 - theta||
    theta  <- theta - lr * grad L(theta_r)

which pushes the purified model further from ``theta_0`` along the backdoor-connected path
(PAM's cure for "superficial safety", where a few poisoned samples re-implant the backdoor).

Defaults: the authors' BTI-DBF(U) code (github.com/xuxiong0214/BTIDBF, ``btidbfu.py``,
``cfg.py``, README): 5 rounds of 20 mask epochs (Adam lr 0.01), 30 generator epochs (Adam lr
1e-3), 30 unlearning epochs (Adam lr 1e-4) with 10% (+1) of each batch generated, feat_bound 5,
batch 128, crop + flip augmentation; their generator is a UNet with 32 base filters and 4
blocks. The "bti-dbf-pam" configuration takes the PAM authors' code for BTI-DBF(U)
(github.com/AISafety-HKUST/stable_backdoor_purification, ``fine_tune/BTIDBF``): rho 0.5,
SGD lr 0.01 with momentum 0.1, 20% (+1) generated, cross-entropy only, 3 rounds.
Both papers' experiments use 5% of the training set as clean data (as we read them); we give
every method the same 500 images (1% of CIFAR-10). ``feat_bound`` is in the model's feature
units: 5 suits a ResNet-18's last feature map; a narrow model's features need a smaller one.
At these defaults a CPU run on a CIFAR-10 ResNet-18 takes hours (every round trains the
generator 30 epochs and the model 30 epochs); ``rounds``, ``gen_epochs``, ``epochs``,
``gen_width`` and ``gen_depth`` are the knobs for a cheaper run.

Where we differ, and why:
- Images are in [0, 1] here (the models normalise inside); their ``norm_bound`` 0.3 is an MSE
  on CIFAR-normalised images (std ~0.2), so ours is 0.3 * 0.2^2 = 0.012 in pixel units, and it
  is enforced per image by projection (a hard budget) on top of their switching loss.
- Our generator is residual with a near-zero output layer, so it starts next to the identity;
  theirs is pre-trained for 50 epochs to reproduce its input (``pretrain.py``), which we skip.
  It normalises with GroupNorm (batch-independent). ``gen_width``/``gen_depth`` shrink it for CPU.
- Features are the model's last feature map when it has ``feature_map`` + ``pool`` +
  ``classifier`` (their ResNet's layer4 output), else the penultimate vector ``features(x)``.
- The inversion runs the frozen copy in eval mode (running BN statistics; theirs trains the
  mask with batch statistics on the copy).
- PAM's step is capped at ``||theta_0 - theta||`` so that the gradient point lies between the
  current and the original weights (their code always moves exactly rho, which overshoots
  past theta_0 while the model is still close to it).
- ``early_stop`` (off, as theirs) ends the rounds when the detected target label changes.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .base import DEFENSES, Defense, DefenseConfig, EpochCallback, Step, labelled
from .loop import finetune, make_optimizer


@dataclass
class BTIDBFConfig(DefenseConfig):
    """BTI-DBF(U) settings (sources in the module docstring). The base fields configure the
    unlearning of each round (``epochs`` per round, ``optimizer`` "adam" or "sgd");
    ``rounds`` alternations of mask (``mask_epochs``, ``mask_lr``), generator (``gen_epochs``,
    ``gen_lr``, budget ``norm_bound``, ``feat_bound``) and unlearning (``poison_share`` of each
    batch generated, ``feature_weight`` on the feature-matching term). ``pam`` turns on
    path-aware minimisation with radius ``pam_rho``."""
    epochs: int = 30
    lr: float = 1e-4
    optimizer: str = "adam"
    batch_size: int = 128
    milestones: tuple[int, ...] = ()
    rounds: int = 5
    mask_epochs: int = 20
    mask_lr: float = 0.01
    gen_epochs: int = 30
    gen_lr: float = 1e-3
    norm_bound: float = 0.012
    feat_bound: float = 5.0
    benign_weight: float = 0.01
    target_weight: float = 1.0
    poison_share: float = 0.1
    feature_weight: float = 1.0
    gen_width: int = 32
    gen_depth: int = 4
    detect_noise: float = 0.03
    early_stop: bool = False
    pam: bool = False
    pam_rho: float = 0.5

    def validate(self) -> "BTIDBFConfig":
        super().validate()
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for key in ("rounds", "mask_epochs", "gen_epochs", "gen_width", "gen_depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        if not (self.mask_lr > 0 and self.gen_lr > 0):
            raise ConfigError("mask_lr and gen_lr must be positive")
        if not (0 < self.norm_bound < 1 and self.feat_bound > 0):
            raise ConfigError(f"norm_bound (a pixel MSE budget) must lie in (0, 1) and feat_bound be positive, "
                              f"got {self.norm_bound}, {self.feat_bound}")
        if self.benign_weight < 0 or self.target_weight < 0 or self.feature_weight < 0 or self.detect_noise < 0:
            raise ConfigError("benign_weight, target_weight, feature_weight and detect_noise must be >= 0")
        if not 0 < self.poison_share <= 1:
            raise ConfigError(f"poison_share must lie in (0, 1], got {self.poison_share}")
        if self.pam and not self.pam_rho > 0:
            raise ConfigError(f"pam_rho (PAM's step toward the original weights) must be positive, got {self.pam_rho}")
        return self


# --- features ------------------------------------------------------------------------------------

class FeatureSplit:
    """``model(x) == head(model, encode(model, x))``: the last feature map and pooled head when the
    model has ``feature_map``, ``pool`` and ``classifier``, else the penultimate vector ``features``."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(example)
                self.kind = ""
                if all(hasattr(model, a) for a in ("feature_map", "pool", "classifier")) \
                        and torch.allclose(self._head("map", model, model.feature_map(example)), out, atol=1e-4):
                    self.kind = "map"
                elif hasattr(model, "features") and hasattr(model, "classifier") \
                        and torch.allclose(model.classifier(model.features(example)), out, atol=1e-4):
                    self.kind = "vector"
        finally:
            model.train(was)
        if not self.kind:
            raise ConfigError(f"BTI-DBF needs the model's features: {type(model).__name__} has no features(x) "
                              "and classifier with classifier(features(x)) == model(x)")

    @staticmethod
    def _head(kind: str, model: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        if kind == "map":
            return model.classifier(torch.flatten(model.pool(feat), 1))
        return model.classifier(feat)

    def encode(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.feature_map(x) if self.kind == "map" else model.features(x)

    def head(self, model: nn.Module, feat: torch.Tensor) -> torch.Tensor:
        return self._head(self.kind, model, feat)


# --- generator -----------------------------------------------------------------------------------

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.LeakyReLU(0.2))


def project_budget(delta: torch.Tensor, budget: float) -> torch.Tensor:
    """Scale each image's ``delta`` so that its mean square is at most ``budget``."""
    msq = delta.pow(2).flatten(1).mean(1)
    scale = torch.sqrt(budget / (msq + 1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


class TriggerGenerator(nn.Module):
    """A small residual UNet: ``G(x) = clip(x + delta(x), 0, 1)``, ``mean(delta^2) <= budget`` per
    image. ``width`` base channels doubled per level (capped at 512), ``depth`` levels; the output
    layer starts near zero, so ``G`` starts next to the identity (exactly there every inversion
    loss is stationary)."""

    def __init__(self, channels: int, budget: float, width: int = 32, depth: int = 4):
        super().__init__()
        self.budget = float(budget)
        widths = [min(width * 2 ** i, 512) for i in range(depth)]
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(_Block(cin, w))
            cin = w
        self.bottleneck = _Block(cin, min(2 * cin, 512))
        cin = min(2 * cin, 512)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_Block(cin + w, w))
            cin = w
        self.out = nn.Conv2d(cin, channels, 1)
        nn.init.normal_(self.out.weight, std=1e-3)  # near (not at: a stationary point) the identity
        nn.init.zeros_(self.out.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
            if min(h.shape[-2:]) >= 2:
                h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for block, skip in zip(self.up, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1))
        return project_budget(self.out(h), self.budget)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta(x)).clamp(0.0, 1.0)


class _MaskHolder(nn.Module):
    """The feature mask's raw parameter ``w``; the mask is ``tanh(w) / (2 + 1e-7) + 0.5`` in (0, 1)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.raw = nn.Parameter(init)

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.raw) / (2 + 1e-7) + 0.5


# --- PAM -----------------------------------------------------------------------------------------

@torch.no_grad()
def pam_point(current: list[torch.Tensor], original: list[torch.Tensor], rho: float
              ) -> tuple[list[torch.Tensor], float]:
    """PAM's gradient point ``theta + t (theta_0 - theta)`` with ``t = min(rho, ||d||) / ||d||``,
    ``d = theta_0 - theta`` over all tensors together; returns the point and ``t`` (0 when
    ``theta == theta_0``). It always lies on the segment between ``theta`` and ``theta_0``."""
    diffs = [o - c for c, o in zip(current, original)]
    dist = float(torch.sqrt(sum(d.pow(2).sum() for d in diffs)))
    if dist == 0.0:
        return [c.clone() for c in current], 0.0
    t = min(rho, dist) / dist
    return [c + t * d for c, d in zip(current, diffs)], t


# --- the defense ---------------------------------------------------------------------------------

def _phase_config(cfg: BTIDBFConfig, epochs: int, lr: float, seed: int) -> DefenseConfig:
    """Loop settings for an inversion phase (mask or generator): Adam, no schedule."""
    return DefenseConfig(epochs=epochs, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=cfg.batch_size,
                         milestones=(), gamma=1.0, augment=cfg.augment, flip=cfg.flip, holdout=cfg.holdout,
                         min_clean=cfg.min_clean, seed=seed, bn_mode="eval", grad_clip=None).validate()


class BTIDBF(Defense):
    """BTI-DBF(U) (Xu et al., ICLR 2024), with optional PAM (Min et al., NeurIPS 2024).

    Inverts the backdoor with a generator that keeps the model's benign features (found first,
    as a feature mask) and pushes the remaining ones as far as a small perturbation budget
    allows, then unlearns by fine-tuning on generated images under their true labels; the two
    alternate for a few rounds. With PAM each unlearning gradient is taken part of the way back
    toward the backdoored weights, so the update moves the model further away from them.
    """

    name = "bti-dbf"
    summary = {"bti-dbf": "trigger inversion by decoupling benign features, then unlearning",
               "bti-dbf-pam": "BTI-DBF with path-aware minimisation"}
    config_class = BTIDBFConfig
    tasks = ("image-classification",)
    task_reason = "its trigger generator is an image-to-image network (C x H x W in, C x H x W in [0, 1] out)"

    def method_name(self) -> str:
        return "bti-dbf-pam" if self.config.pam else self.name

    def copy_model(self, model: nn.Module) -> nn.Module:
        """Eval mode, every parameter trainable (the classifier is unlearned in place)."""
        return copy.deepcopy(model).requires_grad_(True).eval()

    def _purify(self, model: nn.Module, train_set: Dataset, holdout: Dataset | None, *,
                progress: bool, callback: EpochCallback | None) -> Step:
        cfg: BTIDBFConfig = self.config
        work = model  # the template's copy: eval mode, every parameter trainable
        params = list(work.parameters())
        device = params[0].device
        original = [p.detach().clone() for p in params]
        x0 = torch.as_tensor(train_set[0][0])[None].float().to(device)
        split = FeatureSplit(work, x0)
        with torch.no_grad():
            feat_shape = split.encode(work, x0).shape[1:]
        generator = TriggerGenerator(x0.shape[1], cfg.norm_bound, cfg.gen_width, cfg.gen_depth).to(device)
        opt_gen = torch.optim.Adam(generator.parameters(), lr=cfg.gen_lr)
        opt_cls = make_optimizer(params, cfg, cfg.optimizer)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        history: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        pam_ts: list[float] = []
        seconds = {"mask": 0.0, "generator": 0.0, "unlearn": 0.0}
        target: int | None = None
        early_stopped = False

        def tagged(r: int, phase: str) -> EpochCallback:
            return labelled(labelled(callback, "round", r + 1), "phase", phase)

        for r in range(cfg.rounds):
            frozen = copy.deepcopy(work).eval().requires_grad_(False)

            # 1. decoupling benign features: a soft mask on the frozen model's features
            t0 = time.perf_counter()
            holder = _MaskHolder(torch.randn((1, *feat_shape), generator=gen).to(device))

            def mask_objective(_h: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
                m = holder.mask()
                with torch.no_grad():
                    f = split.encode(frozen, x)
                return {"pos_ce": F.cross_entropy(split.head(frozen, m * f), y),
                        "neg_ce": -F.cross_entropy(split.head(frozen, (1 - m) * f), y)}

            mcfg = _phase_config(cfg, cfg.mask_epochs, cfg.mask_lr, cfg.seed + 100 * r)
            history += finetune(holder, [holder.raw], train_set, mcfg,
                                optimizer=torch.optim.Adam([holder.raw], lr=cfg.mask_lr), progress=progress,
                                callback=tagged(r, "mask"), desc=f"{self.method_name()}: mask {r + 1}",
                                objective=mask_objective, task=self.task)
            mask = holder.mask().detach()
            seconds["mask"] += time.perf_counter() - t0

            # 2. trigger inversion: keep the benign (masked) features, move the others
            t0 = time.perf_counter()
            round_target = target

            def gen_objective(g: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
                xg = g(x)
                with torch.no_grad():
                    fc = split.encode(frozen, x)
                fg = split.encode(frozen, xg)
                benign = F.mse_loss(mask * fg, mask * fc)
                other = F.mse_loss((1 - mask) * fg, (1 - mask) * fc)
                pixel = F.mse_loss(xg, x)
                if pixel > cfg.norm_bound or benign > cfg.feat_bound:
                    terms = {"gen_loss": pixel}
                else:
                    terms = {"gen_loss": -other + cfg.benign_weight * benign}
                if round_target is not None and cfg.target_weight > 0:
                    tl = torch.full_like(y, round_target)
                    terms["target_ce"] = cfg.target_weight * F.cross_entropy(split.head(frozen, fg), tl)
                terms.update(benign_feat=benign.detach(), backdoor_feat=other.detach(), pixel_mse=pixel.detach())
                return terms

            gcfg = _phase_config(cfg, cfg.gen_epochs, cfg.gen_lr, cfg.seed + 100 * r + 1)
            history += finetune(generator, list(generator.parameters()), train_set, gcfg, optimizer=opt_gen,
                                progress=progress, callback=tagged(r, "generator"),
                                desc=f"{self.method_name()}: generator {r + 1}", objective=gen_objective,
                                task=self.task)
            generator.eval()
            stats = self._inversion_stats(frozen, split, generator, mask, train_set, cfg, gen)
            stats.update({k: history[-1][k] for k in ("gen_loss", "benign_feat", "backdoor_feat")})  # last epoch
            seconds["generator"] += time.perf_counter() - t0
            if target is None:
                target = stats["predicted_label"]
            elif cfg.early_stop and stats["predicted_label"] != target:
                rounds.append({"round": r + 1, **stats, "target": target, "stopped": True})
                early_stopped = True
                break
            rounds.append({"round": r + 1, **stats, "target": target, "gen_budget": cfg.norm_bound})

            # 3. unlearning: a share of each batch replaced by generated images, true labels kept
            t0 = time.perf_counter()
            generator.requires_grad_(False)

            def with_generated(x: torch.Tensor) -> torch.Tensor:
                k = min(len(x), int(cfg.poison_share * len(x) + 1))
                idx = torch.randperm(len(x), generator=gen)[:k].to(x.device)
                xg = x.clone()
                with torch.no_grad():
                    xg[idx] = generator(x[idx])
                return xg

            def unlearn_terms(m: nn.Module, x: torch.Tensor, xg: torch.Tensor,
                              y: torch.Tensor) -> dict[str, torch.Tensor]:
                fg = split.encode(m, xg)
                terms = {"ce": F.cross_entropy(split.head(m, fg), y)}
                if cfg.feature_weight > 0:
                    terms["feat"] = cfg.feature_weight * F.mse_loss(fg, split.encode(m, x))
                return terms

            def unlearn(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
                return unlearn_terms(m, x, with_generated(x), y)

            def pam_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
                xg = with_generated(x)
                saved = [p.detach().clone() for p in params]
                point, t = pam_point(saved, original, cfg.pam_rho)
                pam_ts.append(t)
                with torch.no_grad():
                    for p, q in zip(params, point):
                        p.copy_(q)
                terms = unlearn_terms(m, x, xg, y)
                opt_cls.zero_grad(set_to_none=True)
                sum(terms.values()).backward()
                with torch.no_grad():
                    for p, w in zip(params, saved):
                        p.copy_(w)
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt_cls.step()
                return terms

            ucfg = replace(cfg, seed=cfg.seed + 100 * r + 2)
            history += finetune(work, params, train_set, ucfg, holdout=holdout, optimizer=opt_cls,
                                progress=progress, callback=tagged(r, "unlearn"),
                                desc=f"{self.method_name()}: unlearn {r + 1}",
                                objective=None if cfg.pam else unlearn, step_fn=pam_step if cfg.pam else None,
                                task=self.task)
            generator.requires_grad_(True)
            seconds["unlearn"] += time.perf_counter() - t0

        generator.eval().requires_grad_(False)
        with torch.no_grad():
            gen_acc = self._accuracy_on_generated(work, generator, train_set, cfg.batch_size)
        self.generator = generator.cpu()  # G(x) on clean images: the inverted trigger, for inspection
        return Step(work.eval(), history, sum(p.numel() for p in params),
                    {"setup": 0.0, **seconds, "train": sum(seconds.values())},
                    {"target_label": target, "rounds_run": len(rounds), "early_stopped": early_stopped,
                     "rounds": rounds, "feature_space": split.kind, "gen_budget": cfg.norm_bound,
                     "generated_clean_acc_after": gen_acc, "pam": cfg.pam,
                     "pam_rho": cfg.pam_rho if cfg.pam else None,
                     "pam_t_mean": float(sum(pam_ts) / len(pam_ts)) if pam_ts else None})

    @staticmethod
    @torch.no_grad()
    def _inversion_stats(model: nn.Module, split: FeatureSplit, generator: TriggerGenerator, mask: torch.Tensor,
                         data: Dataset, cfg: BTIDBFConfig, gen: torch.Generator) -> dict[str, Any]:
        """Clean-data figures of one inversion: the label ``model`` gives most often to
        ``G(x + noise)`` (the detected target), the share of images it takes there, the pixel
        MSE of ``G`` (mean and max over images), and how often the benign features of ``G(x)``
        alone still give the prediction the benign features of ``x`` give."""
        device = mask.device
        counts: dict[int, int] = {}
        mses: list[torch.Tensor] = []
        agree = n = 0
        for x, _ in DataLoader(data, batch_size=cfg.batch_size, shuffle=False):
            x = x.to(device)
            noisy = (x + cfg.detect_noise * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1)
            for label in model(generator(noisy)).argmax(1).tolist():
                counts[label] = counts.get(label, 0) + 1
            xg = generator(x)
            mses.append((xg - x).pow(2).flatten(1).mean(1))
            benign_x = split.head(model, mask * split.encode(model, x)).argmax(1)
            benign_g = split.head(model, mask * split.encode(model, xg)).argmax(1)
            agree += int((benign_x == benign_g).sum())
            n += len(x)
        label = max(sorted(counts), key=lambda k: counts[k])
        mse = torch.cat(mses)
        return {"predicted_label": int(label), "predicted_share": counts[label] / n,
                "gen_pixel_mse": float(mse.mean()), "gen_pixel_mse_max": float(mse.max()),
                "benign_agreement": agree / n, "mask_mean": float(mask.mean())}

    @staticmethod
    def _accuracy_on_generated(model: nn.Module, generator: TriggerGenerator, data: Dataset, batch_size: int) -> float:
        """Accuracy of ``model`` on ``G(x)`` against the true labels (clean training split)."""
        model.eval()
        device = next(model.parameters()).device
        correct = n = 0
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            correct += int((model(generator(x)).argmax(1) == y).sum())
            n += len(y)
        return correct / max(n, 1)


DEFENSES.register("bti-dbf", BTIDBF, **BTIDBF.paper_schedule())
# BTI-DBF(U) with path-aware minimisation, in the PAM authors' unlearning setting
DEFENSES.register("bti-dbf-pam", BTIDBF, **{**BTIDBF.paper_schedule(), "pam": True, "pam_rho": 0.5, "optimizer": "sgd",
                                            "lr": 0.01, "momentum": 0.1, "poison_share": 0.2,
                                            "feature_weight": 0.0, "rounds": 3})
