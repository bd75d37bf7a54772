"""The pure parts of benchmarks/: target wording, BENCHMARKS.md rendering (failed rows, earlier
sections kept), the one command's flow on fake benchmark scripts, and the quickstart stage
attribution on canned stderr. No timings are measured here."""
import json
import sys
import textwrap

import pytest

from benchmarks import quickstart_stages as qs
from benchmarks import run_all

META = {"machine": "Test CPU, 2 cores, 8 GiB RAM; CUDA: none", "versions": "python 3.11, torch x, diffusers y, ray z",
        "command": "python benchmarks/run_all.py --out B.md", "date": "2026-11-22 10:00", "commit": "abc1234"}


def _result(name="latent_cache", value=4.2, target=3.0, op=">=", unit="x"):
    return {"benchmark": name, "title": run_all.BENCHMARKS[name].title, "command": f"python benchmarks/{name}.py",
            "setup": "tiny", "table": {"columns": ["way", "images/s"], "rows": [["a", "1.0"], ["b", "4.2"]]},
            "figures": [{"name": "b / a", "value": value, "unit": unit, "baseline": "a", "op": op,
                         "target": target}]}


# ----------------------------------------------------------------------------------------------
# target wording


@pytest.mark.parametrize("value,op,target,want", [
    (4.2, ">=", 3.0, "met"),
    (3.0, ">=", 3.0, "met"),                 # the target itself meets it
    (2.4, ">=", 3.0, "missed by 20%"),       # (3 - 2.4) / 3
    (9.0, "<=", 10.0, "met"),
    (12.0, "<=", 10.0, "missed by 20%"),     # (12 - 10) / 10
    (45.0, ">=", 90.0, "missed by 50%"),
])
def test_verdict_met_and_missed(value, op, target, want):
    assert run_all.verdict({"value": value, "op": op, "target": target, "unit": "x"}) == want


def test_verdict_without_value_and_bad_op():
    assert run_all.verdict({"value": None, "op": ">=", "target": 1}) == "not measured: no value"
    assert run_all.verdict({"value": 1.0, "op": ">=", "target": 1, "error": "pipeline exited 1"}) == \
        "not measured: pipeline exited 1"
    with pytest.raises(ValueError, match="^op: expected"):
        run_all.verdict({"value": 1.0, "op": ">", "target": 1})


def test_fmt_value_per_unit():
    assert run_all.fmt_value(4.234, "x") == "4.23x"
    assert run_all.fmt_value(11.25, "%") == "11.2%"
    assert run_all.fmt_value(7.46, " min") == "7.46 min"


# ----------------------------------------------------------------------------------------------
# rendering


PREVIOUS = textwrap.dedent("""\
    # Benchmarks

    Some intro that the generated header replaces.

    ## Training input: in memory vs streamed

    | loader | samples/s |
    |---|---|
    | latents, in memory | 386,873 |

    ### a detail

    kept too

    ## Quickstart stage times

    | stage | time |
    |---|---|
    | data | 14 s |
    """)


def test_render_failed_row_header_and_earlier_sections():
    results = [run_all.failed("unet_speed", "needs a CUDA device; this machine has none"),
               _result("latent_cache", 2.4),
               _result("generation_scaling", 12.0, 10.0, "<=", "%")]
    md = run_all.render(results, META, PREVIOUS)
    assert md.startswith("# Benchmarks\n")
    for v in META.values():
        assert v in md
    assert "Some intro" not in md
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "| U-Net train step and sampling vs diffusers | - | - | - | failed: needs a CUDA device; " \
           "this machine has none |" in summary
    assert "| b / a | 2.40x vs a | >= 3.00x | missed by 20% |" in summary
    assert "| b / a | 12.0% vs a | <= 10.0% | missed by 20% |" in summary
    # One section per benchmark in registry order, each marked; the failed one says why.
    heads = [h for h, _ in run_all.split_sections(md)]
    assert heads == ["Summary", run_all.BENCHMARKS["unet_speed"].title, run_all.BENCHMARKS["latent_cache"].title,
                     run_all.BENCHMARKS["generation_scaling"].title, "Earlier measurements"]
    sections = dict(run_all.split_sections(md))
    assert "<!-- run_all: unet_speed 2026-11-22 10:00 abc1234 on Test CPU -->" in sections[heads[1]]
    assert "| unet_speed | failed: needs a CUDA device; this machine has none |" in sections[heads[1]]
    assert "| way | images/s |" in sections[heads[2]] and "| a | 1.0 |" in sections[heads[2]]
    # Hand-written sections one level down, verbatim otherwise.
    earlier = sections["Earlier measurements"]
    assert "### Training input: in memory vs streamed" in earlier
    assert "#### a detail\n\nkept too" in earlier
    assert "### Quickstart stage times" in earlier and "| data | 14 s |" in earlier


def test_render_again_keeps_earlier_once_and_other_benchmarks_with_only():
    first = run_all.render([_result("latent_cache", 4.0), _result("generation_scaling", 5.0, 10.0, "<=", "%")],
                           META, PREVIOUS)
    meta2 = {**META, "date": "2026-11-23 09:00", "commit": "def5678", "machine": "Other CPU, 2 cores; CUDA: none"}
    second = run_all.render([_result("latent_cache", 3.5)], meta2, first)   # as --only latent_cache
    sections = dict(run_all.split_sections(second))
    gen = sections[run_all.BENCHMARKS["generation_scaling"].title]
    assert "<!-- run_all: generation_scaling 2026-11-22 10:00 abc1234 on Test CPU -->" in gen   # kept, with its stamp
    lat = sections[run_all.BENCHMARKS["latent_cache"].title]
    assert "2026-11-23 09:00 def5678 on Other CPU" in lat and "| b / a | 3.50x | a | >= 3.00x | met |" in lat
    assert second.count("## Earlier measurements") == 1
    assert second.count("### Training input: in memory vs streamed") == 1
    assert second.count("## Summary") == 1
    # the summary still covers the kept benchmark, marked with the run it comes from
    summary = sections["Summary"]
    assert "| b / a | 3.50x vs a | >= 3.00x | met |" in summary
    assert (f"| {run_all.BENCHMARKS['generation_scaling'].title} | b / a | 5.0% vs a | <= 10.0% | met "
            f"(run of 2026-11-22 10:00 abc1234 on Test CPU) |") in summary


def test_normalize_foreign_json_keeps_printed_table():
    out = "some text\n| model | ms |\n|---|---|\n| ours | 3.1 |\n"
    r = run_all.normalize("unet_speed", {"rows": [{"model": "ours", "ms": 3.1}]}, out)
    assert r["markdown"] == "| model | ms |\n|---|---|\n| ours | 3.1 |" and r["figures"] == []
    md = run_all.render([r], META)
    assert "| ours | 3.1 |" in md and "its JSON has no figures" in md


def test_unet_speed_json_becomes_figures_without_targets():
    v = lambda s: {"median_s": s}   # noqa: E731
    data = {"markdown": "Training step ...\n\n| variant | median s/step |\n|---|---|\n| ours | 0.1 |",
            "training": {"variants": {"diffusers fp32": v(0.30), "diffusers bf16": v(0.20),
                                      "ldmflow fp32": v(0.25), "ldmflow bf16": v(0.10)}},
            "sampling": {"samplers": {"ddim": {"variants": {"diffusers fp32": v(2.0), "ldmflow fp32": v(2.5)}},
                                      "dpmpp_2m": {"variants": {"ldmflow fp32": v(1.0)}}}}}   # no diffusers side
    r = run_all.normalize("unet_speed", data, "ignored stdout")
    assert r["markdown"].startswith("Training step ...")
    assert [(f["name"], round(f["value"], 3)) for f in r["figures"]] == [
        ("training step: speed, best ldmflow vs best diffusers", 2.0),      # 0.20 / 0.10
        ("sampling ddim: speed, best ldmflow vs best diffusers", 0.8)]      # 2.0 / 2.5
    assert run_all.verdict(r["figures"][0]) == "no target set"
    md = run_all.render([r], {**META, "quick": True})
    assert "| U-Net train step and sampling vs diffusers | training step: speed, best ldmflow vs best " \
           "diffusers | 2.00x vs best diffusers variant | - | no target set |" in md
    assert "Smoke sizes (--quick)" in md and "| ours | 0.1 |" in md


# ----------------------------------------------------------------------------------------------
# the one command, on fake benchmark scripts (no timing)


def _fake_registry(tmp_path, monkeypatch):
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent(f"""\
        import json, sys
        a = sys.argv[1:]
        res = {json.dumps(_result("latent_cache", 5.0))}
        res["setup"] = "quick" if "--quick" in a else "full"
        open(a[a.index("--json") + 1], "w").write(json.dumps(res))
        """))
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('loading', file=sys.stderr)\nraise SystemExit('boom: out of memory')\n")
    reg = {"unet_speed": run_all.Benchmark(str(tmp_path / "missing.py"), "U-Net speed"),
           "latent_cache": run_all.Benchmark(str(good), "Latent cache"),
           "generation_scaling": run_all.Benchmark(str(bad), "Generation"),
           "quickstart_stages": run_all.Benchmark(str(good), "Quickstart", needs_cuda=True)}
    monkeypatch.setattr(run_all, "BENCHMARKS", reg)
    monkeypatch.setattr(run_all, "_cuda_available", lambda: False)


def test_run_all_main_writes_every_row_and_goes_on_after_failures(tmp_path, monkeypatch, capsys):
    _fake_registry(tmp_path, monkeypatch)
    out = tmp_path / "B.md"
    out.write_text(PREVIOUS)
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    md = out.read_text()
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "missing.py does not exist (yet)" in summary
    assert "| Latent cache | b / a | 5.00x vs a | >= 3.00x | met |" in summary
    assert "failed: exit 1: loading / boom: out of memory" in summary
    assert "| Quickstart | - | - | - | failed: needs a CUDA device; this machine has none |" in summary
    assert ": quick" in md                                   # --quick reached the script
    assert "### Quickstart stage times" in md
    assert "--quick --out" in md                             # the exact command in the header


def test_run_all_only_runs_one(tmp_path, monkeypatch):
    _fake_registry(tmp_path, monkeypatch)
    out = tmp_path / "B.md"
    run_all.main(["--only", "latent_cache", "--out", str(out)])
    heads = [h for h, _ in run_all.split_sections(out.read_text())]
    assert heads == ["Summary", "Latent cache"]
    assert ": full" in out.read_text()


# ----------------------------------------------------------------------------------------------
# quickstart stage attribution


CANNED = textwrap.dedent("""\
    2026-11-22 10:00:01,000\tINFO worker.py:1 -- Started a local Ray instance.
    [ldmflow 10:00:02] data: no earlier output; running (key 1a2b3c4d)
    (_write_generated_shard pid=123) something on stderr
    [ldmflow 10:00:16] data: done in 14s (key 1a2b3c4d)
    [ldmflow 10:00:16] autoencoder: up to date (key 5e6f), reusing finished stage from /x/autoencoder
    [ldmflow 10:00:17] cache: config changed (cache.batch_size); running (key 77aa)
    generate:  50%|#####     | 16/32 [00:05<00:05,  3.0img/s]
    [ldmflow 10:00:50] cache: done in 33s (key 77aa)
    [ldmflow 10:00:51] samples: no earlier output; running (key 99bb)
    [ldmflow 10:00:52] model /x/bundle: scanning prompts p.txt
    [ldmflow 10:00:52] 32 prompts in 2 chunks; 0 committed before, 32 images to make -> /x/samples
    [ldmflow 10:01:03] samples: done in 12s (key 99bb)
    """)


def test_parse_line_kinds():
    assert qs.parse_line("[ldmflow 10:00:16] data: done in 14s (key 1a2b)\n") == \
        qs.StageEvent("10:00:16", "data", "done", 14.0)
    assert qs.parse_line("[ldmflow 10:00:02] data: forced (--force); running (key 1a2b)").kind == "running"
    assert qs.parse_line("[ldmflow 10:00:02] autoencoder: up to date (key 5e), reusing x").kind == "cached"
    assert qs.parse_line("[ldmflow 10:00:52] model /x: scanning prompts p.txt") is None
    assert qs.parse_line("[ldmflow 10:01:00] compare: table in /x/table.md (10:01:00)") is None
    assert qs.parse_line("data: done in 14s (key 1a2b)") is None


def test_stage_times_from_canned_stderr():
    c = qs.clock_from_text(CANNED)
    assert list(c.stages) == ["data", "autoencoder", "cache", "samples"]
    assert {k: (s.status, s.seconds) for k, s in c.stages.items()} == {
        "data": ("ran", 14.0), "autoencoder": ("cached", None), "cache": ("ran", 33.0), "samples": ("ran", 12.0)}
    res = qs.result(c, wall=None, command="cmd", setup="canned")
    rows = res["table"]["rows"]
    assert rows[0] == ["data", "ran", "14", "24%", "not measured"]      # 14 / (14 + 33 + 12)
    assert rows[-1][:3] == ["**total**", "exit 0", "59"]
    fig = res["figures"][0]
    assert fig["value"] == pytest.approx(59 / 60) and run_all.verdict(fig) == "met"


def test_memory_samples_charged_to_the_running_stage():
    c = qs.StageClock()
    lines = CANNED.splitlines()
    c.sample(100)                                   # Ray starting: before any stage
    for line in lines[:3]:
        c.feed(line)
    c.sample(500)
    c.sample(700)
    c.feed(lines[3])                                # data done
    c.sample(300)                                   # between stages
    for line in lines[4:6]:
        c.feed(line)
    c.sample(900)
    s = c.stages
    assert (s[qs.STARTUP].peak_rss, s["data"].peak_rss, s[qs.BETWEEN].peak_rss, s["cache"].peak_rss) == \
        (100, 700, 300, 900)
    assert s["data"].samples == 2 and s["autoencoder"].samples == 0
    res = qs.result(c, wall=1200.0, command="cmd", setup="live", rc=0)
    total = res["table"]["rows"][-1]
    assert total[2] == "1200" and total[4] == f"{900 / 2 ** 30:.2f}"
    assert run_all.verdict(res["figures"][0]) == "missed by 100%"   # 20 min vs <= 10


def test_failed_pipeline_run_is_not_a_figure():
    res = qs.result(qs.clock_from_text(CANNED), wall=30.0, command="cmd", setup="x", rc=1)
    assert res["table"]["rows"][-1][1] == "exit 1"
    assert run_all.verdict(res["figures"][0]).startswith("not measured: the pipeline exited 1")


def test_stage_times_from_run_dir_records(tmp_path):
    for stage, key, secs, fin in (("data", "k1", 14.2, "2026-11-22T10:00:16"),
                                  ("data", "k0", 99.0, "2026-11-21T10:00:00"),     # an older key: ignored
                                  ("diffusion", "k2", 469.0, "2026-11-22T10:09:00")):
        d = tmp_path / "stages" / stage
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.json").write_text(json.dumps({"stage": stage, "key": key, "seconds": secs, "finished": fin}))
    c = qs.clock_from_run_dir(tmp_path)
    assert [(k, s.seconds) for k, s in c.stages.items()] == [("data", 14.2), ("diffusion", 469.0)]
    with pytest.raises(FileNotFoundError, match="no stage records"):
        qs.clock_from_run_dir(tmp_path / "nothing")


def test_tree_rss_counts_children():
    import os
    import subprocess
    import time
    own = qs.tree_rss(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while qs.tree_rss(os.getpid()) < own + (60 << 20) and time.time() < deadline:
            time.sleep(0.2)
        assert qs.tree_rss(os.getpid()) >= own + (60 << 20)   # the child's 64 MiB counted
    finally:
        p.kill()
        p.wait()
    assert qs.tree_rss(p.pid) == 0                            # gone: no error


def test_unet_speed_figures_judge_ldmflow_against_plain_diffusers_and_show_compiled_diffusers():
    from benchmarks import unet_speed
    v = lambda s: {"median_s": s}   # noqa: E731
    res = {"training": {"variants": {"diffusers fp32": v(0.9), "diffusers bf16 autocast": v(1.0),
                                     "diffusers bf16 autocast + fused Adam": v(0.8),
                                     "ldmflow bf16 autocast + fused Adam": v(0.6)}},
           "sampling": {"samplers": {"ddim": {"variants": {
               "diffusers bf16 weights": v(4.0), "diffusers bf16 weights + torch.compile": v(2.5),
               "ldmflow bf16 weights": v(4.1), "ldmflow bf16 weights + torch.compile": v(2.0)}}}}}
    figs = unet_speed.figures(res)
    got = [(f["name"], round(f["value"], 2), f["target"]) for f in figs]
    assert got == [
        # judged against diffusers with its scripts' optimizer; diffusers given the fused Adam is shown
        ("training step: ldmflow bf16 autocast + fused Adam vs diffusers fp32", 1.5, 1.5),
        ("training step: ldmflow bf16 autocast + fused Adam vs diffusers bf16 autocast + fused Adam", 1.33, None),
        ("sampling ddim: ldmflow bf16 weights + torch.compile vs diffusers bf16 weights", 2.0, 1.5),
        ("sampling ddim: ldmflow bf16 weights + torch.compile vs diffusers bf16 weights + torch.compile", 1.25, None)]
    assert [run_all.verdict(f) for f in figs] == ["met", "no target set", "met", "no target set"]
    # run_all takes a JSON with figures as it is (the section title from the registry)
    r = run_all.normalize("unet_speed", {"figures": figs, "markdown": "| t |\n|---|", "command": "python x"})
    assert r["title"] == run_all.BENCHMARKS["unet_speed"].title and r["figures"] == figs


def test_precision_benchmark_quick_names_auto_s_pick():
    from benchmarks import precision
    from models.precision import resolve_precision
    r = precision.run(quick=True)
    assert [row[0] for row in r["table"]["rows"]] == ["autoencoder", "U-Net"]
    assert all(row[5] == resolve_precision("auto", "cpu") for row in r["table"]["rows"])
    fig = r["figures"][0]
    assert 0 < fig["value"] <= 1.0 and fig["op"] == ">=" and fig["target"] == precision.TARGET
    assert "precision" in run_all.BENCHMARKS


@pytest.mark.slow   # ~1-3 min: builds both nets, counts FLOPs, times an emulated-bf16 matmul
def test_unet_speed_without_native_bf16_compares_fp32_only(tmp_path):
    """--bf16 off (auto's choice on a CPU without AMX/avx512_bf16): no bf16 variant is timed, the
    profiles are fp32, and the report says why."""
    from benchmarks import unet_speed
    res = unet_speed.main(["--quick", "--no-sampling", "--bf16", "off", "--threads", "1",
                           "--json", str(tmp_path / "u.json")])
    assert list(res["training"]["variants"]) == [
        "diffusers fp32", "diffusers fp32 + fused Adam", "ldmflow fp32 (torch default Adam)",
        "ldmflow fp32 + fused Adam", "ldmflow fp32 + channels_last + fused Adam"]
    assert list(res["profiles"]) == ["training step, fp32", "sampling forward (2B), fp32"]
    assert "No bf16 variants: this CPU has no native bf16" in res["markdown"]
    assert res["figures"][0]["name"].startswith("training step: ldmflow fp32")
    assert res["figures"][0]["name"].endswith("vs diffusers fp32")   # the baseline keeps its default Adam
    assert json.loads((tmp_path / "u.json").read_text())["env"]["bf16"] is False


def test_two_plain_processes_report_a_combined_rate(tmp_path):
    """generation_scaling's no-Ray ceiling: two spawned processes, each its half of the prompts,
    timed from the first start to the last end."""
    from benchmarks import generation_scaling as gs
    bundle = gs.make_bundle(tmp_path, gs.SIZES["tiny"])
    texts = gs.prompts(4)
    rate = gs.plain_parallel_rate(bundle, texts, batch_size=2, procs=2)
    one = gs.plain_rate(bundle, texts, 2)
    assert 0 < rate < 20 * one   # a rate of the same order as one process's, not a wall-clock artefact


def test_split_training_golden():
    # run 100.0 s -> 400.0 s; loss logged at steps 50 and 1000, 0.3 s per step in between
    s = qs.split_training("autoencoder", 100_000, 400_000, [(1000, 380_000), (50, 95_000)])
    assert s.steps == 1000 and s.step_s == pytest.approx(0.3)
    # step 1 began at 95 - 50 x 0.3 = 80 s: before the run's start is clamped to no start-up
    assert s.startup_s == 0.0
    s = qs.split_training("diffusion", 0, 700_000, [(50, 30_000), (100, 40_000), (2200, 460_000)])
    assert s.step_s == pytest.approx(0.2)
    assert (s.startup_s, s.steps_s, s.end_s) == (pytest.approx(20.0), pytest.approx(440.0), pytest.approx(240.0))
    assert qs.split_training("x", 0, 10, [(5, 1)]) is None            # one point: no rate
    assert qs.split_training("x", 0, 10, [(5, 1), (5, 2)]) is None


def test_breakdown_says_how_much_faster_the_steps_must_be():
    splits = [qs.TrainingSplit("autoencoder", 1000, 0.2, 25.0, 200.0, 25.0),
              qs.TrainingSplit("diffusion", 2200, 0.15, 20.0, 330.0, 4.0)]
    table, note = qs.breakdown(splits, total_s=700.0, target_s=600.0)
    assert "| autoencoder | 25 | 1000 x 200 ms = 200 | 25 |" in table
    assert "| diffusion | 20 | 2200 x 150 ms = 330 | 4 |" in table
    # steps 530 s, the rest 170 s: 530 / (600 - 170) = 1.23x
    assert "training steps 530 s of 700 s (76%)" in note and "1.23x faster" in note
    assert "within the 600 s target" in qs.breakdown(splits, total_s=590.0, target_s=600.0)[1]
    assert "already exceeds" in qs.breakdown(splits, total_s=1300.0, target_s=600.0)[1]


def test_training_splits_read_the_newest_pipeline_run(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("quickstart")

    def pipeline(t0):
        parent = client.create_run(exp, run_name="quickstart", start_time=t0).info.run_id
        ids = {}
        for name, start in (("data", t0), ("autoencoder", t0 + 20_000)):
            run = client.create_run(exp, run_name=name, start_time=start, tags={"mlflow.parentRunId": parent})
            ids[name] = run.info.run_id
        client.log_metric(ids["data"], "data/images", 128, timestamp=t0 + 1000, step=0)   # no train/ metric
        client.set_terminated(ids["data"], end_time=t0 + 19_000)
        ae = ids["autoencoder"]
        for step, ts in ((25, t0 + 50_000), (50, t0 + 55_000), (100, t0 + 65_000)):
            client.log_metric(ae, "train/total_loss", 0.1, timestamp=ts, step=step)
            client.log_metric(ae, "train/lr", 1e-3, timestamp=ts, step=step)
        client.set_terminated(ae, end_time=t0 + 90_000)
        client.set_terminated(parent, end_time=t0 + 91_000)

    pipeline(1_000_000)
    pipeline(2_000_000)   # the newer pipeline run is the one read (identical shape, other times)
    splits = qs.training_splits(uri)
    assert [s.stage for s in splits] == ["autoencoder"]
    s = splits[0]
    # 0.2 s per step; step 1 began at 50 - 25 x 0.2 = 45 s after t0, 25 s after the stage started
    assert (s.steps, s.step_s, s.startup_s, s.steps_s, s.end_s) == (
        100, pytest.approx(0.2), pytest.approx(25.0), pytest.approx(20.0), pytest.approx(25.0))
    assert qs._splits_of(tmp_path / "absent") == []


def test_training_compile_repay_steps():
    from benchmarks.training_compile import repay_steps
    assert repay_steps(100.0, 0.120, 0.100) == pytest.approx(5000)   # 100 s / 20 ms saved a step
    assert repay_steps(100.0, 0.100, 0.100) is None and repay_steps(5.0, 0.1, 0.2) is None


@pytest.mark.slow
def test_training_compile_quick_compares_eager_and_compiled_steps():
    from benchmarks.training_compile import run
    res = run(quick=True)
    eager, compiled = res["table"]["rows"]
    assert eager[0] == "eager" and compiled[0].startswith("torch.compile")
    fig = res["figures"][0]
    assert fig["value"] > 0 and run_all.verdict(fig) == "no target set"
    a, b = res["raw"]["losses"]
    assert abs(a - b) < 1e-5      # the same first step, eager and compiled
    assert res["raw"]["compile_s"] > 0


def test_stable_diffusion_flops_golden():
    """SD 1.5's parts counted on the meta device (latent_cache's note): golden GFLOP, and the bound
    they give the cache, (step + encoders) / step, well under the 3x target."""
    from benchmarks.latent_cache import stable_diffusion_flops
    sd = stable_diffusion_flops()
    assert sd == {"encoder": pytest.approx(1116.66, rel=1e-4), "text": pytest.approx(13.30, rel=1e-3),
                  "step": pytest.approx(2406.77, rel=1e-4)}
    assert (sd["step"] + sd["encoder"] + sd["text"]) / sd["step"] == pytest.approx(1.469, abs=1e-3)


def test_latent_cache_quick_reports_both_bounds():
    from benchmarks.latent_cache import run
    res = run(quick=True)
    names = [f["name"] for f in res["figures"]]
    assert names == ["training images/s, cached / on the fly", "bound from the parts, (step + encoding) / step",
                     "the same bound at Stable Diffusion 1.5's FLOPs"]
    assert all(f["value"] > 0 for f in res["figures"])
    assert "Stable Diffusion 1.5's proportions" in res["note"] and "1.47x" in res["note"]
