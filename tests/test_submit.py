"""`ldmflow submit|status|logs|stop` against a real two-node Ray cluster with token auth, logging to
an `mlflow server` on loopback. Slow: a cluster and a server start per module."""
from pathlib import Path

import pytest
import requests

from pipelines.cli import main
from tests.cluster_fixtures import mlflow_server, ray_cluster
from tests.conftest import tiny_overrides

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ray_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture()
def no_ambient_token(monkeypatch, tmp_path):
    """No token from the environment or ~/.ray: only what a test passes counts."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_missing_wrong_token_and_unknown_job_are_clear_errors(cluster, no_ambient_token, capsys):
    assert main(["status", "some-job", "--address", cluster.dashboard]) == 2
    assert "requires a Ray auth token and none was sent" in capsys.readouterr().err
    assert main(["status", "some-job", "--address", cluster.dashboard, "--token", "wrong"]) == 2
    assert "rejected the auth token" in capsys.readouterr().err
    assert main(["status", "no-such-job", "--address", cluster.dashboard, "--token", cluster.token]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err
    assert main(["stop", "no-such-job", "--address", cluster.dashboard, "--token", cluster.token]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err
    # a relative output_dir cannot be seen by the cluster's nodes or a later resubmission
    assert main(["submit", str(QUICKSTART), "output_dir=runs/x", "--address", cluster.dashboard,
                 "--token", cluster.token]) == 2
    assert "output_dir: a submitted pipeline needs storage" in capsys.readouterr().err


def test_pipeline_runs_across_both_nodes_and_logs_to_the_server(cluster, tmp_path, no_ambient_token, capsys):
    from mlflow.tracking import MlflowClient
    from pipelines.tracking import TAG

    out = tmp_path / "run"
    args = ["submit", str(QUICKSTART), *tiny_overrides(out), "--address", cluster.dashboard,
            "--token", cluster.token, "--wait"]
    with mlflow_server(tmp_path) as uri:
        rc = main([*args, "--tracking-uri", uri, "--submission-id", "tiny-1"])
        cap = capsys.readouterr()
        assert rc == 0, f"job output (tail):\n{cap.out[-6000:]}\nstderr (tail):\n{cap.err[-3000:]}"
        log = cap.out
        assert "job tiny-1: SUCCEEDED" in log

        # Ray Train workers of the training stages ran on both nodes.
        r = requests.get(f"{cluster.dashboard}/api/v0/actors", params={"detail": "1", "limit": "10000"},
                         headers=cluster.headers(), timeout=30)
        actors = r.json()["data"]["result"]["result"]
        train_nodes = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
        assert train_nodes == {n["node_id"] for n in cluster.alive_nodes()}

        # Everything went to the server the user reads, artifacts proxied through it.
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id])
        stages = {r.data.tags.get(TAG["stage"]) for r in runs}
        assert {"data", "autoencoder", "clip", "cache", "diffusion", "sample"} <= stages
        diff = next(r for r in runs if r.data.tags.get(TAG["stage"]) == "diffusion")
        assert diff.info.artifact_uri.startswith("mlflow-artifacts:")
        names = {Path(f.path).name for f in client.list_artifacts(diff.info.run_id, "diffusion")}
        assert {"unet", "schedule.json"} <= names
        assert (tmp_path / "mlflow-server" / "artifacts").is_dir()
        assert client.get_model_version_by_alias("ldmflow-unet", "tiny").run_id == diff.info.run_id

        # Resubmitting the same pipeline reuses every finished stage.
        assert main([*args, "--tracking-uri", uri, "--submission-id", "tiny-2"]) == 0
        log = capsys.readouterr().out
        for stage in ("data", "autoencoder", "clip", "cache", "diffusion", "samples"):
            assert f"{stage}: up to date" in log, (stage, log[-3000:])

    # status and logs of a finished job
    assert main(["status", "tiny-1", "--address", cluster.dashboard, "--token", cluster.token]) == 0
    assert '"status": "SUCCEEDED"' in capsys.readouterr().out
    assert main(["logs", "tiny-1", "--address", cluster.dashboard, "--token", cluster.token]) == 0
    assert "samples:" in capsys.readouterr().out
