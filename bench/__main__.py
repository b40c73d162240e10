"""One command for every speed figure: `python -m bench all [--quick]` or `python -m bench <name>`.

Each benchmark measures ToolSeek's path and its baseline in this process, interleaved, and returns figures; this entry
point records the machine and its load average before and after (a shared machine makes figures drift), writes the
report after every benchmark (a later failure loses nothing measured), and draws the scaling curves.
`all` writes BENCHMARKS.md + BENCHMARKS.png at the repository root; one benchmark writes outputs/bench/<name>.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite import REPO, CpuMeter, Result, load_average, machine, report  # noqa: E402  (after the environment above)

# name -> module with `run(quick, repeats) -> Result`; the order of `all` (vLLM in-process before Ray; Serve last,
# since it shuts Serve down).
BENCHMARKS = {
    "engines": "bench.engines",
    "retriever": "bench.retriever_speed",
    "sandbox": "bench.sandbox_speed",
    "generation": "bench.generation_speed",
    "training": "bench.training_speed",
    "serving": "bench.serving_speed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=["all", *BENCHMARKS], help="which benchmark to run (all: every one)")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole suite in minutes, not an hour")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved A/B repeats (default 3 quick, 5 full)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default BENCHMARKS.md for all, outputs/bench/<name>.md for one)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    repeats = args.repeats or (3 if args.quick else 5)
    out = args.out or (REPO / "BENCHMARKS.md" if args.benchmark == "all" else REPO / "outputs" / "bench" /
                       f"{args.benchmark}.md")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before, started, meter = load_average(), time.time(), CpuMeter()
    print(f"{machine()}; load average {load_before}; {repeats} interleaved repeats", flush=True)
    results: dict[str, Result] = {}
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        began = time.time()
        try:
            results[name] = importlib.import_module(BENCHMARKS[name]).run(args.quick, repeats)
        except Exception as error:  # noqa: BLE001  (one broken benchmark must not lose the others' figures)
            traceback.print_exc()
            failed.append(name)
            results[name] = Result(notes=[f"FAILED: {type(error).__name__}: {str(error)[:300]}"])
        results[name].notes.append(f"took {time.time() - began:.0f} s")
        write(results, out, args, command, load_before, started, meter, plot=False)
    text = write(results, out, args, command, load_before, started, meter, plot=True)
    print("\n" + text)
    print(f"wrote {out}")
    return 1 if failed else 0


def write(results: dict[str, Result], out: Path, args: argparse.Namespace, command: str, load_before: str,
          started: float, meter: CpuMeter, plot: bool) -> str:
    from bench.plot import plot_curves

    png = out.with_suffix(".png")
    drawn = plot_curves([c for r in results.values() for c in r.curves], png, machine()) if plot else None
    text = report(results, load_before=load_before, load_after=load_average(), command=command, quick=args.quick,
                  plot_name=drawn.name if drawn else None, seconds=time.time() - started, cpu=meter.use())
    out.write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
