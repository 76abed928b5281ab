"""A one-node SLURM cluster on this machine, for the tests of ``reproduce.py --launcher slurm``.

:class:`OneNodeCluster` writes a ``slurm.conf`` (and ``slurmdbd.conf``) for this machine into a
folder of its own, starts ``munged``, MariaDB, ``slurmdbd``, ``slurmctld`` and ``slurmd`` from
it (every daemon on ports and sockets of its own, so a cluster already running here is left
alone), and stops them again. The SLURM commands reach it through ``SLURM_CONF``
(:attr:`OneNodeCluster.env`). Accounting (``slurmdbd`` on MariaDB) is part of it because
``sacct``, which submitit and the study's driver read finished jobs' states from, needs it.

Jobs run as root (``SlurmUser=root``): processes are tracked by their parent
(``ProctrackType=proctrack/linuxproc``) and not confined (``TaskPlugin=task/none``), which works
without cgroups or systemd. A requeued job may start again after 5 s (``cred_expire``, 120 s by
default) and the scheduler looks at pending jobs every 2 s, so that requeues and dependencies
do not make the tests wait.

The packages (Debian's ``slurm-wlm``, ``slurmdbd``, ``munge``, ``mariadb-server``) are
installed by ``scripts/install_slurm.sh`` as root (``.ci/run`` does it); :func:`missing_programs`
says what is not installed.

    python tests/slurm_cluster.py start /tmp/cluster   # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop /tmp/cluster
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "squeue", "sacct", "sacctmgr", "scontrol",
            "scancel", "srun", "mariadbd", "mariadb-install-db", "mariadb")
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")  # stopped in this order
CLUSTER_NAME = "diatest"
PARTITION = "dia"


def missing_programs():
    """The programs the cluster needs that are not on PATH (``/usr/sbin`` included)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def free_ports(n):
    """``n`` TCP ports free on 127.0.0.1 now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_name():
    """The name slurmd finds for this machine (its short host name)."""
    return socket.gethostname().split(".")[0]


class OneNodeCluster:
    """A SLURM cluster of this machine alone, its files in ``folder``: a partition
    :data:`PARTITION` of one node with ``cpus`` CPUs and ``memory_mb`` MiB, as configured whatever
    the machine has (``SlurmdParameters=config_overrides``: tiny test jobs may share the cores).
    Without ``accounting`` there is no slurmdbd (``sacct`` cannot answer), as on the smallest
    clusters; slurmctld forgets an ended job ``min_job_age`` seconds after its end."""

    def __init__(self, folder, cpus=4, memory_mb=2048, accounting=True, min_job_age=300):
        self.folder = os.path.abspath(folder)
        self.cpus, self.accounting, self.min_job_age = cpus, accounting, min_job_age
        self.memory_mb = memory_mb
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.node = node_name()

    @property
    def env(self):
        """What the SLURM commands need in their environment to reach this cluster."""
        path = os.environ.get("PATH", "")
        for extra in ("/usr/sbin", "/sbin"):
            if extra not in path.split(os.pathsep):
                path += os.pathsep + extra
        return {"SLURM_CONF": self.conf, "PATH": path}

    def path(self, name):
        return os.path.join(self.folder, name)

    def write_config(self):
        ctld, slurmd, dbd, db = free_ports(4)
        self.db_port = db
        munge = self.path("munge.socket")
        os.makedirs(self.path("state"), exist_ok=True)
        os.makedirs(self.path("spool"), exist_ok=True)
        lines = [
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            f"SlurmdPort={slurmd}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge},cred_expire=5",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.path('state')}",
            f"SlurmdSpoolDir={self.path('spool')}",
            f"SlurmctldPidFile={self.path('slurmctld.pid')}",
            f"SlurmdPidFile={self.path('slurmd.pid')}",
            f"SlurmctldLogFile={self.path('slurmctld.log')}",
            f"SlurmdLogFile={self.path('slurmd.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            *([
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=127.0.0.1",
                f"AccountingStoragePort={dbd}",
                f"AccountingStoragePass={munge}",
            ] if self.accounting else ["AccountingStorageType=accounting_storage/none"]),
            "KillWait=5",
            f"MinJobAge={self.min_job_age}",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        dbd_lines = [
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={dbd}",
            "SlurmUser=root",
            f"LogFile={self.path('slurmdbd.log')}",
            f"PidFile={self.path('slurmdbd.pid')}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={db}",
            "StorageUser=root",
            "StorageLoc=slurm_acct_db",
        ]
        path = self.path("slurmdbd.conf")  # beside slurm.conf: slurmdbd finds it through SLURM_CONF
        with open(path, "w") as fh:
            fh.write("\n".join(dbd_lines) + "\n")
        os.chmod(path, 0o600)

    def _run(self, cmd, timeout=60):
        proc = subprocess.run(cmd, env=dict(os.environ, **self.env), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def _wait(self, what, ok, timeout=60):
        t0 = time.time()
        while True:
            try:
                if ok():
                    return
            except (OSError, RuntimeError, subprocess.SubprocessError):
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{what} did not come up within {timeout} s; see the logs in {self.folder}")
            time.sleep(0.2)

    def start(self):
        """Write the configuration, start the daemons and wait until the node is idle; returns self."""
        os.makedirs(self.folder, exist_ok=True)
        self.write_config()
        env = dict(os.environ, **self.env)
        key = self.path("munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self._run(["munged", "--force", f"--socket={self.path('munge.socket')}", f"--key-file={key}",
                   f"--pid-file={self.path('munged.pid')}", f"--log-file={self.path('munged.log')}",
                   f"--seed-file={self.path('munged.seed')}"])
        if self.accounting:
            self._start_accounting(env)
        self._run(["slurmctld"])
        self._wait("slurmctld", lambda: "UP" in self._run(["scontrol", "ping"]))
        self._run(["slurmd"])
        self._wait("the node", lambda: self._run(["sinfo", "-h", "-o", "%T"]).strip() == "idle")
        return self

    def _start_accounting(self, env):
        db = self.path("db")
        self._run(["mariadb-install-db", f"--datadir={db}", "--user=root", "--auth-root-authentication-method=normal",
                   "--skip-test-db"], timeout=120)
        with open(self.path("mariadbd.log"), "w") as log:
            subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={db}", "--user=root",
                              f"--socket={self.path('mysql.socket')}", f"--port={self.db_port}",
                              "--bind-address=127.0.0.1", f"--pid-file={self.path('mariadbd.pid')}",
                              "--innodb-buffer-pool-size=16M", "--skip-log-bin", "--performance-schema=off"],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
        self._wait("MariaDB", lambda: self._run(["mariadb", f"--socket={self.path('mysql.socket')}", "-uroot",
                                                 "-e", "select 1"]))
        self._run(["slurmdbd"])
        self._wait("slurmdbd", lambda: self._run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME]) is not None)

    def pid(self, daemon):
        try:
            with open(self.path(f"{daemon}.pid")) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        """Cancel every job, then stop the daemons this cluster started (by their PID files); MariaDB,
        whose orderly shutdown takes about 20 s, is killed after 2 s: its database is thrown away."""
        with contextlib.suppress(Exception):
            self._run(["scancel", "--full", "--partition", PARTITION], timeout=30)
            t0 = time.time()
            while self._run(["squeue", "-h", "-o", "%i"], timeout=30).strip() and time.time() - t0 < 30:
                time.sleep(0.5)
        for daemon in DAEMONS:
            pid = self.pid(daemon)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            t0, grace = time.time(), (2 if daemon == "mariadbd" else 20)
            while time.time() - t0 < grace:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def main(argv):
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
        return 2
    cluster = OneNodeCluster(argv[1])
    if argv[0] == "start":
        missing = missing_programs()
        if missing:
            print(f"error: not installed: {' '.join(missing)} (run scripts/install_slurm.sh as root)", file=sys.stderr)
            return 2
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
