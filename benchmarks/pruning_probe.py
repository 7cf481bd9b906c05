"""Which pruned layer hurts? Run a pruning defense on one cached model, then undo its pruning
and apply it again one layer at a time, printing ACC, ASR and the predicted-class histogram.

    OMP_NUM_THREADS=1 python benchmarks/pruning_probe.py MODEL [--method clp] ['{"u": 3}']
        [--clean-size 500] [--seed 0] [--test-size 1000] [--data-root DIR]

For pruning defenses that report ``pruned_channels`` (CLP) or ``pruned_neurons`` (ANP, RNP):
a model that collapses to one class after pruning shows here which layer's channels did it.
ACC and ASR are measured on ``--test-size`` test images drawn at random (seed 0), so the
numbers are quick estimates, not the benchmark's. The defense gets ``--clean-size`` images
from the model's clean reserve, as the runner draws them (data-free CLP ignores them).

Used for the CLP / WaNet reading in the README.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fipurify import attacks, defenses
from fipurify.datasets import draw_clean_subset
from fipurify.defenses.pruning import channel_tensors, zero_channels
from fipurify.io import load_model
from fipurify.metrics import accuracy, predict
from fipurify.purification import purify_model
from fipurify.workflow import reload_data


def sample(ds, n: int):
    """``n`` images of an ArrayDataset drawn at random (seed 0), still an ArrayDataset."""
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("options", nargs="?", default="{}", help="JSON object of the defense's options")
    ap.add_argument("--method", default="clp")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()

    model, meta = load_model(args.model)
    d = defenses.create(args.method, **json.loads(args.options))
    bundle = reload_data(meta, args.data_root)
    clean = draw_clean_subset(bundle.reserve, args.clean_size, args.seed)
    test = sample(bundle.test, args.test_size)
    attack = meta.get("attack")
    bd = attacks.from_spec(attack).backdoor_test_set(test) if attack else None

    def line(name: str, m: nn.Module) -> None:
        preds, labels = predict(m, test)
        asr = "-" if bd is None else f"{100 * accuracy(*predict(m, bd)):6.2f}"
        hist = np.bincount(preds, minlength=test.num_classes).tolist()
        print(f"{name:<40} ACC {100 * accuracy(preds, labels):6.2f}  ASR {asr}  predicted classes {hist}", flush=True)

    line("original", model)
    # no evaluation data: this script measures on its own quick test sample
    line(f"{args.method} (all its pruning)", purify_model(model, meta, d, clean).model)
    pruned = d.report.get("pruned_channels") or d.report.get("pruned_neurons") or {}
    if not pruned:
        print(f"{args.method} pruned nothing")
    for layer, idx in pruned.items():
        one = copy.deepcopy(model)
        zero_channels(channel_tensors(one, layer), idx)
        line(f"only {layer} {idx}", one)


if __name__ == "__main__":
    main()
