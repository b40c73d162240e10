"""The benchmark suite's bookkeeping on known numbers (no timing here: speed lives in `python -m bench`)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.suite import (  # noqa: E402
    CpuMeter,
    CpuUse,
    Curve,
    Figure,
    Result,
    Target,
    alternate,
    median,
    report,
    spread,
    table,
)


def test_median_and_spread_on_known_numbers():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert spread([90.0, 100.0, 110.0]) == pytest.approx(0.10)  # half of the 20-wide range over the median 100
    assert spread([5.0]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_alternate_interleaves_a_and_b():
    order = []
    first, second = alternate(lambda: order.append("a") or 1.0, lambda: order.append("b") or 2.0, 3)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert (first, second) == ([1.0] * 3, [2.0] * 3)
    with pytest.raises(ValueError, match="repeats=0"):
        alternate(lambda: 1.0, lambda: 1.0, 0)


def test_ratio_is_the_median_of_paired_ratios_and_targets_judge_it():
    figure = Figure("retriever", "actor vs in-process", "queries/s", [90.0, 80.0, 100.0], [100.0, 100.0, 100.0],
                    "setup", Target(0.9))  # fmt: skip
    assert figure.ratios == [0.9, 0.8, 1.0]
    assert figure.ratio == pytest.approx(0.9)
    assert figure.met is True
    assert Figure("x", "y", "ms", [120.0], [100.0], "s", Target(1.15, op="<=")).met is False  # 1.2x slower
    assert Figure("x", "y", "calls/s", [250.0], [1e5], "s", Target(200, on="toolseek")).met is True
    assert Figure("x", "y", "u", [1.0, 2.0], [1.0], "s").ratios == [1.5]  # unpaired: ratio of medians
    assert Figure("x", "y", "u", [1.0], [1.0], "s").met is None
    with pytest.raises(ValueError, match="op="):
        Target(1.0, op=">")


def test_table_has_one_row_per_figure_with_every_column():
    figures = [Figure("engines", "generate, batch 8", "tokens/s", [200.0, 220.0], [100.0, 100.0], "tiny", Target(1.5)),
               Figure("serving", "p50", "ms", [10.0], [20.0], "tiny")]
    lines = table(figures).splitlines()
    assert lines[0].startswith("| benchmark | figure | ToolSeek | baseline | ratio | spread | target | met? |")
    assert lines[2].split(" | ")[1:8] == ["generate, batch 8 (tokens/s)", "210", "100", "2.10", "±5% (n=2)",
                                          ">= 1.5x", "yes"]  # fmt: skip
    assert lines[3].split(" | ")[4:8] == ["0.5", "±0% (n=1)", "–", "–"]
    assert len(lines) == 4


def test_report_records_load_and_flags_a_busy_machine():
    figure = Figure("sandbox", "pool", "calls/s", [300.0], [1000.0], "2 actors", Target(200, on="toolseek"))
    results = {"sandbox": Result([figure], notes=["took 3 s"]), "training": Result(notes=["FAILED: boom"])}
    busy = report(results, load_before="99.00, 9.00, 9.00", load_after="1.00, 1.00, 1.00", command="python -m bench all",
                  quick=True, plot_name="BENCHMARKS.png", seconds=60)  # fmt: skip
    assert "re-run on an idle machine" in busy
    assert "before: 99.00, 9.00, 9.00; after: 1.00, 1.00, 1.00" in busy
    assert "| sandbox | pool (calls/s) | 300 | 1000 | 0.3 |" in busy
    assert "- FAILED: boom" in busy and "![scaling curves](BENCHMARKS.png)" in busy
    idle = report(results, load_before="0.00, 0.00, 0.00", load_after="0.00, 0.00, 0.00", command="c", quick=False,
                  plot_name=None, seconds=1)  # fmt: skip
    assert "idle machine" not in idle and "scaling curves" not in idle
    cores = os.cpu_count() or 1  # after the run the suite's own processes raise the load: only others' CPU counts
    own = report(results, load_before="0.10, 0.10, 0.10", load_after=f"{2 * cores:.2f}, 1.00, 1.00", command="c",
                 quick=False, plot_name=None, seconds=100, cpu=CpuUse(ours_s=180.0 * cores / 2, others_s=1.0,
                                                                      seconds=100))  # fmt: skip
    crowded = report(results, load_before="0.10, 0.10, 0.10", load_after="0.50, 0.50, 0.50", command="c",
                     quick=False, plot_name=None, seconds=100, cpu=CpuUse(ours_s=50.0, others_s=40.0 * cores,
                                                                          seconds=100))  # fmt: skip
    assert "idle machine" not in own and "idle machine" in crowded
    assert f"other processes {40 * cores} s (40%)" in crowded


def _busy_seconds(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"]


def test_cpu_meter_tells_our_processes_from_other_jobs():
    """A busy child is ours; a busy process that is no descendant of ours (orphaned by a shell that exits at once,
    as another job's would be) is someone else's."""
    meter = CpuMeter(every_s=0.1)
    subprocess.run(_busy_seconds(1.0), check=True)
    middle = meter.use()
    assert middle.ours_s >= 0.8 and middle.others_s < 0.5, middle
    subprocess.run(["sh", "-c", " ".join(map(shlex.quote, _busy_seconds(1.0))) + " &"], check=True)
    deadline = time.monotonic() + 30
    while meter.use().others_s - middle.others_s < 0.8 and time.monotonic() < deadline:
        time.sleep(0.2)
    end = meter.stop()
    assert end.others_s - middle.others_s >= 0.8, end
    assert end.ours_s - middle.ours_s < 0.5, end


def test_curve_ideal_is_linear_from_the_first_point(tmp_path):
    curve = Curve("t", "batch", "tokens/s", [1, 8, 32], {"vLLM": [10.0, 60.0, 150.0]}, "tiny", ideal_from="vLLM")
    assert curve.ideal() == [10.0, 80.0, 320.0]
    assert Curve("t", "x", "y", [1, 2], {"a": [1.0, 2.0]}, "s").ideal() is None
    from bench.plot import plot_curves

    png = plot_curves([curve], tmp_path / "curves.png", "2 cores")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], tmp_path / "none.png", "2 cores") is None


def test_command_line_help_lists_every_benchmark():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("all", "engines", "retriever", "generation", "training", "serving", "sandbox", "--quick"):
        assert name in done.stdout
    bad = subprocess.run([sys.executable, "-m", "bench", "nonsense"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'nonsense'" in bad.stderr
