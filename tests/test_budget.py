"""CPU-second training budgets (cluster.train.CpuBudget): the autoencoder and diffusion workers stop
on every rank at the first step past `max_cpu_seconds`, keep the CPU used in their checkpoints (a
resumed finished run trains no further), and `ldmflow compare` gives the LDM's two training stages
one split of the baselines' budget."""
import json
import os
import time
from pathlib import Path

import pytest

from cluster.train import CpuBudget
from pipelines.config import ConfigError, load_config
from tests.test_autoencoder_stage import _fit as ae_fit, _loop_cfg as ae_cfg, shards  # noqa: F401 (fixture)
from tests.test_resume import _fit as diffusion_fit, _loop_cfg as diffusion_cfg, latents  # noqa: F401 (fixture)

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "quickstart.yaml"


def _burn(seconds: float) -> None:
    """Spend about `seconds` of this process's CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


# ----------------------------------------------------------------------------------------------
# no Ray

def test_budget_counts_cpu_and_stops_at_the_first_step_past_it():
    b = CpuBudget(0.05)
    steps = 0
    while not b.exhausted:
        with b.step():
            _burn(0.01)
        steps += 1
    assert 0.05 <= b.used < 0.05 + 0.01 + 0.01 and 4 <= steps <= 6   # ~10 ms a step, one past the limit
    assert b.wall >= b.used * 0.5
    free = CpuBudget(0.0, used=1e9)   # 0: counts, never stops
    with free.step():
        _burn(0.001)
    assert not free.exhausted and free.used > 1e9
    assert CpuBudget(1.0, used=1.0).exhausted   # a resumed finished run
    with pytest.raises(ValueError, match="max_cpu_seconds: expected >= 0"):
        CpuBudget(-1.0)


def test_planned_steps_is_the_rate_so_far_capped_by_max_steps():
    assert CpuBudget(0.0, used=5.0).planned_steps(50, 1000) == 1000      # no budget: max_steps
    assert CpuBudget(10.0).planned_steps(0, 1000) == 1000                # nothing measured yet
    assert CpuBudget(10.0, used=2.5).planned_steps(50, 10 ** 9) == 200   # 50 steps in 2.5 s of 10
    assert CpuBudget(10.0, used=2.5).planned_steps(50, 120) == 120       # max_steps still caps it
    assert CpuBudget(10.0, used=20.0).planned_steps(50, 10 ** 9) == 51   # overrun: never behind the step
    from models.lr import warmup_cosine
    # The cosine then reaches its floor where the budget runs out.
    b = CpuBudget(10.0, used=9.99)
    assert warmup_cosine(1000, 1e-3, 10, b.planned_steps(999, 10 ** 9)) < 1e-8


@pytest.mark.parametrize("override, message", [
    ("autoencoder.max_cpu_seconds=-1", r"^autoencoder.max_cpu_seconds: expected >= 0, got -1"),
    ("diffusion.max_cpu_seconds=-1", r"^diffusion.max_cpu_seconds: expected >= 0, got -1"),
    ("compare.ldm_autoencoder_share=1.0", r"^compare.ldm_autoencoder_share: expected in \(0, 1\), got 1.0"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override])


def test_compare_splits_the_budget_between_the_ldm_stages():
    from pipelines.compare import render_table, with_ldm_budget
    cfg = load_config(QUICKSTART, ["compare.budget_cpu_seconds=100", "compare.ldm_autoencoder_share=0.25"])
    b = with_ldm_budget(cfg)
    assert (b.autoencoder.max_cpu_seconds, b.diffusion.max_cpu_seconds) == (25.0, 75.0)
    assert b.autoencoder.max_steps == b.diffusion.max_steps == 10 ** 9   # the budget is the only limit
    assert b.autoencoder.model == cfg.autoencoder.model and b.diffusion.unet == cfg.diffusion.unet
    assert "for the LDM's autoencoder + U-Net together (25% / 75%" in render_table({}, b)
    own = load_config(QUICKSTART, ["compare.ldm_equal_budget=false"])
    assert with_ldm_budget(own) is own and "the LDM row runs its own step counts" in render_table({}, own)
    assert with_ldm_budget(load_config(QUICKSTART, ["compare.include_ldm=false"])).autoencoder.max_cpu_seconds == 0
    with pytest.raises(ConfigError, match=r"^clip.enabled: the clip stage has no CPU budget"):
        with_ldm_budget(load_config(QUICKSTART, ["clip.enabled=true"]))


# ----------------------------------------------------------------------------------------------
# the workers under Ray Train, 2 CPU ranks

def test_autoencoder_worker_stops_on_its_budget(ray_local, tmp_path, shards):  # noqa: F811
    from pipelines.train_autoencoder import META
    c = ae_cfg(shards, max_steps=10 ** 6, max_cpu_seconds=1.5, lr_schedule="cosine", warmup_steps=2)
    result = ae_fit(tmp_path, "ae-budget", c)
    m = result.metrics
    assert m["budget_exhausted"] == 1.0 and 1.5 <= m["train_cpu_seconds"]
    assert 1 <= m["step"] < 10 ** 6
    from models.precision import native_bf16
    assert m["bf16"] == float(native_bf16("cpu"))   # precision "auto" (the default) resolved on the worker
    with result.checkpoint.as_directory() as d:
        meta = json.loads(open(os.path.join(d, META)).read())
    assert meta["step"] == m["step"] and meta["cpu_seconds"] == pytest.approx(m["train_cpu_seconds"])


def test_diffusion_worker_stops_on_its_budget_and_a_resume_trains_no_further(ray_local, latents, tmp_path):  # noqa: F811
    from pipelines.train_diffusion import META, latest_checkpoint
    c = diffusion_cfg(latents, max_steps=10 ** 6, max_cpu_seconds=2.0, checkpoint_every=0, precision="auto",
                      lr_schedule="cosine", warmup_steps=1)
    m = diffusion_fit(tmp_path, "dm-budget", c).metrics
    assert m["budget_exhausted"] == 1.0 and m["train_cpu_seconds"] >= 2.0 and 1 <= m["step"] < 10 ** 6
    # The cosine decays over the steps the budget reaches, not over max_steps (where the last
    # rate would still be ~lr): by the last step it is near its end.
    assert m["step"] >= 4 and m["lr"] < 0.5 * c["lr"]
    from models.precision import native_bf16
    assert m["bf16"] == float(native_bf16("cpu"))   # precision "auto" (DiffusionConfig's default) resolved on the worker
    last = latest_checkpoint(str(tmp_path), "dm-budget")
    meta = json.loads(open(os.path.join(last, META)).read())
    assert meta["step"] == m["step"] and meta["budget_exhausted"] is True
    # Run again under the same name (a re-entered stage): it resumes from that final checkpoint and
    # takes no step, though max_steps is far away.
    again = diffusion_fit(tmp_path, "dm-budget", c)
    assert again.metrics["step"] == m["step"] and again.metrics["budget_exhausted"] == 1.0
    assert latest_checkpoint(str(tmp_path), "dm-budget") == last
