"""``fipurify bench`` and ``fipurify report``: run a benchmark spec, render its tables."""
from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_DB = Path("results") / "bench" / "results.sqlite"
DEFAULT_OUT = Path("results") / "bench"


def default_cache() -> Path:
    """The bench model cache: ``$FIPURIFY_CACHE/bench-models`` (else under ``~/.cache/fipurify``)."""
    from ..datasets.roots import cache_dir

    return cache_dir() / "bench-models"


def register(subparsers) -> None:
    """Add the ``bench`` and ``report`` sub-commands."""
    from ..command_args import _add_data_args, _add_device_arg

    b = subparsers.add_parser("bench", help="run a benchmark spec (grid of attacks x defenses x seeds)",
                              description="Expand SPEC's grid, skip finished runs, train missing backdoored models "
                                          "and run the defenses, one result row per run. Safe to kill and rerun.")
    b.add_argument("spec", help="spec file, or a name under benchmarks/specs (e.g. table7) (required)")
    b.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    b.add_argument("--cache", type=Path, default=None,
                   help="folder of cached backdoored models (default $FIPURIFY_CACHE/bench-models)")
    _add_data_args(b)
    b.add_argument("--jobs", type=int, default=1,
                   help="worker processes (with --backend ray: Ray tasks) at a time (default: %(default)s)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker; with --backend ray also the CPUs each task reserves "
                        "(default $OMP_NUM_THREADS, else cores / jobs)")
    b.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine; ray: tasks on a Ray cluster, results and model "
                        "cache kept here, models passed through Ray's object store (needs fipurify[ray]) "
                        "(default: %(default)s)")
    b.add_argument("--address", default=None, metavar="ADDR",
                   help="with --backend ray: the cluster to join (auto: the one this machine belongs to, "
                        "or HOST:PORT of its head) (default: start a local Ray instance with this machine's CPUs)")
    _add_device_arg(b)
    b.add_argument("--adopt", nargs="+", type=Path, default=[], metavar="MODEL",
                   help="reuse these model files (e.g. from `fipurify train`) for the spec's models they match "
                        "exactly (data, architecture, training, seed, attack); the others are reported and ignored "
                        "(default: none)")
    b.add_argument("--dry-run", action="store_true", help="only show what would run (default: run)")
    b.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only matching runs: a word equal to a label part (attack, defense id, s0, n500) "
                        "or a glob on the label attack/.../defense/nSIZE/sSEED; repeatable or comma-separated "
                        "(default: all runs)")
    b.add_argument("--rerun", action="append", default=[], metavar="PATTERN",
                   help="forget the stored results of the selected runs matching PATTERN (as --only) and run them "
                        "again, e.g. after changing a defense's code or defaults (default: none)")
    b.add_argument("--shard", default=None, metavar="I/N", help="run part I (0-based) of N, for several machines (default: all)")
    b.add_argument("--skip-unknown", action="store_true",
                   help="drop attacks/defenses this version does not know instead of stopping (default: stop)")
    b.add_argument("--timeout", type=float, default=None, help="kill a task after this many seconds, recorded as failed (default: no limit)")
    b.add_argument("--nondeterministic", action="store_true", help="allow non-deterministic (faster) GPU kernels (default: deterministic)")
    b.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    b.set_defaults(func=cmd_bench)

    r = subparsers.add_parser("report", help="render a spec's results as Markdown, HTML, CSV and JSON",
                              description="Paper-style tables (mean ± std over seeds, best per column in bold, "
                                          "the paper's numbers beside ours) from a results database.")
    r.add_argument("source", help="spec file or name, or a results database (renders every spec stored in it) (required)")
    r.add_argument("--db", type=Path, default=None, help=f"results database (default {DEFAULT_DB})")
    r.add_argument("--merge", nargs="+", type=Path, default=[], metavar="DB",
                   help="first merge these databases (e.g. from other machines) into --db (default: none)")
    r.add_argument("--carry", nargs="+", type=Path, default=[], metavar="JSON",
                   help="earlier JSON reports (e.g. docs/benchmarks/SPEC.json) whose rows fill the cells this "
                        "database has no run for, marked as carried (default: none)")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    r.add_argument("--figures", type=Path, default=None,
                   help="figure folder: the runtime chart is written there and every PNG in it is embedded in the HTML "
                        "(default OUT/figures, only the runtime chart embedded)")
    r.add_argument("--no-figures", action="store_true", help="no runtime chart (default: draw it)")
    r.add_argument("--format", default="md,html,csv,json",
                   help="comma-separated subset of md,html,csv,json (default: %(default)s)")
    r.add_argument("--readme", type=Path, default=None, metavar="MD",
                   help="also replace the block between <!-- report:SPEC --> and <!-- /report:SPEC --> in this "
                        "Markdown file (e.g. README.md) with the table (default: none)")
    r.add_argument("--quiet", action="store_true", help="do not print the Markdown table (default: print it)")
    r.set_defaults(func=cmd_report)


def _patterns(items: list[str]) -> list[str]:
    """Repeated and comma-separated ``--only`` / ``--rerun`` values as one list."""
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def cmd_bench(args) -> int:
    from ..errors import ConfigError
    from .runner import BenchOptions, parse_shard, run_bench
    from .stages import check_entries
    from .spec import load_spec, unknown_names, without

    spec = load_spec(args.spec)
    unknown = unknown_names(spec)
    if unknown["attacks"] or unknown["defenses"]:
        what = ", ".join(f"{k}: {', '.join(v)}" for k, v in unknown.items() if v)
        if not args.skip_unknown:
            raise ConfigError(f"spec {spec.name} names what this version does not know ({what}); "
                              "pass --skip-unknown to run the rest")
        print(f"skipping unknown {what}", file=sys.stderr)
        spec = without(spec, unknown["attacks"], unknown["defenses"])
    check_entries(spec)
    if args.backend == "ray" and not args.dry_run:  # a one-line error before anything is done
        from .ray_backend import require_ray
        require_ray()
    only = _patterns(args.only)
    opts = BenchOptions(db=args.db, cache=args.cache or default_cache(), data_root=args.data_root, jobs=args.jobs,
                        threads=args.threads, device=args.device, deterministic=not args.nondeterministic,
                        only=only, shard=parse_shard(args.shard) if args.shard else None, dry_run=args.dry_run,
                        timeout=args.timeout, progress=not args.quiet, adopt=args.adopt,
                        rerun=_patterns(args.rerun), backend=args.backend, address=args.address)
    try:
        counts = run_bench(spec, opts, out=sys.stdout if args.dry_run else sys.stderr)
    except KeyboardInterrupt:
        print("fipurify bench: interrupted; finished runs are saved - run the same command again to continue",
              file=sys.stderr)
        return 130
    return 1 if counts.get("failed") else 0


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def cmd_report(args) -> int:
    from ..errors import ConfigError
    from .render import FORMATS, write_report
    from .report import build_table, read_report
    from .spec import load_spec, parse_spec
    from .store import ResultStore

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got {args.format!r}")
    source = Path(args.source)
    from_db = source.is_file() and _is_sqlite(source)
    if from_db and args.db is not None and Path(args.db).resolve() != source.resolve():
        raise ConfigError("give the database either as SOURCE or as --db, not two different ones")
    db = source if from_db else (args.db or DEFAULT_DB)
    spec = None if from_db else load_spec(args.source)  # a bad spec fails before anything is written
    carry_docs = {path: read_report(path) for path in args.carry}  # each read once, before the store is touched
    for path, doc in carry_docs.items():
        if spec is not None and doc["spec"] != spec.name:
            raise ConfigError(f"--carry {path}: it reports spec {doc['spec']!r}, not {spec.name!r}")
    if not args.merge and not Path(db).is_file():
        raise ConfigError(f"no results database at {db}; run `fipurify bench` first or pass --db")
    with ResultStore(db) as store:
        for other in args.merge:
            n = store.merge_from(other)
            print(f"merged {n} rows from {other} into {db}", file=sys.stderr)
        if spec is not None:
            specs = [spec]
        else:
            specs = [parse_spec(d) for d in store.specs().values()]
            if not specs:
                raise ConfigError(f"{db} holds no spec; render it with `fipurify report SPEC --db {db}`")
        names = [s.name for s in specs]
        carries = {}
        for path, doc in carry_docs.items():
            if doc["spec"] not in names:
                raise ConfigError(f"--carry {path}: it reports spec {doc['spec']!r}, which is not rendered here "
                                  f"({', '.join(names)})")
            carries[doc["spec"]] = doc
        for spec in specs:
            table = build_table(spec, store, carries.get(spec.name))
            paths = write_report(table, args.out, args.figures, extra_figures=args.figures is not None,
                                 formats=formats, make_figures=not args.no_figures)
            if args.readme is not None:
                from .readme import update

                changed = update(args.readme, table)
                print(f"{spec.name}: {'updated' if changed else 'unchanged'} block in {args.readme}", file=sys.stderr)
            if not args.quiet:
                from .render import to_markdown
                print(to_markdown(table))
            print(f"{spec.name}: {table.n_ok}/{table.n_runs} runs finished; wrote "
                  + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0
