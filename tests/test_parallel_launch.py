"""The launch scripts' --dry-run output: what each would run on a TPU pod, SLURM, Kubernetes and
locally (local.sh itself runs in tests/test_multihost.py)."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CMD = ["r1jax", "train", "configs/train/tiny_pretrain.yaml", "mesh.expert=4", "out_dir=gs://bucket/run 1"]


def run(*args, env=None):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def test_local_dry_run_prints_one_command_per_process():
    rc, out, _ = run(ROOT / "launch/local.sh", "--dry-run", "-n", "3", "--cpu-devices", "4", "--port", "4321", "--", *CMD)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[0] == "env" and words[-len(CMD):] == CMD
        assert {"R1JAX_COORDINATOR_ADDRESS=127.0.0.1:4321", "R1JAX_NUM_PROCESSES=3", f"R1JAX_PROCESS_ID={i}",
                "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"} <= set(words)


@pytest.mark.parametrize("args,match", [
    (["--dry-run"], "no command given"),
    (["-n", "0", "--", "true"], "-n must be a positive integer"),
    (["--bogus", "--", "true"], "unknown option --bogus"),
])
def test_local_usage_errors(args, match):
    rc, _, err = run(ROOT / "launch/local.sh", *args)
    assert rc == 2 and match in err


def test_local_stops_the_others_when_one_fails():
    rc, out, err = run(ROOT / "launch/local.sh", "-n", "2", "--", "bash", "-c",
                       'if [ "$R1JAX_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 20; echo late')
    assert rc == 3 and "stopping the others" in err and "late" not in out


def test_tpu_pod_dry_run_copies_installs_and_runs_on_all_workers():
    rc, out, _ = run(ROOT / "launch/tpu_pod.sh", "--dry-run", "--tpu", "my-v5p", "--zone", "us-east5-a",
                     "--project", "proj", "--", *CMD)
    assert rc == 0
    lines = [shlex.split(l) for l in out.strip().splitlines()]
    assert lines[0][0] == "tar" and lines[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    for words in lines[1:]:
        assert "--worker=all" in words and words[words.index("--zone") + 1] == "us-east5-a"
        assert words[words.index("--project") + 1] == "proj"
    install, start = lines[-2][-1], lines[-1][-1]
    assert "pip install" in install and "jax[tpu]" in install
    assert "R1JAX_DISTRIBUTED=auto" in start and shlex.split(start.split("&& ", 2)[-1]) == CMD


def test_tpu_pod_requires_its_flags():
    rc, _, err = run(ROOT / "launch/tpu_pod.sh", "--dry-run", "--zone", "z", "--", "true")
    assert rc == 2 and "--tpu NAME is required" in err


def test_slurm_dry_run_sets_the_coordinator_from_the_allocation():
    env = {"SLURM_JOB_NODELIST": "gpu-a01,gpu-a02", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}
    rc, out, _ = run("bash", ROOT / "launch/slurm_gpu.sbatch", "--dry-run", *CMD, env=env)
    assert rc == 0
    exports = dict(shlex.split(l)[1].split("=", 1) for l in out.splitlines() if l.startswith("export "))
    assert exports["R1JAX_COORDINATOR_ADDRESS"] == "gpu-a01:24242"
    assert exports["R1JAX_NUM_PROCESSES"] == "2" and exports["R1JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    srun = shlex.split(out.strip().splitlines()[-1])
    assert srun[0] == "srun" and srun[-len(CMD):] == CMD
    assert "R1JAX_PROCESS_ID=$SLURM_PROCID" in srun[srun.index("-c") + 1]
    sbatch = (ROOT / "launch/slurm_gpu.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch


@pytest.mark.parametrize("accel", ["tpu", "gpu"])
def test_k8s_dry_run_renders_a_jobset(accel):
    rc, out, _ = run(ROOT / "launch/k8s/submit.sh", "--dry-run", "--accelerator", accel, "--name", "r1",
                     "--image", "registry/r1jax:1", "--", *CMD)
    assert rc == 0 and out.rstrip().endswith("# kubectl apply -f -")
    doc = yaml.safe_load(out.split("\n---\n")[0])
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "r1"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry/r1jax:1"
    assert container["command"][:2] == ["bash", "-c"] and shlex.split(container["command"][2]) == CMD
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    if accel == "tpu":
        assert job["parallelism"] == job["completions"] == 64  # 4x8x8 chips / 4 per host
        assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x8x8"
        assert container["resources"]["limits"]["google.com/tpu"] == 4 and env["R1JAX_DISTRIBUTED"] == "auto"
    else:
        assert job["parallelism"] == 32 and job["completionMode"] == "Indexed"
        assert env["R1JAX_COORDINATOR_ADDRESS"] == "r1-workers-0-0.r1:12345" and env["R1JAX_NUM_PROCESSES"] == "32"
        assert "job-completion-index" in env["R1JAX_PROCESS_ID"]["fieldRef"]["fieldPath"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
