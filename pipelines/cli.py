"""`ldmflow`: run the pipeline, write datasets, check configs.

    ldmflow run CONFIG [section.key=value ...] [--address ADDR] [--force STAGE ...]
    ldmflow lineage TARGET [--graph out.png] [--output-dir DIR] [--tracking-uri URI]
    ldmflow promote NAME VERSION_OR_ALIAS --to ALIAS [--output-dir DIR] [--tracking-uri URI]
    ldmflow data [CONFIG] [section.key=value ...]        # only the data stage
    ldmflow validate CONFIG [section.key=value ...]      # print the resolved config
    ldmflow submit CONFIG [section.key=value ...] --address http://HEAD:8265 [--token T] [--wait]
    ldmflow status|logs|stop JOB_ID --address http://HEAD:8265 [--follow]

`submit` validates the config here, then ships it (resolved, with its prompts file) and the project
code to the cluster with the Ray Jobs API; the job runs `ldmflow run` against the cluster. The Ray
auth token comes from --token, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; the
address from --address or $RAY_ADDRESS.

Bad input (config, shards, prompts, font, output directory) exits with status 2 and one line that
names what is wrong; nothing already written is changed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _config_path(name: str | None) -> str | None:
    """A path, or the name of a packaged config (`quickstart`)."""
    if name is None or os.path.exists(name):
        return name
    packaged = resources.files("pipelines") / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    return str(packaged) if packaged.is_file() else name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmflow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("config", help="pipeline YAML, or a packaged name (quickstart)")
    run.add_argument("overrides", nargs="*", help="section.key=value")
    run.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="rerun this stage (and the stages after it) even if its cached output is up to "
                          "date; repeatable (data, autoencoder, clip, cache, diffusion, samples)")
    cmp_ = sub.add_parser("compare", help="train every baseline family and the LDM on the same data at one "
                                          "budget, evaluate them, write the comparison table")
    cmp_.add_argument("config", help="pipeline YAML, or a packaged name (compare_emoji)")
    cmp_.add_argument("overrides", nargs="*", help="section.key=value, e.g. compare.budget_cpu_seconds=300")
    cmp_.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    cmp_.add_argument("--force", action="append", default=[], metavar="STAGE",
                      help="rerun this stage even if cached (data, baseline-<family>, evaluate-<family>, "
                           "or a pipeline stage); repeatable")
    lin = sub.add_parser("lineage", help="the chain behind an image, run or model, back to data and code")
    lin.add_argument("target", help="an image file or id, an MLflow run id, or models:/NAME@ALIAS|/VERSION")
    lin.add_argument("--graph", metavar="PNG", help="also draw the chain to this PNG (logged to the target's run)")
    pro = sub.add_parser("promote", help="move a registered model's alias (e.g. candidate -> production)")
    pro.add_argument("name", help="registered model, e.g. ldmflow-unet")
    pro.add_argument("version", metavar="VERSION_OR_ALIAS", help="a version number or an alias it has now")
    pro.add_argument("--to", required=True, metavar="ALIAS", help="the alias to point at it")
    for q in (lin, pro):
        q.add_argument("--output-dir", help="an ldmflow run directory (its embedded MLflow; image ids)")
        q.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                       help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else --output-dir's)")
    data = sub.add_parser("data", help="write WebDataset shards only (the data stage)")
    data.add_argument("config", nargs="?", help="pipeline YAML (default: built-in defaults)")
    data.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=emoji")
    data.add_argument("--address")
    val = sub.add_parser("validate", help="load and print the resolved config")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    gen = sub.add_parser("generate", help="batch generation over a prompts file: resumable, exactly once")
    gen.add_argument("--model", required=True,
                     help="models:/NAME@ALIAS, models:/NAME/VERSION (a pipeline model), or a pipeline output dir")
    gen.add_argument("--prompts", required=True, help=".txt, .jsonl ({prompt, id?}) or .parquet; path or URL")
    gen.add_argument("--out", required=True, help="output directory or fsspec URL (re-run to resume)")
    gen.add_argument("--batch-size", type=int, default=16, help="images per sampler call (fixed per job)")
    gen.add_argument("--concurrency", type=int, default=1, help="sampler actors, each holding the model")
    gen.add_argument("--shard-size", type=int, default=1000, help="prompts per shard (the commit unit)")
    gen.add_argument("--sampler", help="default: the model's")
    gen.add_argument("--spacing", help="timestep spacing (default: the model's)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    gen.add_argument("--eta", type=float, help="ddim only")
    gen.add_argument("--resolution", type=int, help="output side in pixels (default: the autoencoder's)")
    gen.add_argument("--seed", type=int, help="global seed; an image's seed is a hash of (seed, prompt id)")
    gen.add_argument("--precision", choices=["fp32", "bf16"], help="the U-Net's weights (default: the model's)")
    gen.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the U-Net in each actor (minutes once; faster for long jobs)")
    gen.add_argument("--on-bad-line", choices=["skip", "stop"], default="skip",
                     help="malformed prompt lines: skip and report them (default), or stop before generating")
    gen.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                     help="MLflow registry and where the run is logged (default: $MLFLOW_TRACKING_URI)")
    gen.add_argument("--experiment", default="generate")
    gen.add_argument("--gpu", action="store_true", help="one GPU per sampler actor")
    gen.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    gen.add_argument("--no-progress", action="store_true")

    def cluster_args(q):
        q.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="Ray dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
        q.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN, ~/.ray/auth_token)")
    sm = sub.add_parser("submit", help="submit the pipeline to a Ray cluster (Ray Jobs API)")
    sm.add_argument("config")
    sm.add_argument("overrides", nargs="*")
    cluster_args(sm)
    sm.add_argument("--code", choices=["ship", "image"], default="ship",
                    help="ship this checkout's code with the job (default) or use the ldmflow installed "
                         "in the cluster's image")
    sm.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow server the job logs to (default: $MLFLOW_TRACKING_URI, else the config's)")
    sm.add_argument("--submission-id", help="a job id of your choosing (resubmitting a failed pipeline "
                                            "under a new id resumes it: finished stages are reused)")
    sm.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit 1 if it fails")
    for name, help_ in (("status", "a job's status"), ("logs", "a job's driver log"), ("stop", "stop a job")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("job_id")
        cluster_args(q)
        if name == "logs":
            q.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in ("submit", "status", "logs", "stop"):
        return _jobs_command(args)
    if args.cmd == "generate":
        return _generate_command(args)
    if args.cmd in ("lineage", "promote"):
        return _lineage_command(args)
    from cluster.train import ResumeMismatchError
    from pipelines.config import ConfigError, load_config, to_dict
    from pipelines.run import OutputDirError, run_pipeline
    from pipelines.sample import PromptsError
    from pipelines.shards import ShardError

    # `ldmflow data key=value` (no config): the first positional is then an override.
    if args.cmd == "data" and args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)
        args.config = None
    # ResumeMismatchError: the config disagrees with the checkpoint its run directory holds.
    bad_input = (ConfigError, OutputDirError, PromptsError, ShardError, FileNotFoundError, ResumeMismatchError)
    try:
        cfg = load_config(_config_path(args.config), args.overrides)
        if args.cmd == "validate":
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.cmd == "data":
            res = run_pipeline(cfg, args.address, data_only=True)
            print(f"train shards: {len(res.data.train_urls)} ({res.data.num_train} images), "
                  f"val shards: {len(res.data.val_urls)} ({res.data.num_val} images) in {res.output_dir}/data")
            print(f"dataset hash: {res.data.dataset_hash}")
            return 0
        if args.cmd == "compare":
            from pipelines.compare import COMPARE_DIR, compare
            rows = compare(cfg, args.address, force=tuple(args.force))
            table = os.path.join(cfg.output_dir, COMPARE_DIR, "table.md")
            with open(table) as f:
                print(f.read())
            failed = [n for n, r in rows.items() if r.get("error")]
            print(f"table: {table}" + (f"; failed: {', '.join(failed)}" if failed else ""))
            return 1 if failed else 0
        res = run_pipeline(cfg, args.address, force=args.force)
    except bad_input as e:
        print(f"ldmflow: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:   # Ray unreachable at --address / cluster.address
        print(f"ldmflow: error: cannot reach the Ray cluster: {e} (try --address auto on a cluster "
              f"node, or the head's address as `ray start` printed it)", file=sys.stderr)
        return 2
    s = res.samples
    print(f"\nsamples:  {s.num_images} images in {s.directory}/images (grid: {s.grid})")
    print(f"manifest: {s.manifest}")
    print(f"mlflow:   {res.tracker.uri} (pipeline run {res.pipeline_run_id})")
    print(f"open the MLflow UI with:\n  {res.tracker.ui_command()}")
    return 0


def _lineage_command(args) -> int:
    from pipelines.provenance import (LineageError, draw_chain, find_output_dir, format_chain, lineage_chain,
                                      promote)
    from pipelines.tracking import Tracker
    out = args.output_dir
    if out is None and args.cmd == "lineage" and os.path.exists(args.target):
        out = find_output_dir(args.target)   # an image inside a run dir: its own MLflow
    if out is not None and not os.path.isdir(out):
        print(f"ldmflow: error: --output-dir: not a directory: {out}", file=sys.stderr)
        return 2
    if not args.tracking_uri and out is None:
        print("ldmflow: error: --tracking-uri or --output-dir: say which MLflow to read", file=sys.stderr)
        return 2
    if not args.tracking_uri and not os.path.isfile(os.path.join(out, "mlflow.db")):
        print(f"ldmflow: error: --output-dir: {out} holds no embedded MLflow (mlflow.db); "
              f"pass --tracking-uri", file=sys.stderr)
        return 2
    tracker = Tracker.embedded(out or ".", args.tracking_uri, None, "ldmflow")
    try:
        if args.cmd == "promote":
            version, before = promote(tracker, args.name, args.version, args.to)
            print(f"{args.name}: alias {args.to} -> version {version}"
                  + (f" (was version {before})" if before and before != version else ""))
            return 0
        nodes = lineage_chain(tracker, args.target, out)
        print(format_chain(nodes))
        if args.graph:
            path = draw_chain(nodes, args.graph)
            run_id = next((n.run_id for n in nodes if n.run_id), None)
            if run_id:
                tracker.log_artifact(run_id, path, "lineage")
            print(f"graph: {path}" + (f" (logged to run {run_id} under lineage/)" if run_id else ""))
        return 0
    except LineageError as e:
        print(f"ldmflow: error: {e}", file=sys.stderr)
        return 2


def _generate_command(args) -> int:
    from cluster.runtime import ray_session, worker_env
    from pipelines.generate import GenerateConfig, GenerateError, generate, resolve_model
    try:
        cfg = GenerateConfig(model=args.model, prompts=args.prompts, out=args.out, batch_size=args.batch_size,
                             concurrency=args.concurrency, shard_size=args.shard_size, on_bad_line=args.on_bad_line,
                             sampler=args.sampler, spacing=args.spacing, steps=args.steps,
                             guidance_scale=args.guidance, eta=args.eta, resolution=args.resolution, seed=args.seed,
                             precision=args.precision, compile=args.compile, use_gpu=args.gpu, tracking_uri=args.tracking_uri, experiment=args.experiment,
                             progress=not args.no_progress)
        model = resolve_model(cfg.model, cfg.tracking_uri)   # a wrong --model fails before Ray starts
        with ray_session(args.address, None, worker_env()):
            res = generate(cfg, model)
    except (GenerateError, FileNotFoundError) as e:
        print(f"ldmflow: error: {e}", file=sys.stderr)
        return 2
    print(f"\ngenerated {res.num_generated} images now, {res.num_images} in all "
          f"({res.images_per_s:.2f} images/s, {res.seconds:.0f}s) in {res.out}")
    print(f"manifest: {res.manifest}")
    if res.num_bad_lines:
        print(f"bad lines skipped: {res.num_bad_lines} (listed in {res.out}/bad_lines.json)")
    if res.run_id:
        print(f"mlflow run: {res.run_id}")
    return 0


def _jobs_command(args) -> int:
    from cluster.jobs import JobsError, job_logs, job_status, stop_job
    from pipelines.config import ConfigError
    if not args.address:
        print("ldmflow: error: --address: the Ray dashboard address is required "
              "(http://HEAD:8265, or set RAY_ADDRESS)", file=sys.stderr)
        return 2
    try:
        if args.cmd == "submit":
            from pipelines.submit import submit_pipeline
            job_id = submit_pipeline(_config_path(args.config), args.overrides, args.address, token=args.token,
                                     code=args.code, tracking_uri=args.tracking_uri,
                                     submission_id=args.submission_id)
            print(f"submitted {job_id} to {args.address}")
            print(f"  ldmflow logs {job_id} --follow --address {args.address}")
            if not args.wait:
                return 0
            for chunk in job_logs(args.address, job_id, args.token, follow=True):
                print(chunk, end="", flush=True)
            st = job_status(args.address, job_id, args.token)
            print(f"\njob {job_id}: {st['status']}" + (f" ({st['message']})" if st["message"] else ""))
            return 0 if st["status"] == "SUCCEEDED" else 1
        if args.cmd == "status":
            print(json.dumps(job_status(args.address, args.job_id, args.token), indent=2, default=str))
        elif args.cmd == "logs":
            for chunk in job_logs(args.address, args.job_id, args.token, follow=args.follow):
                print(chunk, end="", flush=True)
        else:
            stop_job(args.address, args.job_id, args.token)
            print(f"stop requested for {args.job_id}")
        return 0
    except (JobsError, ConfigError, FileNotFoundError) as e:
        print(f"ldmflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
