"""Fisher-information quantities used by FIP: the trace penalty Tr(F) and the diagonal anchor.

Everything here works on any ``nn.Module`` that maps a batch of inputs to a batch of outputs
and on a chosen set of parameters ``params``: a ``dict`` name -> tensor or a sequence of
tensors. For FIP these are the model weights; for f-FIP they are the singular-value shifts
``delta`` of :mod:`fipurify.curvature.spectral`.

The problem is a :class:`~fipurify.tasks.Task` (argument ``task``, default classification):
``log p(y|x) = -task.per_sample_loss(task.forward(model, x, y), y)`` and the model's own
targets ``y ~ p(.|x)`` come from ``task.sample_targets`` (on ``task.forward(model, x, y)`` with
the true targets when given, for models fed the target). For classification the output is ``B x C``
logits, ``p(y|x) = softmax(model(x))_y``. Notation: ``s_y(x) = grad_params log p(y|x)``.

* ``Tr(F) = E_x E_{y~p(.|x)} ||s_y(x)||^2`` (paper eq. 6 with the model's own labels) is
  estimated by :func:`fisher_trace`, always as a **per-example average** (a batch *sum*
  would be ``B`` times larger).
* ``diag(F_bar) = mean over clean examples of s_y(x)**2`` with the *true* labels (paper
  eq. 6 as used in the clean-accuracy retainer) is computed once by :func:`diag_fisher`.
* ``L_r = sum_i F_i (theta_i - anchor_i)^2`` is :func:`fisher_anchor_loss`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import ConfigError, DataError
from ..tasks import Classification, Task

Params = Union[Mapping[str, Tensor], Sequence[Tensor]]

ESTIMATORS = ("sampled", "exact", "exact-expected", "empirical")
NORMALIZATIONS = ("none", "mean", "max")
DEFAULT_SUB_BATCH = 32


# ----------------------------------------------------------------------------- helpers
def _as_list(params: Params) -> tuple[list[str] | None, list[Tensor]]:
    """Split ``params`` into (dict keys or None, list of tensors); reject empty input."""
    if isinstance(params, Tensor):
        raise ConfigError("params must be a dict of tensors or a list of tensors, not one tensor")
    if isinstance(params, Mapping):
        keys, tensors = list(params.keys()), list(params.values())
    else:
        keys, tensors = None, list(params)
    if not tensors:
        raise ConfigError("params is empty: give at least one parameter tensor")
    if not all(isinstance(t, Tensor) for t in tensors):
        raise ConfigError("params must contain only tensors")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ConfigError("params lists the same tensor twice")
    return keys, tensors


def _like(keys: list[str] | None, tensors: list[Tensor]) -> Params:
    """Package ``tensors`` with the same container type the caller used for ``params``."""
    return dict(zip(keys, tensors)) if keys is not None else list(tensors)


def _model_names(model: nn.Module, tensors: list[Tensor]) -> list[str]:
    """Qualified names (as ``functional_call`` wants them) of ``tensors`` inside ``model``."""
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), name)
    names = []
    for t in tensors:
        if id(t) not in by_id:
            raise ConfigError("params must be parameters of the model (each tensor must appear "
                              "in model.named_parameters())")
        names.append(by_id[id(t)])
    return names


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, was_training in modes:
        m.training = was_training


@contextlib.contextmanager
def _batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Run BatchNorm layers on their running statistics for the duration of the block.

    Per-example gradients are ill-defined with batch statistics (every example would
    influence every other one; a batch of one even fails in ``BatchNorm1d``), so the
    per-example estimators use the running statistics. Running statistics are not updated
    in eval mode, so nothing drifts. Every module's own ``training`` flag is restored.
    """
    modes = _module_modes(model)
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        yield
    finally:
        _restore_modes(modes)


@contextlib.contextmanager
def _full_eval(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every module's own ``training`` flag back."""
    modes = _module_modes(model)
    try:
        model.eval()
        yield
    finally:
        _restore_modes(modes)


#: the task when none is given: single-label classification of any input (B x C logits)
_CLASSIFICATION = Classification()


def _check_logits(out: object, task: Task = _CLASSIFICATION) -> Tensor:
    """``out`` itself; for a classification task, refuse anything but B x C logits."""
    if not isinstance(out, Tensor) or (isinstance(task, Classification) and out.dim() != 2):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"the model must return logits of shape B x C, got {shape}")
    return out


def _sample_targets(output: Tensor, generator: torch.Generator | None, task: Task) -> Tensor:
    """Targets drawn from the model's predictive distribution, detached (no REINFORCE term):
    for classification one label per row from ``softmax(logits)``."""
    return task.sample_targets(output.detach(), generator)


class _TaskOutput(nn.Module):
    """``task.forward(model, x, y)`` as a module, so that ``functional_call`` can swap the
    parameters of ``model`` (named ``model.<name>`` here) for a task whose model is fed the target."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.task.forward(self.model, x, y)


def _log_prob_fns(model: nn.Module, names: list[str], task: Task = _CLASSIFICATION) -> tuple[Callable, Callable]:
    """Functional single-example log-probabilities for ``torch.func`` transforms: ``log_probs``
    (every class; classification only) and ``log_prob_of(p, x_i, y_i)`` = ``log p(y_i|x_i)``, for
    classification ``log_softmax(logits)_y``, else ``-task.per_sample_loss(task.forward(x_i, y_i), y_i)``."""

    def log_probs(p: tuple[Tensor, ...], xi: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, p)), (xi.unsqueeze(0),))
        return torch.log_softmax(_check_logits(out), dim=-1).squeeze(0)

    if isinstance(task, Classification):
        def log_prob_of(p: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
            return log_probs(p, xi).gather(0, yi.reshape(1)).squeeze(0)  # exactly -CE(logits, y)
        return log_probs, log_prob_of

    wrapped = _TaskOutput(model, task)
    wrapped_names = [f"model.{n}" for n in names]

    def log_prob_of(p: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
        xb, yb = xi.unsqueeze(0), yi.unsqueeze(0)
        out = _check_logits(functional_call(wrapped, dict(zip(wrapped_names, p)), (xb, yb)), task)
        return -task.per_sample_loss(out, yb).squeeze(0)

    return log_probs, log_prob_of


def _per_example_sq_norms(model: nn.Module, names: list[str], p: tuple[Tensor, ...],
                          x: Tensor, y: Tensor, chunk_size: int | None, task: Task = _CLASSIFICATION) -> Tensor:
    """``||grad_p log p(y_i|x_i)||^2`` for every row i (vector of length len(x))."""
    _, log_prob_of = _log_prob_fns(model, names, task)
    grads = vmap(grad(log_prob_of), in_dims=(None, 0, 0), randomness="different",
                 chunk_size=chunk_size)(p, x, y)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads)


def _expected_sq_norms(model: nn.Module, names: list[str], p: tuple[Tensor, ...],
                       x: Tensor, chunk_size: int | None) -> Tensor:
    """``sum_c p(c|x_i) ||grad_p log p(c|x_i)||^2`` for every row i: the exact Tr F(x_i)."""
    log_probs, _ = _log_prob_fns(model, names)

    def with_probs(pp: tuple[Tensor, ...], xi: Tensor) -> tuple[Tensor, Tensor]:
        lp = log_probs(pp, xi)
        return lp, lp.exp()

    jac, probs = vmap(jacrev(with_probs, has_aux=True), in_dims=(None, 0),
                      randomness="different", chunk_size=chunk_size)(p, x)
    # jac[k] has shape B x C x *param_shape; probs is B x C and stays differentiable so that
    # the gradient of this estimate is the gradient of the exact trace.
    sq = sum(j.pow(2).flatten(2).sum(2) for j in jac)
    return (probs * sq).sum(1)


# ----------------------------------------------------------------------------- Tr(F)
def fisher_trace(model: nn.Module, x: Tensor | None, params: Params, estimator: str = "sampled",
                 create_graph: bool = True, sub_batch: int | None = None,
                 generator: torch.Generator | None = None, *, y: Tensor | None = None,
                 logits: Tensor | None = None, chunk_size: int | None = None,
                 task: Task | None = None) -> Tensor:
    """Estimate the per-example Fisher trace ``E_x E_{y~p(.|x)} ||grad_params log p(y|x)||^2``.

    The result is a scalar averaged over examples. With ``create_graph=True`` it is
    differentiable with respect to ``params`` (double back-propagation), so
    ``(ce + eta_F * fisher_trace(...)).backward()`` trains against it; with
    ``create_graph=False`` it is a detached number and cheaper.

    Estimators:

    * ``"sampled"`` - the "Fisher penalty" (Jastrzebski et al., 2021). Draw
      ``y_hat_i ~ softmax(logits_i)`` (detached), let ``g`` be the gradient of the *mean*
      cross-entropy ``CE(logits, y_hat)`` over the batch and return ``B * ||g||^2``.
      Writing ``g_i`` for the per-example gradients,
      ``B ||g||^2 = (1/B) sum_i ||g_i||^2 + (1/B) sum_{i != j} g_i . g_j``. Given the inputs,
      the labels are drawn independently and a score has zero mean
      (``E_{y~p(.|x)} grad log p(y|x) = 0``), so the cross terms vanish in expectation: when
      the forward pass treats examples independently (eval-mode BatchNorm, no batch
      coupling) this is an **unbiased** estimate of the per-example trace, though noisier
      than ``"exact"`` (the cross terms add variance). With BatchNorm in *train* mode the
      examples are coupled through the batch statistics and the network is a different
      function (invariant to the scale of the weights feeding each BatchNorm, so those
      gradient directions vanish): on a width-8 PreActResNet18 the train-mode value was about
      0.58x the eval-mode trace at both B = 16 and B = 64 (``benchmarks/fisher_estimators.py``).
      The whole batch is used (``sub_batch`` is ignored); one forward pass can be shared
      with the task loss by passing its ``logits`` (then ``x`` may be ``None``). Costs one
      extra backward (plus the double backward).
    * ``"exact"`` - per-example gradients with ``torch.func`` (``vmap`` over ``grad``) on
      the first ``sub_batch`` examples (default ``min(B, 32)``), labels drawn from the
      model's predictive distribution, mean of the squared norms. Unbiased (given the
      inputs), lower variance; memory grows with ``sub_batch * len(params)``.
    * ``"exact-expected"`` - like ``"exact"`` but sums over *all* classes weighted by
      ``p(y|x)`` instead of sampling: the exact ``Tr F`` on those examples (C times the
      cost). The class weights stay in the graph, so its gradient is the true gradient of
      the trace. (The sampled estimators treat the drawn labels as constants, so their
      gradients miss the score-function term ``sum_y grad p(y|x) ||grad log p(y|x)||^2``.)
    * ``"empirical"`` - the *empirical* Fisher trace: per-example as ``"exact"`` but with
      the true labels ``y`` (required). Not the Fisher information of the model.

    The per-example estimators run BatchNorm layers on their running statistics (each
    module's training flag is restored afterwards; running statistics are not updated) and
    the rest of the model in whatever mode it is in (train-mode dropout draws a separate
    mask per example). ``"sampled"`` runs the model exactly as it is.

    Args:
        model: maps ``x`` (B x ...) to logits (B x C).
        x: input batch; may be ``None`` for ``"sampled"`` when ``logits`` is given.
        params: the tensors to differentiate with respect to (dict or list). The
            per-example estimators need them to be parameters of ``model``.
        estimator: one of ``"sampled"``, ``"exact"``, ``"exact-expected"``, ``"empirical"``.
        create_graph: keep the graph so the result can be back-propagated.
        sub_batch: number of leading examples used by the per-example estimators.
        generator: random generator for the label draws (fixes the labels when seeded).
        y: true labels, needed by ``"empirical"``; also fed to ``task.forward`` (models that
            are run with the target, e.g. teacher forcing) before targets are drawn.
        logits: precomputed ``task.forward(model, x, y)`` (``model(x)`` for classification) for
            ``"sampled"``, to share the forward pass.
        chunk_size: ``vmap`` chunk size for the per-example estimators (saves memory).
        task: the problem (default: classification); ``"exact-expected"`` needs a
            classification task (it sums over the classes).

    Returns:
        A scalar tensor: the estimated per-example average of the Fisher trace.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown Fisher-trace estimator {estimator!r}; "
                          f"choose one of {', '.join(ESTIMATORS)}")
    _, tensors = _as_list(params)
    task = task if task is not None else _CLASSIFICATION
    if estimator == "exact-expected" and not isinstance(task, Classification):
        raise ConfigError(f"the 'exact-expected' estimator sums over classes and needs a classification "
                          f"task, not {task.name}; use 'exact' or 'sampled'")
    if estimator == "sampled":
        # Works inside torch.no_grad() too (e.g. to monitor the trace): it needs a gradient.
        with torch.enable_grad():
            return _sampled_trace(model, x, tensors, create_graph, generator, logits, task, y)

    if x is None:
        raise ConfigError(f"the {estimator!r} estimator needs the input batch x")
    if sub_batch is not None and sub_batch < 1:
        raise ConfigError(f"sub_batch must be at least 1, got {sub_batch}")
    n = min(len(x), sub_batch if sub_batch is not None else DEFAULT_SUB_BATCH)
    if n == 0:
        raise DataError("fisher_trace got an empty batch")
    xs = x[:n]
    names = _model_names(model, tensors)
    p = tuple(tensors) if create_graph else tuple(t.detach() for t in tensors)
    grad_ctx = contextlib.nullcontext() if create_graph else torch.no_grad()
    with _batchnorm_eval(model), grad_ctx:
        if estimator == "exact-expected":
            per_example = _expected_sq_norms(model, names, p, xs, chunk_size)
        else:
            if estimator == "empirical":
                if y is None:
                    raise ConfigError("the 'empirical' estimator needs the true labels y")
                ys = torch.as_tensor(y, device=xs.device)[:n]
                ys = ys.long() if isinstance(task, Classification) else ys
            else:
                y_fed = torch.as_tensor(y, device=xs.device)[:n] if y is not None else None
                with torch.no_grad():
                    ys = _sample_targets(_check_logits(task.forward(model, xs, y_fed), task), generator, task)
            per_example = _per_example_sq_norms(model, names, p, xs, ys, chunk_size, task)
    return per_example.mean()


def _sampled_trace(model: nn.Module, x: Tensor | None, tensors: list[Tensor], create_graph: bool,
                   generator: torch.Generator | None, logits: Tensor | None, task: Task,
                   y: Tensor | None = None) -> Tensor:
    """``B * ||grad mean loss(output, y_hat)||^2`` with ``y_hat ~ p(.|x)`` (see above); for
    classification the loss is CE and ``y_hat ~ softmax(logits)``."""
    if logits is None:
        if x is None:
            raise ConfigError("the 'sampled' estimator needs x or precomputed logits")
        logits = task.forward(model, x, y)
    logits = _check_logits(logits, task)
    if len(logits) == 0:
        raise DataError("fisher_trace got an empty batch")
    if not all(t.requires_grad for t in tensors):
        raise ConfigError("the 'sampled' estimator needs params that require grad")
    if not logits.requires_grad:
        raise ConfigError("the 'sampled' estimator needs logits computed with autograd enabled")
    y_hat = _sample_targets(logits, generator, task)
    loss = task.mean_loss(logits, y_hat)
    grads = torch.autograd.grad(loss, tensors, create_graph=create_graph, allow_unused=True)
    sq = sum(g.pow(2).sum() for g in grads if g is not None)
    if not isinstance(sq, Tensor):  # none of params influences the logits
        sq = logits.new_zeros(())
    value = sq * len(logits)
    return value if create_graph else value.detach()


# ----------------------------------------------------------------------------- diag(F_bar)
def _batches(data: DataLoader | Dataset | Iterable, batch_size: int, collate_fn=None) -> Iterable:
    """Yield (x, y) batches from a DataLoader, an iterable of batches, or a map Dataset (batched
    with the task's ``collate_fn``)."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
            and not isinstance(data, DataLoader):
        # A map-style dataset yields single examples; batch it ourselves.
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    return data


def diag_fisher(model: nn.Module, data: DataLoader | Dataset | Iterable, params: Params,
                max_examples: int | None = None, normalize: str = "none",
                chunk_size: int = 32, task: Task | None = None) -> Params:
    """Diagonal of the Fisher ``F_bar`` on labelled (clean) data, at the current weights.

    ``diag(F_bar)_i = mean over examples of (d log p(y|x) / d theta_i)^2`` with the *true*
    labels ``y`` (paper eq. 6 as used by the clean-accuracy retainer). Computed in eval mode
    (no BatchNorm running-statistic drift, no dropout); every module's training flag is
    restored afterwards and no ``.grad`` is left on any parameter.

    Args:
        model: maps a batch of inputs to logits (B x C).
        data: a DataLoader or any iterable of ``(x, y)`` batches (extra items are ignored),
            or a map-style Dataset of single ``(x, y)`` examples (batched here).
        params: parameters of ``model`` (dict or list); the result has the same container
            type (same keys) and tensors of the same shapes and dtypes.
        max_examples: stop after this many examples.
        normalize: ``"none"`` (raw values, whose scale depends on the model, the data and
            the number of parameters), ``"mean"`` (divide every entry by the mean over *all*
            entries, so the average importance is 1 and ``eta_r`` is a scale-free weight per
            parameter) or ``"max"`` (divide by the largest entry, so values lie in [0, 1]).
            An all-zero Fisher is returned unscaled.
        chunk_size: examples per ``vmap`` call; bounds memory at ``chunk_size * len(params)``.
        task: the problem (default: classification); the score is the gradient of
            ``-task.per_sample_loss``.

    Returns:
        The diagonal Fisher, detached, shaped like ``params``.
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalisation {normalize!r}; choose one of "
                          f"{', '.join(NORMALIZATIONS)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples must be at least 1, got {max_examples}")
    keys, tensors = _as_list(params)
    names = _model_names(model, tensors)
    p = tuple(t.detach() for t in tensors)
    task = task if task is not None else _CLASSIFICATION
    _, log_prob_of = _log_prob_fns(model, names, task)
    per_example_grads = vmap(grad(log_prob_of), in_dims=(None, 0, 0))
    # Accumulate in float64: a sum of many small squares loses digits in float32.
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in p]
    device = p[0].device
    seen = 0
    with _full_eval(model), torch.no_grad():
        for batch in _batches(data, chunk_size, task.collate_fn):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError("diag_fisher needs batches of (inputs, labels)")
            x, y = batch[0], batch[1]
            x = torch.as_tensor(x).to(device)
            y = torch.as_tensor(y).to(device)
            if isinstance(task, Classification):
                y = y.long().reshape(-1)
            if len(x) != len(y):
                raise DataError(f"a batch has {len(x)} inputs but {len(y)} labels")
            if max_examples is not None:
                x, y = x[:max_examples - seen], y[:max_examples - seen]
            for start in range(0, len(x), chunk_size):
                grads = per_example_grads(p, x[start:start + chunk_size],
                                          y[start:start + chunk_size])
                for s, g in zip(sums, grads):
                    s += g.double().pow(2).sum(0)
            seen += len(x)
            if max_examples is not None and seen >= max_examples:
                break
    if seen == 0:
        raise DataError("diag_fisher got no examples")
    fisher = [s / seen for s in sums]
    if normalize != "none":
        total = torch.cat([f.flatten() for f in fisher])
        scale = total.mean() if normalize == "mean" else total.max()
        if scale > 0:
            fisher = [f / scale for f in fisher]
    return _like(keys, [f.to(t.dtype) for f, t in zip(fisher, p)])


# ----------------------------------------------------------------------------- L_r
def snapshot(params: Params) -> Params:
    """Detached copies of ``params`` (same container): the anchor ``theta_bar``."""
    keys, tensors = _as_list(params)
    return _like(keys, [t.detach().clone() for t in tensors])


@torch.no_grad()
def proximal_anchor_step(params: Params, anchor: Params, fdiag: Params, lr: float, eta_r: float) -> None:
    """Apply the anchor ``eta_r / 2 * L_r`` as an exact proximal step, in place.

    ``theta <- argmin_u eta_r/2 * sum_i F_i (u_i - a_i)^2 + ||u - theta||^2 / (2 lr)
    = a + (theta - a) / (1 + lr * eta_r * F)``: an implicit step, stable for any ``lr * eta_r * F``
    (a plain gradient step on the anchor diverges once ``lr * eta_r * F_i > 2``, which happens for the
    largest Fisher entries). ``anchor`` and ``fdiag`` have the container type of ``params``.
    """
    _, ps = _as_list(params)
    _, anc = _as_list(anchor)
    _, fs = _as_list(fdiag)
    for p, a, f in zip(ps, anc, fs):
        p.sub_(a).div_(1.0 + lr * eta_r * f).add_(a)


def fisher_anchor_loss(params: Params, anchor: Params, fdiag: Params) -> Tensor:
    """``L_r = sum_i F_i (theta_i - anchor_i)^2`` (the caller multiplies by ``eta_r / 2``).

    Its gradient with respect to ``theta`` is ``2 F (theta - anchor)``. ``anchor`` and
    ``fdiag`` must have the container type of ``params`` (same keys for dicts, same order
    for lists) and matching shapes; they are treated as constants.
    """
    keys, tensors = _as_list(params)
    akeys, anchors = _as_list(anchor)
    fkeys, fishers = _as_list(fdiag)
    if keys is not None:
        if akeys is None or fkeys is None or set(akeys) != set(keys) or set(fkeys) != set(keys):
            raise ConfigError("params, anchor and fdiag must be dicts with the same keys")
        anchors = [anchor[k] for k in keys]  # type: ignore[index]
        fishers = [fdiag[k] for k in keys]  # type: ignore[index]
    elif akeys is not None or fkeys is not None or not len(tensors) == len(anchors) == len(fishers):
        raise ConfigError("params, anchor and fdiag must be lists of the same length")
    total = None
    for t, a, f in zip(tensors, anchors, fishers):
        if t.shape != a.shape or t.shape != f.shape:
            raise ConfigError(f"shape mismatch in fisher_anchor_loss: parameter {tuple(t.shape)}, "
                              f"anchor {tuple(a.shape)}, fisher {tuple(f.shape)}")
        term = (f.detach() * (t - a.detach()).pow(2)).sum()
        total = term if total is None else total + term
    return total  # type: ignore[return-value]
