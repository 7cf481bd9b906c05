"""The README's tables of attacks and defenses, generated from the registries.

Each registered name is described once, next to its code: the class's ``summary`` attribute (a
string, or a mapping registry name -> string, or name -> tuple of cells where a table has
several description columns), else the first sentence of the class docstring. A defense's
tasks come from :attr:`~fipurify.defenses.base.Defense.tasks` ("any" when None), an attack's
from its ``task`` attribute (image classification when it has none).

The README holds each table between two markers, ``<!-- catalog:NAME -->`` and
``<!-- /catalog:NAME -->``; :func:`update` rewrites only what lies between them::

    python -m fipurify.catalog README.md            # regenerate the tables in place
    python -m fipurify.catalog README.md --check    # exit 1 when they are out of date
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .registry import Registry

#: the task an attack without a ``task`` attribute poisons
DEFAULT_ATTACK_TASK = "image-classification"


def summary(obj: Any, name: str) -> str | tuple[str, ...]:
    """The description of registry name ``name`` registered as ``obj`` (see the module docstring)."""
    s = getattr(obj, "summary", None)
    if isinstance(s, Mapping):
        s = s.get(name)
    if isinstance(s, (str, tuple)):
        return s
    doc = inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    first = re.split(r"(?<=\.)\s+(?=[A-Z])", doc, maxsplit=1)[0]
    return first.rstrip(".")


def aliases_of(registry: Registry) -> dict[str, list[str]]:
    """Canonical name -> its aliases, in the order they were added."""
    out: dict[str, list[str]] = {}
    for alias, (name, _) in registry.aliases.items():
        out.setdefault(name, []).append(alias)
    return out


def _names_cell(names: Sequence[str], aliases: Sequence[str] = (), note: str = "") -> str:
    cell = ", ".join(f"`{n}`" for n in names)
    if aliases:
        cell += " (" + ", ".join(f"`{a}`" for a in aliases) + ")"
    return cell + (f" {note}" if note else "")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], per_row: int = 1) -> str:
    """A Markdown table; ``per_row`` > 1 puts that many records side by side (a compact table)."""
    width = len(header)
    lines = ["| " + " | ".join(list(header) * per_row) + " |", "|" + "---|" * (width * per_row)]
    for i in range(0, len(rows), per_row):
        chunk = [c.replace("|", "\\|") for row in rows[i:i + per_row] for c in row]
        chunk += [""] * (width * per_row - len(chunk))
        lines.append("| " + " | ".join(chunk) + " |")
    return "\n".join(lines)


def _grouped(records: list[tuple[str, tuple[str, ...]]]) -> list[tuple[list[str], tuple[str, ...]]]:
    """Consecutive names with the same cells share one row."""
    out: list[tuple[list[str], tuple[str, ...]]] = []
    for name, cells in records:
        if out and out[-1][1] == cells:
            out[-1][0].append(name)
        else:
            out.append(([name], cells))
    return out


def _tasks_cell(tasks: Sequence[str] | None) -> str:
    return "any" if tasks is None else ", ".join(tasks)


def attack_rows(registry: Registry | None = None) -> list[tuple[str, str, str]]:
    """``(name (aliases), trigger, task)`` of every registered attack, in registration order."""
    if registry is None:
        from .attacks import ATTACKS as registry
    aliases = aliases_of(registry)
    return [(_names_cell([n], aliases.get(n, ())), summary(registry[n], n),
             getattr(registry[n], "task", None) or DEFAULT_ATTACK_TASK) for n in registry.names()]


def attacks_table(registry: Registry | None = None) -> str:
    """The attacks, three to a row; the task is named where it is not image classification."""
    rows = [(name, trigger if task == DEFAULT_ATTACK_TASK else f"{trigger}; *{task}*")
            for name, trigger, task in attack_rows(registry)]
    return table(("name", "trigger"), rows, per_row=3)


def _is_fip(obj: Any) -> bool:
    from .defenses.fip import FIP
    return isinstance(obj, type) and issubclass(obj, FIP)


def _default_method() -> str:
    from .defenses import default_method
    return default_method()


def fip_table(registry: Registry | None = None) -> str:
    """The FIP family (FIP and its configurations): what each trains, its objective, its tasks."""
    if registry is None:
        from .defenses import DEFENSES as registry
    default = _default_method()
    records = []
    for n in registry.names():
        obj = registry[n]
        if _is_fip(obj):
            s = summary(obj, n)
            trains, objective = s if isinstance(s, tuple) else ("", s)
            records.append((n, (trains, objective, _tasks_cell(obj.tasks))))
    aliases = aliases_of(registry)
    rows = [(_names_cell(names, [a for n in names for a in aliases.get(n, ())],
                         "(default)" if default in names else ""), *cells) for names, cells in _grouped(records)]
    return table(("name", "what it trains", "objective", "tasks"), rows)


def baselines_table(registry: Registry | None = None) -> str:
    """Every other purification method, three to a row; its tasks are named where it is limited."""
    if registry is None:
        from .defenses import DEFENSES as registry
    aliases = aliases_of(registry)
    default = _default_method()
    rows = []
    for n in registry.names():
        obj = registry[n]
        if _is_fip(obj):
            continue
        method = summary(obj, n)
        tasks = getattr(obj, "tasks", None)
        rows.append((_names_cell([n], aliases.get(n, ()), "(default)" if n == default else ""),
                     method if tasks is None else f"{method}; *{_tasks_cell(tasks)}* only"))
    return table(("name", "method"), rows, per_row=3)


#: block name -> the function that renders it
BLOCKS: dict[str, Callable[[], str]] = {"attacks": attacks_table, "defenses": fip_table,
                                        "baselines": baselines_table}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- catalog:{name} -->\n)(.*?)(<!-- /catalog:{name} -->)", re.S)


def render(text: str, blocks: Mapping[str, Callable[[], str]] = BLOCKS) -> str:
    """``text`` with every marked block replaced by its generated table (other lines unchanged)."""
    for name, make in blocks.items():
        pattern = _block(name)
        if not pattern.search(text):
            continue
        body = make()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
    return text


def blocks_in(text: str) -> dict[str, str]:
    """The current content of each marked block of ``text``."""
    found = {}
    for name in BLOCKS:
        m = _block(name).search(text)
        if m:
            found[name] = m.group(2)
    return found


def update(path: str | Path) -> bool:
    """Regenerate the marked blocks of the file ``path`` (atomic write); whether it changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = render(old)
    if new == old:
        return False
    atomic_write_text(path, new)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fipurify.catalog FILE [--check]``: regenerate (or check) FILE's tables."""
    p = argparse.ArgumentParser(prog="python -m fipurify.catalog", description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", default="README.md")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    args = p.parse_args(argv)
    text = Path(args.file).read_text(encoding="utf-8")
    if args.check:
        stale = render(text) != text
        if stale:
            print(f"{args.file}: catalog tables are out of date; run python -m fipurify.catalog {args.file}",
                  file=sys.stderr)
        return int(stale)
    print(f"{args.file}: {'updated' if update(args.file) else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
