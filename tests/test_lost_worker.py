"""A training worker process killed with SIGKILL mid-run: Ray Train's FailureConfig restarts the
worker group from the last checkpoint, the run completes, at most one checkpoint interval of steps
is redone, and the result is exactly what an uninterrupted run produces."""
import json
import os
import signal
import threading
import time
import uuid

import psutil
import pytest
import torch

from cluster.train import fit, run_checkpoints
from pipelines.train_diffusion import META, diffusion_worker
from tests.test_resume import _loop_cfg, _max_diff, _outcome, latents  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

STEPS, EVERY = 24, 4


def _fit(tmp, name, c, tag, max_failures):
    env = {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "LDMFLOW_TEST_TAG": tag}
    return fit(diffusion_worker, c, num_workers=2, use_gpu=False, storage_path=str(tmp), name=name,
               env=env, max_failures=max_failures)


def _tagged_workers(tag: str) -> list[psutil.Process]:
    """This run's training worker processes: they alone carry our tag in their environment (other
    tests' and other sessions' Ray workers on this machine must not be touched)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.environ().get("LDMFLOW_TEST_TAG") == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_sigkilled_worker_costs_at_most_one_checkpoint_interval(ray_local, latents, tmp_path):  # noqa: F811
    c = _loop_cfg(latents, zero_stage=2, max_steps=STEPS, checkpoint_every=EVERY, grad_accum=1)
    tag = uuid.uuid4().hex
    killed: dict = {}

    def killer():
        # Wait for the first persisted checkpoint, then SIGKILL one worker of the group.
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            ckpts = [d for d in run_checkpoints(str(tmp_path), "killed") if os.path.isfile(os.path.join(d, META))]
            workers = _tagged_workers(tag)
            if ckpts and workers:
                killed["last_checkpoint_step"] = max(json.load(open(os.path.join(d, META)))["step"] for d in ckpts)
                # A checkpoint counts once Ray Train's controller has registered the report, a moment
                # after the files are persisted; kill a few seconds (several steps) later, mid-interval.
                time.sleep(3.0)
                workers = _tagged_workers(tag)
                killed["pid"] = workers[-1].pid
                os.kill(workers[-1].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = _fit(tmp_path, "killed", c, tag, max_failures=1)
    t.join(timeout=5)
    assert killed, "the run finished before a worker could be killed"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE

    m = res.metrics
    assert m["step"] == STEPS
    # The restarted group began at a checkpoint no older than the last one seen before the kill:
    # the steps redone are those since that checkpoint, fewer than one interval.
    resumed = m["resumed_from_step"]
    assert resumed >= killed["last_checkpoint_step"] > 0
    assert resumed % EVERY == 0 and resumed < STEPS

    # And resuming was exact: the same weights and loss curve as a run never interrupted.
    ref = _outcome(_fit(tmp_path, "uninterrupted", c, uuid.uuid4().hex, max_failures=0))
    out = _outcome(res)
    assert _max_diff(out["unet"], ref["unet"]) == 0.0
    assert _max_diff(out["ema"], ref["ema"]) == 0.0
    assert torch.equal(torch.as_tensor(out["losses"]), torch.as_tensor(ref["losses"]))
