"""Would BTI-DBF's trigger inversion find the target? A detection probe on cached models (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/bti_probe.py MODEL [MODEL ...] [--clean-size 500] [--seed 0]
        [--set KEY=VALUE ...]

BTI-DBF (Xu et al., ICLR 2024; ``fipurify.defenses.bti_dbf``) inverts a backdoor without a class
to aim at: a soft mask separates the features that carry the clean label (benign) from the rest,
and a generator ``G`` (a per-image perturbation within a pixel-MSE budget) keeps the benign
features of an image while moving the others as far as it can. On a backdoored model the easiest
such move is the trigger, so ``G(x)`` should land in the target class whatever ``x`` is: a
mask-and-pattern (Neural Cleanse) or a universal perturbation (UAP) cannot express a warping
(WaNet), a per-image (Dynamic, ISSBA) or a style (FBA) trigger, a generator can.

Per model: the defense's first round only (mask, generator, and the shortest unlearning phase,
which the probe ignores), on ``--clean-size`` images of the model's clean reserve (the
detectors' draw); then the ORIGINAL model's predictions on ``G(x)`` for ``--clean-size`` other
reserve images. For each class ``c``: the share of the images not of class ``c`` that ``G``
sends to ``c``; the statistic is that share's median-absolute-deviation anomaly index (large
side, the detectors' outlier test), flagged above 2. Prints one JSON line per model (the
attack from its metadata, for reading only). Nothing here uses test data or the trigger.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.utils.data import DataLoader


def generated_shares(model: torch.nn.Module, generator: torch.nn.Module, data, classes: int,
                     batch_size: int = 128) -> list[float]:
    """Per class ``c``: the share of the images of other classes that ``model`` gives ``c`` on ``G(x)``."""
    hits = torch.zeros(classes)
    eligible = torch.zeros(classes)
    model.eval()
    generator.eval()
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            y = torch.as_tensor(y)
            pred = model(generator(x)).argmax(1)
            for c in range(classes):
                other = y != c
                eligible[c] += int(other.sum())
                hits[c] += int((pred[other] == c).sum())
    return (hits / eligible.clamp_min(1)).tolist()


def main() -> None:
    from fipurify import defenses
    from fipurify.cli import parse_key_values
    from fipurify.datasets import draw_clean_subset
    from fipurify.detection import most_anomalous
    from fipurify.io import load_model
    from fipurify.workflow import reload_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--clean-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="bti-dbf option (JSON value), repeatable; default: its paper settings, one round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    options = {"rounds": 1, "epochs": 1, **{k.replace("-", "_"): v for k, v in parse_key_values(args.set).items()}}
    for path in args.models:
        model, meta = load_model(path)
        reserve = reload_data(meta, args.data_root).reserve
        n = min(args.clean_size, len(reserve) // 2)
        clean = draw_clean_subset(reserve, n, args.seed)
        other = draw_clean_subset(reserve, n, args.seed + 1)  # mostly other images: the shares' hold-out
        classes = int((meta.get("dataset") or {}).get("num_classes") or 10)
        t0 = time.perf_counter()
        defense = defenses.create("bti-dbf", seed=args.seed, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defense.purify(model, clean, progress=False)
        rnd = defense.report["rounds"][0]
        shares = generated_shares(model, defense.generator, other, classes)
        top, index = most_anomalous([-s for s in shares])  # sizes -share: the large side, the most-reached class
        attack = meta.get("attack") or {}
        print(json.dumps({"model": str(path).rsplit("/", 1)[-1], "attack": attack.get("name", "none"),
                          "target": attack.get("target"), "asr": (meta.get("metrics") or {}).get("asr"),
                          "top_class": top, "top_share": round(shares[top], 3),
                          "shares": [round(s, 3) for s in shares],
                          "anomaly_index": round(index, 2) if index < float("inf") else "inf",
                          "flagged": bool(index > 2), "defense_label": rnd["predicted_label"],
                          "defense_share": round(rnd["predicted_share"], 3),
                          "gen_pixel_mse": rnd["gen_pixel_mse"], "benign_agreement": rnd["benign_agreement"],
                          "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
