"""The walk of one ``fipurify purify`` call through fipurify's modules, and its re-entries.

    python benchmarks/purify_walk.py [--method ft] [--epochs 1] [--all]

Trains a tiny backdoored model on the synthetic dataset (CLI ``train``, in a temporary
folder), then runs ``fipurify purify`` on it in-process under :func:`sys.setprofile`. The
profiler follows Python ``call`` / ``return`` events; the current module is the module of the
innermost fipurify frame (frames of torch, numpy etc. do not change it). A call whose frame
lies in another fipurify module than the current one *enters* that module. The script prints

* the walk: the entries as ``caller -> callee.function`` in order, consecutive repeats folded
  (``x n``); without ``--all``, only the entries into orchestration modules;
* per module: entries, re-entries (entries after the first, i.e. control came back into the
  module after having left it) and the modules it was entered from, grouped into orchestration
  modules, utility modules and the rest.

Code run by an import (module and class bodies, dataclass-generated functions) is not part of
the walk: calls made while ``importlib`` loads a module are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter, defaultdict
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

#: the modules that carry a purify call from the command line to the result file
ORCHESTRATION = ("fipurify.cli", "fipurify.workflow", "fipurify.purification", "fipurify.defenses",
                 "fipurify.metrics")
#: helpers any module may call (checks, names, devices, files, errors)
UTILITY = ("fipurify.errors", "fipurify.validation", "fipurify.registry", "fipurify.devices", "fipurify.io")


def group(module: str) -> str:
    """``orchestration``, ``utility`` or ``other`` for a fipurify module name."""
    for name, prefixes in (("orchestration", ORCHESTRATION), ("utility", UTILITY)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return "other"


class Walk:
    """A :func:`sys.setprofile` hook recording the entries into fipurify modules."""

    def __init__(self) -> None:
        self.stack: list[str | None] = []     # the fipurify module of each open Python frame (None: other)
        self.current: list[str] = ["<caller>"]  # innermost fipurify module, one per fipurify frame
        self.entries: list[tuple[str, str]] = []
        self.functions: list[str] = []          # the function each entry called
        self.importing = 0                      # open imports: code they run is not part of the walk

    def __call__(self, frame, event: str, arg) -> None:
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module == "importlib._bootstrap" and frame.f_code.co_name == "_find_and_load":
                self.importing += 1
                self.stack.append("<import>")
                return
            if not module.startswith("fipurify") or self.importing:
                self.stack.append(None)
                return
            if module != self.current[-1]:
                self.entries.append((self.current[-1], module))
                self.functions.append(getattr(frame.f_code, "co_qualname", frame.f_code.co_name))
            self.stack.append(module)
            self.current.append(module)
        elif event == "return" and self.stack:
            top = self.stack.pop()
            if top == "<import>":
                self.importing -= 1
            elif top is not None:
                self.current.pop()


def tiny_model(folder: Path) -> Path:
    """A backdoored width-4 model trained for one epoch on the synthetic dataset."""
    from fipurify.cli import main
    model = folder / "m.safetensors"
    with redirect_stdout(StringIO()):
        rc = main(["train", "--dataset", "synthetic", "--width", "4", "--epochs", "1", "--batch-size", "32",
                   "--reserve", "0.1", "--quiet", "--out", str(model)])
    if rc != 0:
        raise SystemExit(f"training the tiny model failed ({rc})")
    return model


def record(model: Path, folder: Path, method: str, epochs: int) -> Walk:
    """The walk of ``fipurify purify MODEL --method METHOD --epochs EPOCHS`` (output files in ``folder``)."""
    from fipurify.cli import main
    argv = ["purify", str(model), "--method", method, "--epochs", str(epochs), "--clean-size", "40",
            "--set", "batch_size=16", "--quiet", "--out", str(folder / "p.safetensors")]
    walk = Walk()
    sys.setprofile(walk)
    try:
        with redirect_stdout(StringIO()):
            rc = main(argv)
    finally:
        sys.setprofile(None)
    if rc != 0:
        raise SystemExit(f"purify failed ({rc})")
    return walk


def print_walk(walk: Walk, everything: bool) -> None:
    """The entries in order as ``caller -> callee.function``, consecutive repeats folded; only the
    entries into orchestration modules unless ``everything``."""
    shown: list[list] = []
    for (src, dst), fn in zip(walk.entries, walk.functions):
        if not everything and group(dst) != "orchestration":
            continue
        line = f"{src} -> {dst}.{fn}"
        if shown and shown[-1][0] == line:
            shown[-1][1] += 1
        else:
            shown.append([line, 1])
    what = "every entry" if everything else "entries into orchestration modules"
    print(f"walk ({what}; {len(walk.entries)} entries in all):")
    for line, n in shown:
        print(f"  {line}" + (f"  x {n}" if n > 1 else ""))


def print_counts(walk: Walk) -> dict[str, int]:
    """Entries and re-entries per module, by group; returns module -> re-entries."""
    entries = Counter(dst for _, dst in walk.entries)
    callers: dict[str, Counter] = defaultdict(Counter)
    for src, dst in walk.entries:
        callers[dst][src] += 1
    out = {}
    for g in ("orchestration", "utility", "other"):
        mods = [m for m in entries if group(m) == g]
        if not mods:
            continue
        print(f"\n{g} modules (entries, re-entries, entered from):")
        for m in sorted(mods, key=lambda m: (-entries[m], m)):
            out[m] = entries[m] - 1
            src = ", ".join(f"{s} {n}" for s, n in callers[m].most_common())
            print(f"  {m:44s} {entries[m]:5d} {entries[m] - 1:5d}   {src}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="ft")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--all", action="store_true", help="print every entry, not only those into orchestration modules")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FIPURIFY_CACHE"] = str(Path(tmp) / "cache")
        folder = Path(tmp)
        walk = record(tiny_model(folder), folder, args.method, args.epochs)
    print_walk(walk, args.all)
    print_counts(walk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
