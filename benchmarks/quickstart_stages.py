"""Wall time and peak memory per stage of `ldmflow run quickstart`.

    python benchmarks/quickstart_stages.py [--json PATH]             # runs the quickstart, fresh dir
    python benchmarks/quickstart_stages.py runs/quickstart           # times of a finished run (no memory)
    python benchmarks/quickstart_stages.py --quick                   # smoke: tiny overrides, seconds

Run mode starts the CLI as a subprocess and reads its stderr live. The pipeline announces stages as
`[ldmflow HH:MM:SS] <stage>: <reason>; running (key K)` ... `<stage>: done in Ns (key K)` (or
`<stage>: up to date ...` for a cached one). A thread samples every 0.5 s the RSS summed over the
CLI process and all its descendants (the local Ray it starts: GCS, raylet, worker processes) and
charges each sample to the stage running at that moment; a stage's peak is its largest sample.
Time before the first stage (Ray start, config, MLflow) is charged to "startup", time between
stages to "between stages". A stage's time is the pipeline's own "done in Ns".

Where the time goes (run mode, embedded MLflow): each training stage's MLflow run logs its loss
every `log_every` steps with a timestamp, so its wall time splits into start-up (run start to the
first step: workers, imports, process group, data preload), the steps (logged steps x the measured
time per step) and the end (last step to run end: final evaluation, checkpoint, artifacts). With
the other stages this gives how much faster the steps alone would need to be for the target.
Target: the whole quickstart in <= 10 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MINUTES = 10.0
SAMPLE_EVERY_S = 0.5
STARTUP, BETWEEN = "startup", "between stages"

# `[ldmflow 12:34:56] diffusion: done in 469s (key abc)`: pipelines/run.py `_say` and `_stage`.
LINE = re.compile(r"^\[ldmflow (\d\d:\d\d:\d\d)\] ([A-Za-z][\w-]*): (.*)$")
DONE = re.compile(r"^done in (\d+(?:\.\d+)?)s\b")


@dataclass(frozen=True)
class StageEvent:
    clock: str                  # HH:MM:SS as printed
    stage: str
    kind: str                   # "running" | "done" | "cached"
    seconds: float | None = None    # "done in Ns"


def parse_line(line: str) -> StageEvent | None:
    """A stage start / end / cache-hit line of the pipeline's stderr, else None (Ray's, tqdm's and
    other `[ldmflow]` lines, e.g. generate's 'model ...: scanning prompts')."""
    m = LINE.match(line.rstrip("\r\n"))
    if not m:
        return None
    clock, stage, msg = m.groups()
    if d := DONE.match(msg):
        return StageEvent(clock, stage, "done", float(d.group(1)))
    if msg.startswith("up to date"):
        return StageEvent(clock, stage, "cached")
    if re.search(r"; running \(key \w+\)$", msg):
        return StageEvent(clock, stage, "running")
    return None


@dataclass
class StageStats:
    status: str = "running"         # running | ran | cached
    seconds: float | None = None    # the pipeline's "done in"; None while running / for a cache hit
    peak_rss: int = 0               # bytes, largest sample charged to the stage
    samples: int = 0


@dataclass
class StageClock:
    """Which stage runs now, from the stderr lines; RSS samples charged to it. Thread-safe: the
    reader feeds lines, the sampler feeds samples."""
    stages: dict[str, StageStats] = field(default_factory=dict)   # in order of first appearance
    current: str = STARTUP
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def feed(self, line: str) -> StageEvent | None:
        ev = parse_line(line)
        if ev is None:
            return None
        with self._lock:
            st = self.stages.setdefault(ev.stage, StageStats())
            if ev.kind == "running":
                st.status, self.current = "running", ev.stage
            elif ev.kind == "done":
                st.status, st.seconds = "ran", ev.seconds
                self.current = BETWEEN
            else:
                st.status, self.current = "cached", BETWEEN
        return ev

    def sample(self, rss: int) -> None:
        with self._lock:
            st = self.stages.setdefault(self.current, StageStats(status="-"))
            st.peak_rss = max(st.peak_rss, rss)
            st.samples += 1


def clock_from_text(text: str) -> StageClock:
    """A StageClock of a whole captured stderr (no memory samples): the parser on canned text."""
    c = StageClock()
    for line in text.splitlines():
        c.feed(line)
    return c


def tree_rss(pid: int) -> int:
    """RSS in bytes of process `pid` and all its descendants (processes that end meanwhile skipped)."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def kill_tree(pid: int, grace_s: float = 10.0) -> None:
    """End the CLI process `pid` and what it started (its local Ray: GCS, raylet, workers), by
    their ids: SIGTERM first, SIGKILL to whatever is left after `grace_s`."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)   # listed before the parent goes
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_cli(config: str, overrides: list[str], log_path: Path, timeout: float | None = None) -> tuple[StageClock, float, int]:
    """`ldmflow run CONFIG OVERRIDES` as a subprocess, stderr parsed live and copied to `log_path`.
    Returns (clock, wall seconds, exit code)."""
    clock = StageClock()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.perf_counter()
    with open(log_path, "w", buffering=1) as log, open(log_path.with_name(log_path.name.replace("stderr", "stdout")), "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", config, *overrides], cwd=ROOT,
                                stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                clock.sample(tree_rss(proc.pid))
                stop.wait(SAMPLE_EVERY_S)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        timer = threading.Timer(timeout, kill_tree, (proc.pid,)) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stderr:
                log.write(line)
                clock.feed(line)
            rc = proc.wait()
        finally:
            stop.set()
            th.join()
            if timer:
                timer.cancel()
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
    return clock, time.perf_counter() - t0, rc


def clock_from_run_dir(run_dir: Path) -> StageClock:
    """Stage times of a finished run from its stage records (<run>/stages/<stage>/<key>.json, the
    newest finished per stage). No memory: that needs run mode."""
    clock = StageClock()
    records = []
    for f in sorted((run_dir / "stages").glob("*/*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "stage" in rec and rec.get("seconds") is not None:
            records.append(rec)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no stage records (stages/*/*.json with seconds); "
                                f"not a finished ldmflow run of this version")
    newest: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r.get("finished", "")):
        newest[rec["stage"]] = rec
    for rec in sorted(newest.values(), key=lambda r: r.get("finished", "")):
        clock.stages[rec["stage"]] = StageStats(status="ran", seconds=float(rec["seconds"]))
    return clock


@dataclass(frozen=True)
class TrainingSplit:
    stage: str
    steps: int            # the last logged step
    step_s: float         # seconds per step between the first and the last logged step
    startup_s: float      # run start -> the first step's start
    steps_s: float        # the first step's start -> the last logged step
    end_s: float          # the last logged step -> run end


def split_training(stage: str, start_ms: int, end_ms: int, points: list[tuple[int, int]]) -> TrainingSplit | None:
    """A training stage's wall time from its run's start/end and (step, timestamp ms) of one metric
    logged every few steps. None with fewer than two logged steps (no rate to measure)."""
    pts = sorted(points)
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    (s1, t1), (sn, tn) = pts[0], pts[-1]
    step_s = (tn - t1) / 1e3 / (sn - s1)
    first = t1 / 1e3 - s1 * step_s           # when step 1 began, at the measured rate
    return TrainingSplit(stage, sn, step_s, max(0.0, first - start_ms / 1e3), tn / 1e3 - first,
                         max(0.0, (end_ms - tn) / 1e3))


def training_splits(tracking_uri: str) -> list[TrainingSplit]:
    """The TrainingSplit of every stage run with `train/` metrics in the newest pipeline run."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, order_by=["attributes.start_time DESC"], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        return []
    parent = parents[0].info.run_id
    out = []
    for r in sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent),
                    key=lambda r: r.info.start_time):
        keys = sorted(k for k in r.data.metrics if k.startswith("train/"))
        if not keys or r.info.end_time is None:
            continue
        key = "train/loss" if "train/loss" in keys else ("train/total_loss" if "train/total_loss" in keys else keys[0])
        hist = client.get_metric_history(r.info.run_id, key)
        split = split_training(r.info.run_name, r.info.start_time, r.info.end_time,
                               [(m.step, m.timestamp) for m in hist])
        if split:
            out.append(split)
    return out


def breakdown(splits: list[TrainingSplit], total_s: float, target_s: float) -> tuple[str, str]:
    """(markdown table, note) of where the training stages' time goes, and what the target asks."""
    rows = [f"| {s.stage} | {s.startup_s:.0f} | {s.steps} x {s.step_s * 1e3:.0f} ms = {s.steps_s:.0f} | "
            f"{s.end_s:.0f} |" for s in splits]
    table = "\n".join(["| training stage | start-up s | steps s | end s (final eval, save) |",
                        "|---|---|---|---|", *rows])
    steps = sum(s.steps_s for s in splits)
    fixed = total_s - steps
    if fixed >= target_s:
        need = f"the rest alone ({fixed:.0f} s) already exceeds the {target_s:.0f} s target"
    elif steps <= target_s - fixed:
        need = f"within the {target_s:.0f} s target"
    else:
        need = (f"for {target_s / 60:.0f} min the steps would have to run {steps / (target_s - fixed):.2f}x "
                f"faster with the rest unchanged")
    note = (f"Where the time goes: training steps {steps:.0f} s of {total_s:.0f} s ({steps / total_s:.0%}); "
            f"start-ups, final evaluations, the other stages and Ray take the other {fixed:.0f} s; {need}")
    return table, note


def result(clock: StageClock, *, wall: float | None, command: str, setup: str, rc: int = 0,
           splits: list[TrainingSplit] | None = None) -> dict:
    """The benchmark result (run_all's format) of a clock: one row per stage, the total vs target."""
    gib = 2 ** 30
    rows = []
    measured = any(st.samples for st in clock.stages.values())
    stage_sum = sum(st.seconds or 0 for st in clock.stages.values())
    for name, st in clock.stages.items():
        secs = "-" if st.seconds is None else f"{st.seconds:.0f}"
        share = "-" if not st.seconds or not stage_sum else f"{st.seconds / stage_sum:.0%}"
        mem = f"{st.peak_rss / gib:.2f}" if st.samples else "not measured"
        rows.append([name, st.status, secs, share, mem])
    total = wall if wall is not None else stage_sum
    peak = max((st.peak_rss for st in clock.stages.values()), default=0)
    rows.append(["**total**", "exit 0" if rc == 0 else f"exit {rc}", f"{total:.0f}", "",
                 f"{peak / gib:.2f}" if measured else "not measured"])
    fig = {"name": "quickstart wall time", "value": total / 60, "unit": " min",
           "baseline": "target", "op": "<=", "target": TARGET_MINUTES}
    if rc != 0:
        fig["error"] = f"the pipeline exited {rc}; see the stderr log"
    res = {"benchmark": "quickstart_stages", "title": "Quickstart: time and peak memory per stage",
           "command": command, "setup": setup,
           "table": {"columns": ["stage", "status", "seconds", "share", "peak RSS GiB (driver + Ray)"],
                     "rows": rows},
           "figures": [fig]}
    if splits:
        res["markdown"], res["note"] = breakdown(splits, total, TARGET_MINUTES * 60)
        res["training_splits"] = [s.__dict__ for s in splits]
    return res


def _splits_of(out: Path) -> list[TrainingSplit]:
    """The training splits of a run directory with the embedded MLflow store, else none."""
    db = out / "mlflow.db"
    return training_splits(f"sqlite:///{db}") if db.is_file() else []


def tiny_overrides(out: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_overrides as tiny   # the suite's whole-pipeline-in-seconds sizes
    return tiny(out)


def run(quick: bool = False, run_dir: str | None = None, config: str = "quickstart",
        out_dir: str | None = None, timeout: float | None = None) -> dict:
    if run_dir:
        p = Path(run_dir)
        if p.is_file():   # a captured stderr log
            clock = clock_from_text(p.read_text())
        else:
            clock = clock_from_run_dir(p)
        return result(clock, wall=None, command=f"python benchmarks/quickstart_stages.py {run_dir}",
                      setup=f"stage times read from {run_dir} (memory is measured only in run mode)",
                      splits=_splits_of(p) if p.is_dir() else None)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ldmflow-bench-quickstart-"))
    overrides = tiny_overrides(out) if quick else [f"output_dir={out}"]
    log = out.parent / f"{out.name}.stderr.log"
    clock, wall, rc = run_cli(config, overrides, log, timeout)
    setup = (f"`ldmflow run {config}`" + (" with the test suite's tiny overrides" if quick else "")
             + f" into a fresh {out}; RSS sampled every {SAMPLE_EVERY_S} s; stderr in {log}")
    return result(clock, wall=wall, command="python benchmarks/quickstart_stages.py" + (" --quick" if quick else ""),
                  setup=setup, rc=rc, splits=_splits_of(out) if rc == 0 else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", help="a finished run directory or a captured stderr log: report "
                                              "its stage times instead of running")
    p.add_argument("--quick", action="store_true", help="smoke: the pipeline at the test suite's tiny sizes")
    p.add_argument("--config", default="quickstart")
    p.add_argument("--out-dir", help="output directory of the run (default: a fresh temp dir)")
    p.add_argument("--timeout", type=float, help="kill the pipeline after this many seconds")
    p.add_argument("--json", help="also write the result here (benchmarks/run_all.py reads it)")
    args = p.parse_args(argv)
    res = run(args.quick, args.run_dir, args.config, args.out_dir, args.timeout)
    cols = res["table"]["columns"]
    print(f"{res['setup']}\n\n| {' | '.join(cols)} |\n|{'---|' * len(cols)}")
    for r in res["table"]["rows"]:
        print(f"| {' | '.join(r)} |")
    if res.get("markdown"):
        print(f"\n{res['markdown']}\n\n{res['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["table"]["rows"][-1][1] == "exit 0" else 1


if __name__ == "__main__":
    sys.exit(main())
