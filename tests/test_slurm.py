"""launch/slurm.sbatch against a real Slurm (one node, started by .ci/slurm.sh).

`make test` starts that cluster when it can (root); elsewhere these tests skip with the reason. Under
CI (CI=true, .ci/run) they fail instead: CI starts Slurm before the suite, so a missing cluster is a bug."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import ROOT, TINY_RUN, metrics, wait_for  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # sbatch, sinfo, scontrol: processes


def run(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def _unavailable(reason: str) -> None:
    """Fail under CI, else skip, naming why Slurm cannot be used and how to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: run .ci/slurm.sh (as root) before the tests")
    why = os.environ.get("JETMOE_SLURM_UNAVAILABLE") or reason
    pytest.skip(f"no Slurm cluster ({why}); `make test` as root starts one")


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        _unavailable("Slurm is not installed")
    try:
        states = run("sinfo", "-h", "-o", "%T").split()
    except subprocess.CalledProcessError as e:
        _unavailable(f"Slurm controller not reachable ({e.stderr.strip()})")
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        _unavailable(f"no usable Slurm node (states {states})")


def job_field(job: str, field: str) -> str:
    """A field of `scontrol show job` (kept for MinJobAge after the job ends; no accounting needed)."""
    for item in run("scontrol", "show", "job", job, "-o").split():
        if item.startswith(field + "="):
            return item.split("=", 1)[1]
    return ""


def job_finished(job: str) -> bool:
    return job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def submit(tmp_path: Path, *overrides: str, wait: bool) -> subprocess.Popen:
    env = dict(os.environ, NPROC_PER_NODE="3", RUNS_DIR=str(tmp_path), PYTHON=sys.executable)
    return subprocess.Popen(
        ["sbatch", *(["--wait"] if wait else []), "--parsable", f"--output={tmp_path}/slurm-%j.out",
         "--job-name=jetmoe-test", str(ROOT / "launch/slurm.sbatch"), "parallel=pp3", *TINY_RUN, *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_id(sbatch: subprocess.Popen) -> str:
    job = sbatch.stdout.readline().strip().split(";")[0]
    assert job.isdigit(), sbatch.stderr.read()
    return job


def test_ci_slurm_script_is_idempotent():
    """.ci/slurm.sh on a machine where Slurm is up only checks: same daemons, node still usable."""
    require_slurm()
    if os.geteuid() != 0:
        _unavailable(".ci/slurm.sh needs root")
    state = Path(os.environ.get("SLURM_CI_DIR", "/tmp/jetmoe-slurm"))
    pids = {f: (state / f).read_text() for f in ("slurmctld.pid", "slurmd.pid")}
    out = subprocess.run([str(ROOT / ".ci/slurm.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "up: node" in out.stdout
    assert pids == {f: (state / f).read_text() for f in pids}
    require_slurm()


@pytest.mark.slow
def test_sbatch_wait_runs_a_3_stage_pipeline_to_completion(tmp_path):
    """`NPROC_PER_NODE=3 sbatch --wait launch/slurm.sbatch parallel=pp3 ...`: 3 processes on this node,
    one pipeline of 3 stages, run directory keyed by the job id."""
    require_slurm()
    sbatch = submit(tmp_path, "train.max_steps=3", wait=True)
    job = job_id(sbatch)
    try:
        sbatch.wait(timeout=300)
    finally:
        if sbatch.poll() is None:
            subprocess.run(["scancel", job], timeout=30)
            sbatch.kill()
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert sbatch.returncode == 0, text[-4000:]
    assert "layout world=3 pp=3 dp=1" in text
    run_dir = tmp_path / f"slurm-{job}"
    assert sorted(metrics(run_dir)) == [1, 2, 3]
    assert (run_dir / "config.yaml").exists()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_job_resumes(tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@120 sends before the time limit) makes every
    rank checkpoint and stop; the script requeues the job, which restarts under the same id, resumes
    from that checkpoint in the same run directory and runs to the last step."""
    require_slurm()
    # enough steps (~0.15 s each here) that the signal, forwarded by Slurm, sbatch, srun and torchrun.sh,
    # lands before the last one: a run that already finished is not requeued (launch/reached_max_steps.py)
    max_steps = 80
    sbatch = submit(tmp_path, f"train.max_steps={max_steps}", wait=False)
    job = job_id(sbatch)
    sbatch.wait(timeout=30)
    run_dir, log = tmp_path / f"slurm-{job}", tmp_path / f"slurm-{job}.out"
    try:
        wait_for(lambda: metrics(run_dir), 240, "the first training step")
        run("scancel", "--batch", "--signal=USR1", job)
        # a requeued job may start again once its old credential expired (.ci/slurm.sh: 10 s)
        wait_for(lambda: job_field(job, "Restarts") == "1", 120, "the job to be requeued")
        wait_for(lambda: job_finished(job), 300, "the requeued job to finish", poll=1.0)
    finally:
        if not job_finished(job):
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-4000:]
    assert job_field(job, "ExitCode") == "0:0"
    assert f"job {job} (restart 1)" in text
    assert "SIGUSR1 received; stopping after step" in text
    stopped_at = int(text.split("SIGUSR1 received; stopping after step")[1].split()[0])
    assert 1 <= stopped_at < max_steps
    resumed = [line for line in text.splitlines() if line.startswith("checkpoint: resumed from")]
    assert len(resumed) == 1 and f"at step {stopped_at}" in resumed[0], text[-4000:]
    assert sorted(metrics(run_dir)) == list(range(1, max_steps + 1))


@pytest.mark.slow
def test_submitit_launcher_config_runs_a_job(tmp_path):
    """`python train/pretrain.py -m hydra/launcher=jetmoe_slurm ...` submits through submitit."""
    require_slurm()
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "train/pretrain.py", "-m", "hydra/launcher=jetmoe_slurm", "hydra.launcher.tasks_per_node=1",
         "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         f"hydra.sweep.dir={sweep}", "train.max_steps=1", *TINY_RUN],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert sorted(metrics(sweep / "0")) == [1]
    assert list(sweep.glob(".submitit/*/*_submission.sh"))  # it went through sbatch


def test_pretokenize_job_array_fills_one_shared_cache(tmp_path, tmp_path_factory):
    """launch/pretokenize.sbatch as a 2-task job array: each task takes its share of the input files into
    one cache, which the trainer then opens complete (it refuses an incomplete one, naming what is missing)."""
    from helpers.data_corpus import tokenizer_file
    from helpers.data_mixture import mixture_overrides

    require_slurm()
    overrides = mixture_overrides(tmp_path, tokenizer_file(tmp_path_factory))
    probe = [sys.executable, "train/pretrain.py", *overrides, "train.max_steps=1", "logging=quiet",
             f"hydra.run.dir={tmp_path / 'probe'}"]
    before = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert before.returncode != 0 and "pretokenize" in before.stderr  # nothing tokenized yet: named, refused
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["sbatch", "--wait", "--array=0-1", f"--output={tmp_path}/array-%A_%a.out",
                    str(ROOT / "launch/pretokenize.sbatch"), *overrides],
                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
    logs = sorted(tmp_path.glob("array-*.out"))
    assert len(logs) == 2, logs  # two tasks ran
    texts = [log.read_text() for log in logs]
    assert {i for i in (0, 1) for text in texts if f"task {i} of 2:" in text} == {0, 1}, [t[-500:] for t in texts]
    after = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
