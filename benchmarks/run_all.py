"""The one benchmark command: runs every benchmark, rewrites BENCHMARKS.md.

    python benchmarks/run_all.py                    # all of them, then BENCHMARKS.md
    python benchmarks/run_all.py --quick --out /tmp/B.md      # smoke sizes (a test of the machinery)
    python benchmarks/run_all.py --only latent_cache          # one; the other sections stay as they were

Each benchmark is a script run as a subprocess (its own threads, Ray and memory) with `--json PATH`
(and `--quick`); the JSON it writes is one result:

    {"benchmark": NAME, "title": str, "command": str, "setup": str,
     "table": {"columns": [str], "rows": [[str]]},
     "figures": [{"name": str, "value": float, "unit": "x" | "%" | " min", "baseline": str,
                  "op": ">=" | "<=", "target": float | None, "error"?: str}]}

Every figure is a ratio measured side by side in the same run against its `baseline`; this script
only judges it against its target ("met", or "missed by X%": the shortfall relative to the target)
and renders (a figure without a target is shown, not judged). A benchmark that fails, times out, writes no JSON or needs a device this machine lacks
(CUDA) becomes a row saying why, and the run goes on. A JSON of another shape (no "figures", e.g.
unet_speed.py's) is shown as the report it printed, with its ldmflow-vs-diffusers ratios as figures.

BENCHMARKS.md: a header (machine, versions, command, date, commit), a summary of every figure, one
section per benchmark (marked `<!-- run_all: NAME DATE COMMIT on CPU -->`), then "Earlier measurements": the
previous file's hand-written sections, kept verbatim one level down. With --only, the other
benchmarks' sections of the previous file are kept as they were (their markers say when).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EARLIER = "Earlier measurements"
SUMMARY = "Summary"
MARKER = re.compile(r"<!-- run_all: ([\w-]+)\b")


@dataclass(frozen=True)
class Benchmark:
    script: str                      # relative to the repository root
    title: str                       # the section heading (also used when it fails)
    needs_cuda: bool = False         # skipped with a row saying so on a machine without CUDA
    timeout_s: float = 3600          # full size; --quick uses QUICK_TIMEOUT_S
    args: tuple[str, ...] = ()


# Flat registry: --only choices, in the order the sections appear.
BENCHMARKS: dict[str, Benchmark] = {
    "unet_speed": Benchmark("benchmarks/unet_speed.py", "U-Net train step and sampling vs diffusers"),
    "latent_cache": Benchmark("benchmarks/latent_cache.py",
                              "Diffusion training: cached latents vs encoding on the fly"),
    "precision": Benchmark("benchmarks/precision.py",
                           "Training precision: fp32 vs bf16 autocast, and auto's pick"),
    "training_compile": Benchmark("benchmarks/training_compile.py",
                                  "Diffusion training step: eager vs torch.compile"),
    "generation_scaling": Benchmark("benchmarks/generation_scaling.py",
                                    "Batch generation: Ray actors vs a plain loop"),
    "quickstart_stages": Benchmark("benchmarks/quickstart_stages.py",
                                   "Quickstart: time and peak memory per stage", timeout_s=2400),
}
QUICK_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------
# running


def failed(name: str, why: str) -> dict:
    """The result of a benchmark that produced no figures, with the reason."""
    b = BENCHMARKS.get(name)
    return {"benchmark": name, "title": b.title if b else name, "error": why}


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-400:]


def run_one(name: str, quick: bool, extra: tuple[str, ...] = (), timeout_s: float | None = None) -> dict:
    """Run benchmark `name` as a subprocess; its result, or `failed(...)` saying why not."""
    b = BENCHMARKS[name]
    if b.needs_cuda and not _cuda_available():
        return failed(name, "needs a CUDA device; this machine has none")
    script = ROOT / b.script
    if not script.is_file():
        return failed(name, f"{b.script} does not exist (yet)")
    with tempfile.TemporaryDirectory(prefix=f"ldmflow-bench-{name}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--json", str(out), *(["--quick"] if quick else []), *b.args, *extra]
        timeout = timeout_s or (QUICK_TIMEOUT_S if quick else b.timeout_s)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return failed(name, f"timed out after {timeout:.0f} s")
        print(f"[run_all] {name}: exit {p.returncode} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if p.returncode != 0:
            return failed(name, f"exit {p.returncode}: {_tail(p.stderr) or _tail(p.stdout)}")
        if not out.is_file():
            return failed(name, f"wrote no {out.name} (--json); stdout: {_tail(p.stdout)}")
        try:
            data = json.loads(out.read_text())
        except ValueError as e:
            return failed(name, f"its --json output is not JSON: {e}")
    return normalize(name, data, p.stdout)


def normalize(name: str, data, stdout: str = "") -> dict:
    """A result in this file's format; another shape keeps the Markdown table the script printed
    (and its JSON, for the record)."""
    if isinstance(data, dict) and isinstance(data.get("figures"), list):
        res = dict(data)
        res["benchmark"] = name
        if name in BENCHMARKS:   # the registry names the sections: stable headings across runs
            res["title"] = BENCHMARKS[name].title
        res.setdefault("title", name)
        return res
    table = "\n".join(ln for ln in stdout.splitlines() if ln.lstrip().startswith("|"))
    if isinstance(data, dict) and isinstance(data.get("markdown"), str):
        table = data["markdown"]   # the report it printed, prose included
    figures = _variant_figures(data) if isinstance(data, dict) else []
    return {"benchmark": name, "title": BENCHMARKS[name].title if name in BENCHMARKS else name,
            "command": f"python {BENCHMARKS[name].script}" if name in BENCHMARKS else name,
            "markdown": table or "(it printed no table)", "figures": figures,
            **({} if figures else {"note": "its JSON has no figures; the table is the one it printed"})}


def _variant_figures(data: dict) -> list[dict]:
    """benchmarks/unet_speed.py's JSON: {"training": {"variants": {name: {"median_s"}}}, "sampling":
    {"samplers": {s: {"variants": ...}}}} with diffusers variants named "diffusers...". One figure
    per comparison: best diffusers time / best ldmflow time. It states no target: none is judged."""
    def best(variants: dict, ours: bool) -> float:
        return min(float(v["median_s"]) for n, v in variants.items() if n.startswith("diffusers") != ours)

    comparisons = []
    if isinstance(data.get("training"), dict) and data["training"].get("variants"):
        comparisons.append(("training step", data["training"]["variants"]))
    for sampler, r in ((data.get("sampling") or {}).get("samplers") or {}).items():
        comparisons.append((f"sampling {sampler}", r.get("variants") or {}))
    figures = []
    for what, variants in comparisons:
        try:
            value = best(variants, False) / best(variants, True)
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            continue   # a comparison missing one side: nothing to report
        figures.append({"name": f"{what}: speed, best ldmflow vs best diffusers", "value": value, "unit": "x",
                        "baseline": "best diffusers variant", "op": ">=", "target": None})
    return figures


# ----------------------------------------------------------------------------------------------
# judging and rendering (pure)


def fmt_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.3g}{unit}"


def verdict(fig: dict) -> str:
    """'met', 'missed by X%' (shortfall relative to the target), or 'not measured: why'."""
    if fig.get("error") or fig.get("value") is None:
        return f"not measured: {fig.get('error') or 'no value'}"
    if fig.get("target") is None:
        return "no target set"
    v, t, op = float(fig["value"]), float(fig["target"]), fig["op"]
    if op == ">=":
        ok, short = v >= t, (t - v) / abs(t) if t else float("inf")
    elif op == "<=":
        ok, short = v <= t, (v - t) / abs(t) if t else float("inf")
    else:
        raise ValueError(f"op: expected '>=' or '<=', got {op!r}")
    return "met" if ok else f"missed by {short:.0%}"


def _table(columns: list[str], rows: list[list]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")   # noqa: E731
    out = [f"| {' | '.join(esc(c) for c in columns)} |", f"|{'---|' * len(columns)}"]
    out += [f"| {' | '.join(esc(c) for c in r)} |" for r in rows]
    return "\n".join(out)


def _target(fig: dict) -> str:
    if fig.get("target") is None:
        return "-"
    return f"{fig['op']} {fmt_value(float(fig['target']), fig['unit'])}"


def summary_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.get("error"):
            rows.append([r["title"], "-", "-", "-", f"failed: {r['error']}"])
            continue
        if not r.get("figures"):
            rows.append([r["title"], "-", "-", "-", r.get("note", "no figures")])
        for f in r.get("figures", []):
            value = "-" if f.get("value") is None else fmt_value(float(f["value"]), f["unit"])
            rows.append([r["title"], f["name"], f"{value} vs {f['baseline']}", _target(f), verdict(f)])
    return rows


def render_section(r: dict, stamp: str) -> str:
    """One benchmark's `## title` section, its marker first."""
    lines = [f"## {r['title']}", "", f"<!-- run_all: {r['benchmark']} {stamp} -->", ""]
    if r.get("error"):
        lines += [_table(["benchmark", "result"], [[r["benchmark"], f"failed: {r['error']}"]]), ""]
        return "\n".join(lines)
    if r.get("command"):
        lines += [f"`{r['command']}`" + (f": {r['setup']}" if r.get("setup") else ""), ""]
    if r.get("table"):
        lines += [_table(r["table"]["columns"], r["table"]["rows"]), ""]
    if r.get("markdown"):
        lines += [r["markdown"], ""]
    if r.get("note"):
        lines += [f"({r['note']})", ""]
    if r.get("figures"):
        rows = [[f["name"], "-" if f.get("value") is None else fmt_value(float(f["value"]), f["unit"]),
                 f["baseline"], _target(f), verdict(f)] for f in r["figures"]]
        lines += [_table(["figure", "value", "baseline", "target", "result"], rows), ""]
    return "\n".join(lines)


def split_sections(md: str) -> list[tuple[str, str]]:
    """(heading, body) of each `## ` section; text before the first is dropped (the header)."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"(?m)^## ", md)[1:]:
        heading, _, body = block.partition("\n")
        out.append((heading.strip(), body.strip("\n")))
    return out


def kept_summary_rows(kept: dict[str, str]) -> list[list[str]]:
    """Summary rows of sections kept from an earlier run (--only): each section's own figure table,
    the result marked with the run it comes from, so the summary always covers every benchmark."""
    rows = []
    for name in [n for n in BENCHMARKS if n in kept] + [n for n in kept if n not in BENCHMARKS]:
        section = kept[name]
        title = section.split("\n", 1)[0].removeprefix("## ").strip()
        m = MARKER.search(section)
        when = section[m.end():section.index("-->", m.end())].strip() if m else ""
        lines = section.splitlines()
        for i, line in enumerate(lines):
            if line.replace(" ", "") == "|figure|value|baseline|target|result|":
                for row in lines[i + 2:]:
                    if not row.startswith("|"):
                        break
                    cells = [c.strip() for c in row.strip().strip("|").split("|")]
                    if len(cells) == 5:
                        fig, value, baseline, target, result = cells
                        rows.append([title, fig, f"{value} vs {baseline}", target,
                                     f"{result} (run of {when})" if when else result])
    return rows


def render(results: list[dict], meta: dict, previous: str = "") -> str:
    """The whole BENCHMARKS.md. `meta`: machine, versions, command, date, commit. `previous`: the
    file it replaces; its hand-written sections go under "Earlier measurements", sections of
    benchmarks not run now stay as they were."""
    # The CPU model goes into each section's stamp: with --only, kept sections may come from another
    # machine than the header's (these CPUs differ 10x in bf16), and their summary rows must say so.
    stamp = f"{meta['date']} {meta['commit']} on {meta['machine'].split(',')[0]}"
    ran = {r["benchmark"] for r in results}
    kept_generated: dict[str, str] = {}
    earlier: list[str] = []
    for heading, body in split_sections(previous):
        m = MARKER.search(body)
        if m:
            if m.group(1) not in ran:
                kept_generated[m.group(1)] = f"## {heading}\n\n{body}\n"
        elif heading == EARLIER:
            earlier.append(body)
        elif heading != SUMMARY:
            # A hand-written section one level down; its own ### become ####.
            demoted = re.sub(r"(?m)^(#{3,}) ", r"#\1 ", body)
            earlier.append(f"### {heading}\n\n{demoted}")
    out = ["# Benchmarks", "",
           "Written by `benchmarks/run_all.py`; do not edit by hand (hand-written notes go under "
           f"\"{EARLIER}\"). Every figure is a ratio measured side by side in the same run.", "",
           *(["**Smoke sizes (--quick): these figures test the machinery and measure nothing.**", ""]
             if meta.get("quick") else []),
           _table(["", ""], [["machine", meta["machine"]], ["versions", meta["versions"]],
                             ["command", f"`{meta['command']}`"], ["date", meta["date"]],
                             ["commit", meta["commit"]]]), "",
           f"## {SUMMARY}", "",
           _table(["benchmark", "figure", "value", "target", "result"],
                  summary_rows(results) + kept_summary_rows(kept_generated)), ""]
    by_name = {r["benchmark"]: r for r in results}
    order = list(BENCHMARKS) + [n for n in by_name if n not in BENCHMARKS]
    for name in order:
        if name in by_name:
            out.append(render_section(by_name[name], stamp))
        elif name in kept_generated:
            out.append(kept_generated[name])
    if earlier:
        out += [f"## {EARLIER}", "", "\n\n".join(earlier), ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    """The CPU's model name and whether it computes bf16 natively: two 2-core "AMD EPYC" machines
    of this project differ there, and with it every bf16 figure (emulated bf16 is 10x slower)."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sys.path.insert(0, str(ROOT))
        from models.precision import native_bf16
        return f"{name} ({'native bf16' if native_bf16('cpu') else 'no native bf16'})"
    except ImportError:   # no torch in this interpreter: the name alone
        return name


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + (" with uncommitted changes" if dirty else "")


def machine_meta(argv: list[str]) -> dict:
    ram = _ram_gib()
    gpu = "CUDA: " + ("yes" if _cuda_available() else "none")
    return {"machine": f"{_cpu_model()}, {os.cpu_count()} cores, "
                       + (f"{ram:.0f} GiB RAM" if ram else "RAM unknown") + f"; {gpu}",
            "versions": f"python {platform.python_version()}, torch {_version('torch')}, "
                        f"diffusers {_version('diffusers')}, ray {_version('ray')}",
            "command": " ".join(["python benchmarks/run_all.py", *argv]),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "commit": _commit()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every benchmark at smoke size (tests the machinery)")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only this one (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="the file to rewrite (default BENCHMARKS.md)")
    p.add_argument("--quickstart-run", metavar="DIR",
                   help="quickstart_stages: report this finished run's stage times instead of running it")
    p.add_argument("--timeout", type=float, help="seconds per benchmark (default: its own)")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    results = []
    for name in names:
        extra = (args.quickstart_run,) if name == "quickstart_stages" and args.quickstart_run else ()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_one(name, args.quick, extra, args.timeout))
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not stop the others
            results.append(failed(name, f"{type(e).__name__}: {e}"))
    out = Path(args.out)
    previous = out.read_text() if out.is_file() else ""
    out.write_text(render(results, {**machine_meta(argv), "quick": args.quick}, previous))
    for row in summary_rows(results):
        print(" | ".join(row))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
