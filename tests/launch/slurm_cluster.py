"""A real SLURM cluster on this machine for the tests: munged, slurmctld and one slurmd per node.

Everything lives in one temporary directory: a private munge key and socket (a system munged, if
any, is left alone), slurm.conf, state, spool and logs. Two nodes are two slurmd daemons
(`slurmd -N NAME`, each on its own port) named after two host names that resolve to this machine
(the short hostname and 'localhost'), so `scontrol show hostnames` gives addresses that work as
MASTER_ADDR. Each node offers 2 fake GPUs (gres backed by /dev/null and /dev/zero) so the sbatch
scripts' `--gpus-per-node` is honoured. Daemons are run as root in the foreground and stopped by PID.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
FAKE_GPU_FILES = ("/dev/null", "/dev/zero")


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root"
    return None


def local_host_names() -> list[str]:
    """Distinct names of this machine that resolve to one of its addresses (short hostname first)."""
    names = []
    for name in (socket.gethostname().split(".")[0], "localhost"):
        try:
            address = socket.gethostbyname(name)
        except OSError:
            continue
        if (address.startswith("127.") or address in _own_addresses()) and name not in names:
            names.append(name)
    return names


def _own_addresses() -> set[str]:
    try:
        return set(subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split())
    except (OSError, subprocess.SubprocessError):
        return set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Job:
    id: str
    state: str
    exit_code: str
    fields: dict[str, str]


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    two_node_failure: str | None = None
    """Why two slurmd could not run here, when they could not."""

    def require_nodes(self, count: int) -> None:
        import pytest

        if len(self.nodes) < count:
            pytest.skip(f"this cluster has {len(self.nodes)} node(s): {self.two_node_failure or 'only one local host name resolves'}")

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # --- start and stop -------------------------------------------------------------------
    def start(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket_path = munge_dir / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"])
        self._wait_for(lambda: socket_path.exists(), "munged to create its socket")
        self._write_conf(socket_path)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in self.nodes:
            (self.root / "spool" / name).mkdir(parents=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait_for(self._all_nodes_idle, f"nodes {', '.join(self.nodes)} to be idle in sinfo", timeout=60)

    def _write_conf(self, munge_socket: Path) -> None:
        cpus = os.cpu_count() or 1
        hostname = socket.gethostname().split(".")[0]
        (self.root / "state").mkdir()
        node_lines = [
            f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} "
            f"Gres=gpu:{len(FAKE_GPU_FILES)} State=UNKNOWN"
            for name in self.nodes
        ]
        conf = f"""
ClusterName=lmforge-test
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}/%n
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd-%n.pid'}
SlurmctldLogFile={self.root / 'slurmctld.log'}
SlurmdLogFile={self.root / 'slurmd-%n.log'}
{chr(10).join(node_lines)}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        self.conf.write_text(conf.lstrip())
        gres = "".join(f"NodeName={','.join(self.nodes)} Name=gpu File={f}\n" for f in FAKE_GPU_FILES)
        (self.root / "gres.conf").write_text(gres)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.processes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                               cwd=self.root, start_new_session=True))

    def _all_nodes_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env())
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(name) == "idle" for name in self.nodes)

    def _wait_for(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--partition=test"], env=self.env(), capture_output=True, timeout=30)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    # --- jobs ---------------------------------------------------------------------------------
    def submit(self, script: Path, args: list[str], options: list[str], cwd: Path, env: dict[str, str]) -> str:
        """sbatch OPTIONS SCRIPT ARGS from `cwd`; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd, env=self.env(env),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}\n{self.logs()}"
        return result.stdout.strip().split(";")[0]

    def submit_and_wait(self, script: Path, args: list[str], options: list[str], cwd: Path, env: dict[str, str],
                        timeout: float = 300) -> tuple[str, int]:
        """`sbatch --wait`: returns the job id and sbatch's exit code, which is the job's.

        sbatch polls the job at 2, 4, 8, ... s, so a job of 20 s is seen to end at 30 s: the
        training tests use `submit` and `wait` (0.5 s polls) instead.
        """
        result = subprocess.run(["sbatch", "--parsable", "--wait", *options, str(script), *args], cwd=cwd,
                                env=self.env(env), capture_output=True, text=True, timeout=timeout)
        return result.stdout.strip().split(";")[0], result.returncode

    def job(self, job_id: str) -> Job:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                                env=self.env(), timeout=30)
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return Job(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?"), fields)

    def wait(self, job_id: str, timeout: float = 300) -> Job:
        """Polls until the job ends (sbatch --wait polls at 2, 4, 8... s; this at 0.5 s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return job
            time.sleep(0.5)
        subprocess.run(["scancel", job_id], env=self.env(), timeout=30)
        raise AssertionError(f"job {job_id} still {self.job(job_id).state} after {timeout}s\n{self.logs()}")
