"""Reference for the retuning attack: how much does a model that was never backdoored learn from it?

    python benchmarks/retune_reference.py [--model FILE] [--attacks badnets blend wanet sig troj-one]
        [--clean-size 500] [--seed 0]

The post-purification robustness table (spec ``default-robustness``) reports the ASR of each purified model
after a short fine-tune on its clean images plus 1 % poisoned ones (:mod:`fipurify.retune`). Whether a figure
there means "the backdoor came back" or "5 poisoned images teach any model the trigger" needs this reference:
the same retuning attack on the clean CPU-preset model (default: the bench cache's clean CIFAR-10 model), with
the same 500 clean reserve images (seed 0) and each attack's own trigger and target, built from the
``default-robustness`` spec's attack entries as the runner builds them. Prints one Markdown row per attack.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

def main(argv: list[str] | None = None) -> int:
    from fipurify import load_model
    from fipurify.bench.spec import load_spec
    from fipurify.bench.stages import make_attack
    from fipurify.datasets import draw_clean_subset
    from fipurify.metrics import evaluate
    from fipurify.retune import RetuneConfig, retuned_metrics
    from fipurify.workflow import reload_data

    cache = Path(os.environ.get("FIPURIFY_CACHE") or Path.home() / ".cache" / "fipurify") / "bench-models"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a clean model file (default: the bench cache's clean CIFAR-10 model)")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blend", "wanet", "sig", "troj-one"],
                   help="attacks whose trigger needs no trained generator (default: %(default)s)")
    p.add_argument("--clean-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    entries = {e.id: e.config for e in load_spec("default-robustness").attacks}
    unknown = [a for a in args.attacks if a not in entries]
    if unknown:
        print(f"--attacks {', '.join(unknown)}: not in the default-robustness spec ({', '.join(entries)})",
              file=sys.stderr)
        return 2
    path = args.model or next(iter(sorted(cache.glob("cifar10_clean_preactresnet18-w16_e10_s0_*.safetensors"))), None)
    if path is None:
        print(f"no clean model in {cache}: train it with `fipurify bench default-heldout --only 'none/none/*'`",
              file=sys.stderr)
        return 2
    model, meta = load_model(path)
    if meta.get("attack"):
        print(f"{path} is backdoored ({meta['attack'].get('name')}); give a clean model", file=sys.stderr)
        return 2
    bundle = reload_data(meta)
    clean = draw_clean_subset(bundle.reserve, args.clean_size, args.seed)
    print("| attack | ASR before (clean model) | ACC after retune | ASR after retune |\n|---|---|---|---|")
    for name in args.attacks:
        attack = make_attack(entries[name], args.seed)
        before = evaluate(model, bundle.test, attack.backdoor_test_set(bundle.test))["asr"]
        out = retuned_metrics(model, clean, attack, bundle.test, RetuneConfig(seed=args.seed))
        print(f"| {name} | {100 * before:.2f} | {100 * out['acc']:.2f} | {100 * out['asr']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
