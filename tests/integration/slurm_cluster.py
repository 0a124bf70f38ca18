"""A real, single-host SLURM cluster on 127.0.0.1 for integration tests.

    with SlurmCluster() as cluster:          # or the `slurm_cluster` pytest fixture
        env = cluster.env()                  # os.environ + SLURM_CONF (+ PATH)
        subprocess.run(["sbatch", "--wait", "job.sbatch"], env=env, check=True)

What it starts (all files in one temp dir, daemons in the foreground, stopped by PID):
  munged    as the `munge` user, with its own key, socket, log, pid and seed files;
  slurmctld -D -f slurm.conf
  slurmd    -D -N NODE -f slurm.conf
The node is called NODE (default "qlnode", a name that need not resolve) with
NodeAddr=127.0.0.1; the controller is this host's short name (slurmctld insists) with
address 127.0.0.1. Every daemon and every client talks over loopback only. Jobs run as root (no cgroups, no accounting):
ProctrackType=proctrack/linuxproc, TaskPlugin=task/none.

Needs root (munged must run as the munge user and slurmd as root) and the Debian packages
slurm-wlm, slurmctld, slurmd, munge (`bash .ci/setup_system.sh`). `unavailable_reason()`
says why it cannot run, for pytest.skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/bin") if (p := Path(d) / name).exists()), None
    )


def unavailable_reason() -> str | None:
    """None when a local cluster can be started here, else why not."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}); "
                "run `sudo bash .ci/setup_system.sh` (Debian: slurm-wlm slurmctld slurmd munge)")
    if os.geteuid() != 0:
        return "a local SLURM needs root (munged runs as the munge user, slurmd as root)"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (the Debian munge package creates it)"
    return None


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return max(1024, int(line.split()[1]) // 1024 - 1024)
    except OSError:
        pass
    return 4096


class SlurmCluster:
    """Start munged + slurmctld + slurmd on 127.0.0.1; stop them by PID on exit."""

    def __init__(self, node: str = "qlnode", cpus: int | None = None, workdir: str | None = None,
                 start_timeout: float = 60.0):
        self.node = node
        self.cpus = cpus or os.cpu_count() or 1
        self.start_timeout = start_timeout
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="qlaunch-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port = _free_port()
        self.slurmd_port = _free_port()

    # ---- public -----------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", "")
        for d in ("/usr/sbin", "/sbin"):
            if d not in path.split(":"):
                path = f"{path}:{d}" if path else d
        env["PATH"] = path
        # The test process may itself run inside a SLURM job: don't let that leak in.
        for k in list(env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                del env[k]
        return env

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def logs(self) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.dir / "log" / name
            if p.exists():
                out.append(f"==== {name} ====\n" + p.read_text(errors="replace")[-6000:])
        return "\n".join(out)

    def start(self) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            self._write_files()
            self._start_munge()
            self._start_slurm()
            self._wait_node_idle()
        except BaseException:
            logs = self.logs()
            self.stop()
            if isinstance(logs, str) and logs:
                print(logs)
            raise
        return self

    def stop(self) -> None:
        """Stop daemons by PID in reverse start order: SIGTERM, then SIGKILL after 10 s."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                except ProcessLookupError:
                    pass
        self.procs.clear()
        if self._own_dir and not os.environ.get("QLAUNCH_KEEP_SLURM_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- setup ------------------------------------------------------------------
    def _write_files(self) -> None:
        import pwd

        munge_pw = pwd.getpwnam("munge")
        self.dir.chmod(0o755)  # munged (as munge) must traverse it
        for sub in ("state", "spool", "log", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o711)  # munged: socket dir must be executable by all, not writable
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (self.munge_dir, key):
            os.chown(p, munge_pw.pw_uid, munge_pw.pw_gid)
        (self.dir / "log").chmod(0o755)
        d = self.dir
        conf = f"""\
# Single-host SLURM for qlaunch integration tests. Loopback only.
ClusterName=qlaunch
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
MailProg=/bin/true
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf.write_text(conf)

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env(), start_new_session=True, **kw)
        log.close()
        self.procs[name] = proc
        return proc

    def _wait(self, what: str, ok, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    out = (self.dir / "log" / f"{name}.out").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{out}")
            if ok():
                return
            time.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what}")

    def _start_munge(self) -> None:
        m = self.munge_dir
        self._spawn("munged", [
            _which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
            f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
            "--num-threads=2",
        ], user="munge", group="munge")
        self._wait("munged socket", lambda: self.munge_socket.exists())
        # munge's own log lives in its private dir; link it where logs() looks.
        try:
            (self.dir / "log" / "munged.log").symlink_to(m / "munged.log")
        except OSError:
            pass

    def _start_slurm(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False, timeout=10).returncode == 0)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])

    def node_idle(self) -> bool:
        """The node runs nothing and has finished cleaning up after its last job."""
        r = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip().rstrip("*~#") == "idle"

    def _wait_node_idle(self) -> None:
        self._wait(f"node {self.node} idle", self.node_idle)


def wait_job(cluster: SlurmCluster, job_id: str, timeout: float = 600) -> str:
    """Wait until job_id leaves the queue; return its final state (from scontrol, kept MinJobAge s)."""
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        r = cluster.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=10)
        if r.returncode == 0:
            for field in r.stdout.split():
                if field.startswith("JobState="):
                    state = field.split("=", 1)[1]
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return state
        time.sleep(1)
    raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout:.0f} s\n{cluster.logs()}")
