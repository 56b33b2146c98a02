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
    parser.add_argument("--model", action="append", choices=MODELS)
    parser.add_argument("--count", type=int, help="cut points per kind and model (default: every operation)")
    parser.add_argument("--second", type=int, default=None, help="runs cut again during the recovery")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the summary there")
    args = parser.parse_args(argv)
    why = fuse_available()
    if why:
        print(f"power-cut sweep SKIPPED: {why}")
        return EXIT_SKIPPED
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
