"""`ldmflow`: run the pipeline, write datasets, check configs.

    ldmflow run CONFIG [section.key=value ...] [--address ADDR]
    ldmflow data [CONFIG] [section.key=value ...]        # only the data stage
    ldmflow validate CONFIG [section.key=value ...]      # print the resolved config

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
    data = sub.add_parser("data", help="write WebDataset shards only (the data stage)")
    data.add_argument("config", nargs="?", help="pipeline YAML (default: built-in defaults)")
    data.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.source=emoji")
    data.add_argument("--address")
    val = sub.add_parser("validate", help="load and print the resolved config")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipelines.config import ConfigError, load_config, to_dict
    from pipelines.run import OutputDirError, run_pipeline
    from pipelines.sample import PromptsError
    from pipelines.shards import ShardError

    # `ldmflow data key=value` (no config): the first positional is then an override.
    if args.cmd == "data" and args.config and "=" in args.config and not os.path.exists(args.config):
        args.overrides.insert(0, args.config)
        args.config = None
    bad_input = (ConfigError, OutputDirError, PromptsError, ShardError, FileNotFoundError)
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
        res = run_pipeline(cfg, args.address)
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


if __name__ == "__main__":
    sys.exit(main())
