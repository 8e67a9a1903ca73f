"""What the benchmarks share: process probes, the quiet-machine policy, machine facts, latency figures,
metric scrapes, database helpers.

Used by every ``bench.*_bench``. Everything here reads ``/proc`` (Linux) and talks to the local
PostgreSQL server that ``tests.helpers`` uses.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt
import psycopg

from services.common import db
from tests import helpers

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
NOISE_LIMIT_CORES = 0.35  # CPU used during a scenario by processes outside it before it counts as disturbed


class ScenarioFailed(RuntimeError):
    """A scenario could not be measured (a process died, requests failed); it may be run again."""


class QuietPolicy(Protocol):
    """How long to wait for a quiet machine, and how often to re-run a disturbed scenario."""

    @property
    def wait_quiet(self) -> float: ...

    @property
    def noisy_retries(self) -> int: ...


# --- process probes --------------------------------------------------------------------------------


def status_kb(pid: int, field: str) -> int:
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def postgres_pids() -> list[int]:
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class CpuMeter:
    """CPU time of named process groups over an interval, in cores (1.0 = one core busy)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self._groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)
        self._t0 = 0.0
        self._self0 = 0.0
        self._children0 = 0.0

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self._groups.items()}

    def start(self) -> None:
        self._start = self._snapshot()
        self._machine = machine_busy_seconds()
        self._t0 = time.monotonic()
        own = os.times()
        self._self0 = own.user + own.system
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children0 = children.ru_utime + children.ru_stime

    def stop(self, extra_client_seconds: float = 0.0) -> dict[str, float]:
        """Cores used per group; ``bench_client`` is this process plus waited-for children (wrk)."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        end = self._snapshot()
        busy, total = machine_busy_seconds()
        used: dict[str, float] = {}
        for name, pids in end.items():
            before = self._start.get(name, {})
            used[name] = round(sum(t - before.get(pid, 0.0) for pid, t in pids.items()) / elapsed, 2)
        own = os.times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = (own.user + own.system - self._self0) + (
            children.ru_utime + children.ru_stime - self._children0
        )
        used["bench_client"] = round((client + extra_client_seconds) / elapsed, 2)
        busy0, total0 = self._machine
        machine = (busy - busy0) / max(total - total0, 1e-9) * (os.cpu_count() or 1)
        used["machine_busy"] = round(machine, 2)
        # Whatever else ran meanwhile (the placeholder services, other users of this shared machine).
        used["other"] = round(max(0.0, machine - sum(v for k, v in used.items() if k != "machine_busy")), 2)
        return used


def background_load(seconds: float = 2.0) -> float:
    """Cores busy on the machine over ``seconds`` while the benchmark runs nothing."""
    busy0, total0 = machine_busy_seconds()
    time.sleep(seconds)
    busy, total = machine_busy_seconds()
    return (busy - busy0) / max(total - total0, 1e-9) * (os.cpu_count() or 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until the machine is nearly idle; returns the last load seen."""
    deadline = time.monotonic() + max_wait
    load = background_load()
    while load > threshold and time.monotonic() < deadline:
        print(f"    machine busy ({load:.2f} cores used by others); waiting for it to calm down", flush=True)
        load = background_load()
    return load


class RssSampler:
    """Samples a process's VmRSS in a thread; the peak also takes the kernel's VmHWM into account."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_kb = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(self._pid, "VmRSS"))
            self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb(self._pid, "VmRSS"))
        self.hwm_kb = status_kb(self._pid, "VmHWM")

    def report(self) -> dict[str, float]:
        return {
            "peak_sampled_mb": round(self.peak_kb / 1024, 1),
            "vm_hwm_mb": round(self.hwm_kb / 1024, 1),
            "samples": self.samples,
        }


# --- figures ---------------------------------------------------------------------------------------


def stats_ms(seconds: Sequence[float] | npt.NDArray[np.float64]) -> dict[str, float]:
    """Nearest-rank percentiles of durations given in seconds, in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64)
    if len(a) == 0:
        return {"count": 0}
    q = np.percentile(a, [50, 90, 99], method="inverted_cdf") * 1000
    return {
        "count": len(a),
        "min": round(float(a.min()) * 1000, 3),
        "p50": round(float(q[0]), 3),
        "p90": round(float(q[1]), 3),
        "p99": round(float(q[2]), 3),
        "max": round(float(a.max()) * 1000, 3),
        "mean": round(float(a.mean()) * 1000, 3),
    }


def scrape(port: int, prefixes: Sequence[str]) -> dict[str, float]:
    """Samples of a service's /metrics whose names start with one of ``prefixes``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(tuple(prefixes)):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# --- database --------------------------------------------------------------------------------------


def plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def migrate_database(url: str) -> None:
    engine = db.create_db_engine(url)
    try:
        db.migrate(engine)
    finally:
        engine.dispose()


def truncate_tables(url: str, *tables: str) -> None:
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(tables)}")


def row_count(url: str, table: str) -> int:
    with psycopg.connect(plain_url(url)) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - constant names
    return int(row[0]) if row else 0


# --- machine and scenarios -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(helpers.PG_ADMIN) as conn:
        settings = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("server_version", "synchronous_commit", "fsync", "shared_buffers", "wal_level")
        }
        version = str(conn.execute("SELECT version()").fetchone()[0])  # type: ignore[index]
    envoy = subprocess.run([helpers.envoy_binary(), "--version"], capture_output=True, text=True, check=False)
    envoy_version = next((p for p in envoy.stdout.split("/") if re.fullmatch(r"\d+\.\d+\.\d+", p)), "")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "postgres": version,
        "postgres_settings": settings,
        "envoy": envoy_version,
        "kernel": platform.release(),
    }


def other_load(result: dict[str, Any]) -> float:
    return float(result.get("cpu_cores", {}).get("other", 0.0))


def step(title: str, policy: QuietPolicy, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one scenario once the machine is quiet; again when others loaded it meanwhile.

    The machine is shared: when processes that are not part of the scenario used more than
    ``NOISE_LIMIT_CORES`` during it, it is run again (up to ``--noisy-retries`` times) and the run
    that was least disturbed is kept. Every attempt's disturbance is recorded.
    """
    print(f"... {title}", flush=True)
    attempts: list[dict[str, Any]] = []
    failures: list[str] = []
    for attempt in range(1 + policy.noisy_retries):
        background = wait_for_quiet(policy.wait_quiet) if policy.wait_quiet > 0 else None
        started = time.monotonic()
        try:
            result = run()
        except ScenarioFailed as exc:
            failures.append(str(exc)[:500])
            print(f"    failed: {str(exc)[:300]}", flush=True)
            if attempt == policy.noisy_retries:
                raise
            print("    running it again", flush=True)
            continue
        if background is not None:
            result["background_cores_before"] = round(background, 2)
        attempts.append(result)
        other = other_load(result)
        print(f"    done in {time.monotonic() - started:.1f}s (other load {other:.2f} cores)", flush=True)
        if other <= NOISE_LIMIT_CORES or attempt == policy.noisy_retries:
            break
        print("    disturbed by other processes on the machine: running it again", flush=True)
    best = min(attempts, key=other_load)
    best["attempts"] = len(attempts) + len(failures)
    best["failed_attempts"] = failures
    best["other_load_by_attempt"] = [other_load(a) for a in attempts]
    return best


def write_report(report: dict[str, Any], output: pathlib.Path) -> None:
    """Write a results file atomically: a reader never sees half a report."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(output)


@contextlib.contextmanager
def scratch_folder(prefix: str) -> Iterator[pathlib.Path]:
    """A benchmark's working folder (logs, databases): removed when it succeeds, kept and named if not."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def publish(
    benchmark: str,
    started: dt.datetime,
    output: pathlib.Path,
    parts: dict[str, Any],
    print_table: Callable[[dict[str, Any]], None],
) -> None:
    """Write a benchmark's report to ``output`` and print its table.

    ``parts`` holds the report's own sections in order (``machine``, ``parameters``, ``results``,
    ``figures``, ``targets``, ...); ``parameters`` gains the output path, shown relative to the
    repository when it is inside it.
    """
    output = output.resolve()
    shown = str(output.relative_to(helpers.REPO)) if output.is_relative_to(helpers.REPO) else str(output)
    report = {
        "benchmark": benchmark,
        "timestamp": started.isoformat(timespec="seconds"),
        "wall_seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        **parts,
        "output": shown,
    }
    report["parameters"] = report["parameters"] | {"output": shown}
    write_report(report, output)
    print_table(report)
