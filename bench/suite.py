"""The benchmark suite's bookkeeping: A/B alternation, median and spread, targets, the BENCHMARKS.md table.

Speed figures on a shared 2-core machine drift by tens of percent within a minute, so a ratio is only meaningful
when both sides are measured in the same run, interleaved (A, B, A, B, ...), and reported with their spread. Each
benchmark module returns `Figure`s (and `Curve`s for scaling plots); this module turns them into the report and
knows nothing about what was measured.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER_NICENESS = "0"
"""Ray starts its workers at nice 15 (its `worker_niceness` default) while the in-process baselines run in the driver
at nice 0: with any other job on the machine, every actor-side figure then got a small share of the CPU and the
baseline a full one (measured: Ray actors at nice 15 beside another job's nice-0 training). The suite's Ray session
runs its workers at the driver's niceness, so other load hits both sides alike."""


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Half the range relative to the median (0.05 = the repeats lie within about +-5% of the median)."""
    middle = median(values)
    if middle == 0:
        return 0.0
    return (max(values) - min(values)) / 2 / abs(middle)


def alternate(a: Callable[[], float], b: Callable[[], float], repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` measurements of each side, interleaved A, B, A, B so that drift in machine load hits both alike."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    first, second = [], []
    for _ in range(repeats):
        first.append(float(a()))
        second.append(float(b()))
    return first, second


def timed(run: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@dataclass(frozen=True)
class Target:
    """A goal from issue 13: `on` the ratio or on ToolSeek's own value, `op` '>=' or '<='."""

    value: float
    op: str = ">="
    on: str = "ratio"

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"target op={self.op!r} must be '>=' or '<='")
        if self.on not in ("ratio", "toolseek"):
            raise ValueError(f"target on={self.on!r} must be 'ratio' or 'toolseek'")

    def met(self, figure: Figure) -> bool:
        value = figure.ratio if self.on == "ratio" else median(figure.toolseek)
        return value >= self.value if self.op == ">=" else value <= self.value

    def __str__(self) -> str:
        suffix = "x" if self.on == "ratio" else ""
        return f"{self.op} {self.value:g}{suffix}"


@dataclass
class Figure:
    """One row of BENCHMARKS.md: ToolSeek's path against its baseline, both medians over interleaved repeats.

    `ratios` are the per-repeat ToolSeek/baseline ratios (paired runs), so the spread describes the ratio itself.
    """

    benchmark: str
    name: str
    unit: str
    toolseek: list[float]
    baseline: list[float]
    setup: str
    target: Target | None = None

    def __post_init__(self) -> None:
        if not self.toolseek or not self.baseline:
            raise ValueError(f"figure {self.name!r} has no measurements")

    @property
    def ratios(self) -> list[float]:
        if len(self.toolseek) == len(self.baseline):
            return [a / b if b else float("inf") for a, b in zip(self.toolseek, self.baseline, strict=True)]
        return [median(self.toolseek) / median(self.baseline)]

    @property
    def ratio(self) -> float:
        return median(self.ratios)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self)

    def row(self) -> list[str]:
        met = {None: "–", True: "yes", False: "**no**"}[self.met]
        return [self.benchmark, f"{self.name} ({self.unit})", fmt(median(self.toolseek)), fmt(median(self.baseline)),
                fmt(self.ratio), f"±{100 * spread(self.ratios):.0f}% (n={len(self.ratios)})",
                str(self.target) if self.target else "–", met, self.setup]


@dataclass
class Curve:
    """A scaling figure: y against x for each series, with the ideal (linear from the first point) drawn beside."""

    title: str
    x_label: str
    y_label: str
    xs: list[float]
    series: dict[str, list[float]]
    setup: str
    ideal_from: str | None = None
    """Series whose first point defines the ideal line y = y0 * x / x0; empty = no ideal line."""

    def ideal(self) -> list[float] | None:
        if self.ideal_from is None:
            return None
        ys = self.series[self.ideal_from]
        return [ys[0] * x / self.xs[0] for x in self.xs]


@dataclass
class Result:
    figures: list[Figure] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


COLUMNS = ["benchmark", "figure", "ToolSeek", "baseline", "ratio", "spread", "target", "met?", "setup"]


def table(figures: Sequence[Figure]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f.row()) + " |" for f in figures]
    return "\n".join(lines)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


@dataclass
class CpuUse:
    """CPU seconds this run's processes and all other processes used while it ran, over `seconds` of wall time."""

    ours_s: float
    others_s: float
    seconds: float

    def share(self, cpu_s: float) -> float:
        return cpu_s / (self.seconds * (os.cpu_count() or 1)) if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"this run's processes {self.ours_s:.0f} s ({self.share(self.ours_s):.0%} of the cores), other "
                f"processes {self.others_s:.0f} s ({self.share(self.others_s):.0%})")  # fmt: skip


class CpuMeter:
    """Who used the CPU during the run: every process's CPU time, sampled every few seconds in a thread.

    The load average cannot tell: the suite's own driver, actors and Ray daemons raise it as much as another job does
    (1.6-2.0 on an idle 2-core machine, 3-4 while Serve answers 16 concurrent requests). Ours are this process and its
    descendants (the local Ray cluster it starts, with its workers; the serving benchmark's subprocess and its
    cluster); everything else is another job's. A process born during the run counts whole; one that ends between two
    samples loses its last interval (a few seconds at most)."""

    def __init__(self, every_s: float = 2.0):
        import threading

        self.every_s = every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._begun_wall, self._begun = time.time(), time.monotonic()
        self._previous: dict[tuple[int, float], float] = {}
        self.ours_s = self.others_s = 0.0
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        import psutil

        with self._lock:
            me = psutil.Process()
            try:
                ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
            except psutil.Error:
                ours = {me.pid}
            now: dict[tuple[int, float], float] = {}
            for proc in psutil.process_iter():
                try:
                    with proc.oneshot():
                        key, times = (proc.pid, proc.create_time()), proc.cpu_times()
                except psutil.Error:
                    continue
                now[key] = cpu = times.user + times.system
                if first:
                    continue
                born_during_run = key[1] >= self._begun_wall
                before = self._previous.get(key, 0.0 if born_during_run else cpu)
                if key[0] in ours:
                    self.ours_s += max(0.0, cpu - before)
                else:
                    self.others_s += max(0.0, cpu - before)
            self._previous = now

    def use(self) -> CpuUse:
        """The totals so far (with a fresh sample)."""
        self._sample()
        return CpuUse(self.ours_s, self.others_s, time.monotonic() - self._begun)

    def stop(self) -> CpuUse:
        self._stop.set()
        self._thread.join()
        return self.use()


def machine() -> str:
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{os.cpu_count()} cores{memory}"


BUSY_SHARE = 0.15
"""Other processes using more than this share of the cores during the run make its figures suspect."""


def report(results: dict[str, Result], *, load_before: str, load_after: str, command: str, quick: bool,
           plot_name: str | None, seconds: float, cpu: CpuUse | None = None) -> str:
    """BENCHMARKS.md: header with machine and load, the table, per-benchmark notes, the plot."""
    # Other jobs: the load average before the run (nothing of ours runs yet), and during it the CPU that processes
    # outside the run used (CpuMeter); the load average after the run counts the suite's own processes too.
    cores = os.cpu_count() or 1
    busy = float(load_before.split(",")[0]) > 0.75 * cores or (cpu is not None and cpu.share(cpu.others_s) > BUSY_SHARE)
    lines = ["# Benchmarks", ""]
    if busy:
        lines += ["> **Measured under load from other jobs: re-run on an idle machine.** Other processes held a share",
                  "> of the cores (below), so absolute figures are low and ratios noisy.", ""]
    lines += [f"- command: `{command}`" + (" (`--quick`: small sizes)" if quick else ""),
              f"- machine: {machine()}, no GPU",
              f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}"]
    if cpu is not None:
        lines += [f"- CPU time during the run: {cpu.describe()}"]
    lines += [f"- Ray workers at nice {os.environ.get('RAY_worker_niceness', '15 (Ray default)')}, the driver (in-process "
              f"baselines) at nice {os.nice(0)}: at Ray's default of 15, any other job's load takes CPU from the "
              "actor side of a figure and not from its in-process baseline",
              f"- wall time: {seconds / 60:.1f} min", "",
              "ToolSeek and baseline are medians over interleaved repeats (A, B, A, B, ...); ratio = median of the "
              "per-repeat ToolSeek / baseline ratios; spread = half their range relative to the median. For "
              "latencies a ratio below 1 is better; for rates above 1.", "",
              table([f for r in results.values() for f in r.figures]), ""]
    for name, result in results.items():
        if result.notes:
            lines += [f"## {name}", ""] + [f"- {note}" for note in result.notes] + [""]
    if plot_name:
        lines += ["## Scaling curves", "", f"![scaling curves]({plot_name})", ""]
    lines += ["Reproduce: `make bench` (full sizes) or `.venv/bin/python -m bench all --quick`; one benchmark: "
              "`python -m bench <engines|retriever|generation|training|serving|sandbox>`.", ""]
    return "\n".join(lines)


def ensure_ray() -> None:
    """The suite's own local Ray session (idempotent): 2 CPUs, no dashboard, no Ray Data progress bars, workers at
    the driver's niceness (WORKER_NICENESS).

    `address="local"`: a plain ray.init() joins any cluster that another job on this machine started with `ray start`,
    and then refuses num_cpus; a benchmark must measure its own cluster, so it starts one explicitly and `connect`
    (called afterwards by the measuring scripts) finds Ray initialised and reuses it. RAY_ADDRESS, when set, wins.
    """
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect, runtime_env

    cluster = ClusterConfig(num_cpus=2, include_dashboard=False)
    cluster.env_vars["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)  # read by the raylet this ray.init starts
        for name, value in cluster.env_vars.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False, namespace=cluster.namespace,
                 runtime_env=runtime_env(cluster, remote=False))  # fmt: skip
    connect(cluster)
