"""The embedded Ray a pipeline run starts (cluster.runtime.ray_session)."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A Ray Train run inside ray_session, in a fresh process (the test session's own Ray would be reused).
_TRAIN_IN_SESSION = textwrap.dedent("""
    import sys
    from cluster.runtime import ray_session, worker_env

    def train_fn(config):
        import os
        import time
        import ray.train
        time.sleep(config["seconds"])
        rank = ray.train.get_context().get_world_rank()
        open(os.path.join(config["out"], f"rank{rank}"), "w").write("slept")

    with ray_session(None, 2, worker_env()):
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        result = TorchTrainer(train_fn, train_loop_config={"seconds": 6.0, "out": sys.argv[1]},
                              scaling_config=ScalingConfig(num_workers=2),
                              run_config=RunConfig(storage_path=sys.argv[1], name="quiet")).fit()
        assert result.error is None, result.error
""")


def test_local_ray_train_does_not_flood_stderr(tmp_path):
    """Without a dashboard, Ray Train's PlacementGroupCleaner warned once a second that the State API
    is unavailable (842 of 941 stderr lines of a quickstart); the embedded Ray quiets it, and the
    training run still reports through the driver."""
    proc = subprocess.run([sys.executable, "-c", _TRAIN_IN_SESSION, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0", "rank1"]
    assert "Failed to query Ray Train Controller actor state" not in proc.stderr
    # Worker output still reaches the driver (log_to_driver stays on): Ray Train's own lines show.
    assert "Started training worker group of size 2" in proc.stderr
