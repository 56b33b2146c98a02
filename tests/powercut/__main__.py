"""./build.sh powercut [--quick] [--kind K] [--model M] [--count N] [--second N] [--jobs J]

Runs the power-cut sweep (tests/powercut/sweep.py) and prints, for each kind of update and each
model, the cut points tried, how many held, and the first failure in full. Exits 0 only if
every cut point held; 77 (skipped) when FUSE cannot run here, saying why.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

from tests.powercut.sweep import KINDS, MODELS, fuse_available, run_pair

QUICK_CUTS = 16     # per kind and model: 6 x 16 cuts, about 3.3 s each on two workers
QUICK_SECOND = 2    # cut again during the recovery
EXIT_SKIPPED = 77


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="./build.sh powercut")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CUTS} even cut points per kind and model")
    parser.add_argument("--kind", action="append", choices=KINDS)
    parser.add_argument("--model", action="append", choices=MODELS + ("posix",))
    parser.add_argument("--count", type=int, help="cut points per kind and model (default: every operation)")
    parser.add_argument("--second", type=int, default=None, help="runs cut again during the recovery")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the summary there")
    parser.add_argument("--mutants", action="store_true",
                        help="remove each sync call of the agent alone, and all of them, and sweep each copy")
    parser.add_argument("--site", type=int, action="append", help="with --mutants: only these sites (0-based)")
    args = parser.parse_args(argv)
    why = fuse_available()
    if why:
        print(f"power-cut sweep SKIPPED: {why}")
        return EXIT_SKIPPED
    if args.mutants:
        return mutant_sweeps(args)
    count = args.count or (QUICK_CUTS if args.quick else None)
    second = args.second if args.second is not None else (QUICK_SECOND if args.quick else 8)
    pairs = [(k, m) for k in (args.kind or KINDS) for m in (args.model or MODELS)]
    with tempfile.TemporaryDirectory(prefix="powercut-") as workdir:
        jobs = [(k, m, count, second, workdir) for k, m in pairs]
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.map(run_pair, jobs, chunksize=1)
    print("\npower-cut sweep:")
    print(f"{'kind':10} {'model':7} {'operations':>10} {'cut points':>10} {'held':>6} {'seconds':>8}")
    ok = True
    for r in results:
        print(f"{r['kind']:10} {r['model']:7} {r['operations']:>10} {r['tried']:>10} {r['passed']:>6} "
              f"{r['seconds']:>8}")
        if r.get("error") or r["passed"] != r["tried"] or not r["tried"]:
            ok = False
    for r in results:
        if r.get("error"):
            print(f"\n{r['kind']}/{r['model']}: the update without a cut failed: {r['error']}")
        elif r["failures"]:
            print(f"\nfirst failure of {r['kind']}/{r['model']} ({len(r['failures'])} in all):\n{r['failures'][0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\nall cut points held" if ok else "\nSOME CUT POINTS FAILED")
    return 0 if ok else 1


def mutant_sweeps(args) -> int:
    """Each sync call removed alone: the strict sweep (cuts right before every sync call left) of
    the kind of update that runs it (a rollback for restore_old, a core update for the rest).
    Then all of them removed: the quick sweep of every kind and model must fail."""
    from tests.conftest import REPO
    from tests.powercut.mutants import sync_sites, write_mutant
    source = REPO / "ggc_ota.py"
    sites = sync_sites(source.read_text())
    chosen = [(i, s) for i, s in enumerate(sites) if not args.site or i in args.site]
    models = args.model or ["strict"]

    def kinds_for(site) -> list:  # the kind of update that runs the site's code
        return args.kind or (["rollback"] if site.function.startswith("restore_old") else ["core"])

    report = []
    with tempfile.TemporaryDirectory(prefix="powercut-mutants-") as workdir:
        jobs = []
        for i, site in chosen:
            mutant = write_mutant(source, Path(workdir) / f"ggc_ota-without-{i}.py", [site])
            jobs += [(k, m, None, 0, f"{workdir}/site{i}", str(mutant), True) for k in kinds_for(site) for m in models]
        everything = write_mutant(source, Path(workdir) / "ggc_ota-without-all.py", sites)
        jobs += [(k, m, QUICK_CUTS, 0, f"{workdir}/all", str(everything), False) for k in KINDS for m in MODELS]
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_pair, jobs, chunksize=1)
    by_site: dict = {}
    for job, result in zip(jobs, results):
        by_site.setdefault(job[4].rsplit("/", 1)[1], []).append(result)
    print("\nsync calls removed one at a time (strict sweep, cut right before each sync call left):")
    ok = True
    for i, site in chosen:
        runs = by_site[f"site{i}"]
        caught = [f"{r['kind']}/{r['model']}: {len(r['failures'])} of {r['tried']}" for r in runs if r["failures"]]
        first = next((r["failed_at"][0] for r in runs if r.get("failed_at")), "")
        print(f"[{i}] {site.function} (line {site.line}) {site.text}\n    "
              + ("caught by " + "; ".join(caught) + f"\n    first: {first}" if caught else "NOT CAUGHT"))
        report.append({"site": i, "function": site.function, "line": site.line, "text": site.text,
                       "runs": [{k: r[k] for k in ("kind", "model", "tried", "passed", "failed_at", "operations")
                                 if k in r} for r in runs]})
    everything_runs = by_site["all"]
    failed = sum(len(r["failures"]) for r in everything_runs)
    tried = sum(r["tried"] for r in everything_runs)
    print(f"\nall {len(sites)} sync calls removed: {failed} of {tried} cut points of the quick sweep failed")
    ok = failed > 0
    report.append({"all": True, "tried": tried, "failed": failed,
                   "runs": [{k: r[k] for k in ("kind", "model", "tried", "passed", "failed_at") if k in r}
                            for r in everything_runs]})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
