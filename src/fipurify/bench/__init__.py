"""Benchmarks: TOML specs expanded into runs, a SQLite results store, a resumable runner, paper-style reports.

    fipurify bench table7 [--jobs 2] [--dry-run]      # run (or continue) a spec
    fipurify report table7 [--out results/bench]       # Markdown, HTML, CSV, JSON

See docs/benchmarks.md.
"""
from .report import Table, build_table
from .runner import BenchOptions, make_plan, run_bench
from .spec import Run, Spec, load_spec, parse_spec, stable_hash
from .store import ResultStore

__all__ = ["BenchOptions", "ResultStore", "Run", "Spec", "Table", "build_table", "load_spec", "make_plan",
           "parse_spec", "run_bench", "stable_hash"]
