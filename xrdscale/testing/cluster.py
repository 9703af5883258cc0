"""A production topology on one machine: Dask, Ray, S3 and PostgreSQL as separate processes.

:class:`ClusterBox` starts, each in its own process session:

- a Dask scheduler and ``dask_workers`` ``dask worker`` processes (one thread each), with the
  worker environment of xrdscale's own clusters (:data:`~xrdscale.runtime.cluster.WORKER_MALLOC_ENV`);
- a Ray head (``ray start --head`` with a Ray client server port) and, unless
  ``ray_gpu_node=False``, a second Ray node declared with ``--num-gpus 1``: the GPU placement
  of the inference actors then runs even where there is no CUDA (they fall back to the CPU);
- a moto S3 server, with a bucket;
- a PostgreSQL server (``initdb`` into a fresh folder; run as the ``postgres`` user when this
  process is root).

Ray runs with token authentication. Every secret (the Ray token, the S3 keys, the database
password) is new for each box and reaches the processes only through their environment;
:attr:`ClusterBox.env` is the environment a driver needs, also written to ``<dir>/box.env``
(mode 0600) for a shell. ``<dir>/box.json`` records the addresses and process ids, without
secrets. :meth:`ClusterBox.down` stops every process by its session (SIGTERM, then SIGKILL
after a grace period), Ray's worker processes included, and removes the runtime folder.

By hand::

    python -m xrdscale.testing.cluster up --dir /tmp/box
    source /tmp/box/box.env
    xrdscale campaign run SPEC --cluster "$XRDSCALE_BOX_CLUSTER" --workspace s3://xrdscale-box/run1
    python -m xrdscale.testing.cluster kill ray-node --dir /tmp/box     # a node failure
    python -m xrdscale.testing.cluster down --dir /tmp/box

Examples
--------
>>> with ClusterBox("/tmp/box") as box:                    # doctest: +SKIP
...     print(box.cluster_option)
tcp://127.0.0.1:40123,ray://127.0.0.1:40125
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["BoxError", "ClusterBox", "main", "session_pids", "stop_session"]

#: Seconds a process gets between SIGTERM and SIGKILL when the box goes down.
GRACE = 10.0
#: Seconds a service gets to start listening.
START_TIMEOUT = 90.0


class BoxError(RuntimeError):
    """A service of the box did not start, or the box's records are missing."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def session_pids(sid: int) -> list[int]:
    """Process ids of the live processes of session ``sid`` (Linux ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        # after the command: state, ppid, pgrp, session
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_session(sid: int, *, grace: float = GRACE, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to every process of session ``sid``; SIGKILL what still runs after ``grace`` s."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Service:
    """One started process: its name, session leader pid, log file and address."""

    name: str
    pid: int
    log: str
    address: str = ""


@dataclass
class _State:
    runtime: str = ""
    services: list[Service] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)


class ClusterBox:
    """Dask, Ray, S3 and PostgreSQL as separate processes on this machine.

    Parameters
    ----------
    root : str or Path
        Folder of the box's records (``box.json``, ``box.env``) and logs (``logs/``).
    dask_workers : int
        ``dask worker`` processes.
    ray_gpu_node : bool
        Start a second Ray node declared with ``--num-gpus 1``.
    s3, postgres : bool
        Start the moto S3 server / the PostgreSQL server.
    bucket : str
        Bucket created on the S3 server.
    python : str
        Interpreter of every service (default: this one), so the versions of the driver match.
    """

    def __init__(self, root: str | Path, *, dask_workers: int = 2, ray_gpu_node: bool = True, s3: bool = True,
                 postgres: bool = True, bucket: str = "xrdscale-box", python: str | None = None) -> None:
        self.root = Path(root)
        self.dask_workers = dask_workers
        self.ray_gpu_node = ray_gpu_node
        self.with_s3 = s3
        self.with_postgres = postgres
        self.bucket = bucket
        self.python = python or sys.executable
        self._secrets = {"ray_token": secrets.token_hex(16), "s3_key": "box" + secrets.token_hex(8),
                         "s3_secret": secrets.token_urlsafe(24), "pg_password": secrets.token_urlsafe(18)}
        self._state = _State()
        self._procs: dict[str, subprocess.Popen] = {}  # the processes this object started (reaped in down)

    # -- records ---------------------------------------------------------------------------------
    @property
    def addresses(self) -> dict[str, str]:
        """``dask``, ``ray`` (client), ``ray_gcs``, ``s3`` and ``postgres`` (without password)."""
        return dict(self._state.addresses)

    @property
    def cluster_option(self) -> str:
        """The ``--cluster`` value of ``xrdscale campaign run``: ``tcp://…,ray://…``."""
        a = self._state.addresses
        return ",".join(x for x in (a.get("dask"), a.get("ray")) if x)

    @property
    def job_store_url(self) -> str:
        """SQLAlchemy URL of the PostgreSQL job store (with its password)."""
        a = self._state.addresses
        return (f"postgresql+psycopg://xrdscale:{self._secrets['pg_password']}@127.0.0.1:{a['postgres_port']}"
                "/postgres")

    @property
    def secret_values(self) -> list[str]:
        """Every secret of this box (to check that none leaks into logs or stores)."""
        return list(self._secrets.values())

    @property
    def service_env(self) -> dict[str, str]:
        """Environment of the services and workers: Ray's token mode and token, S3 endpoint and keys."""
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self._secrets["ray_token"],
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        if "s3" in self._state.addresses or self.with_s3:
            env.update(AWS_ACCESS_KEY_ID=self._secrets["s3_key"], AWS_SECRET_ACCESS_KEY=self._secrets["s3_secret"],
                       AWS_DEFAULT_REGION="us-east-1")
            if "s3" in self._state.addresses:
                env["XRDSCALE_S3_ENDPOINT_URL"] = self._state.addresses["s3"]
        return env

    @property
    def env(self) -> dict[str, str]:
        """Environment of a driver: :attr:`service_env`, the job store URL and ``XRDSCALE_BOX_CLUSTER``."""
        env = {**self.service_env, "XRDSCALE_BOX_CLUSTER": self.cluster_option}
        if "postgres_port" in self._state.addresses:
            env["XRDSCALE_JOB_STORE_URL"] = self.job_store_url
        return env

    def service(self, name: str) -> Service:
        """The started service ``name`` (``dask-worker-0``, ``ray-node``, …)."""
        for s in self._state.services:
            if s.name == name:
                return s
        raise BoxError(f"no service {name!r} in this box; it has {', '.join(self.names())}")

    def names(self) -> list[str]:
        """Names of the started services."""
        return [s.name for s in self._state.services]

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {"runtime": self._state.runtime, "addresses": self._state.addresses,
                 "services": [asdict(s) for s in self._state.services]}
        (self.root / "box.json").write_text(json.dumps(state, indent=2))
        env_file = self.root / "box.env"
        env_file.touch(mode=0o600)
        os.chmod(env_file, 0o600)
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self.env.items())))
        (self.root / "box.secrets.json").touch(mode=0o600)
        os.chmod(self.root / "box.secrets.json", 0o600)
        (self.root / "box.secrets.json").write_text(json.dumps(self._secrets))

    @classmethod
    def load(cls, root: str | Path) -> ClusterBox:
        """The box whose records are in ``root`` (to stop it or kill a service from another process)."""
        root = Path(root)
        try:
            state = json.loads((root / "box.json").read_text())
            secrets_ = json.loads((root / "box.secrets.json").read_text())
        except (OSError, ValueError) as exc:
            raise BoxError(f"no cluster box is recorded in {root} ({exc}); start one with "
                           f"`python -m xrdscale.testing.cluster up --dir {root}`") from exc
        box = cls(root)
        box._secrets = secrets_
        box._state = _State(runtime=state["runtime"], addresses=state["addresses"],
                            services=[Service(**s) for s in state["services"]])
        return box

    # -- processes ---------------------------------------------------------------------------------
    def _start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               address: str = "", user: str | None = None, cwd: str | None = None) -> Service:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, start_new_session=True, user=user, cwd=cwd)
        service = Service(name, proc.pid, str(log), address)
        self._procs[name] = proc
        self._state.services.append(service)
        self._save()
        logger.info("started %s (pid %d)%s", name, proc.pid, f" at {address}" if address else "")
        return service

    def _wait_port(self, service: Service, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _listening(port):
                return
            if not session_pids(service.pid):
                break
            time.sleep(0.2)
        tail = Path(service.log).read_text(errors="replace")[-2000:] if Path(service.log).exists() else ""
        how = "exited" if not session_pids(service.pid) else f"did not listen on port {port} within {timeout:.0f} s"
        raise BoxError(f"{service.name} {how}; its log "
                       f"({service.log}) ends:\n{tail}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a node failure) to every process of service ``name``."""
        service = self.service(name)
        for pid in session_pids(service.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        logger.info("sent signal %d to %s", sig, name)

    def up(self) -> ClusterBox:
        """Start every service; on any failure stop what started and raise :class:`BoxError`."""
        self.root.mkdir(parents=True, exist_ok=True)
        # short paths: Ray's unix sockets live under its temp dir (the path limit is 107 bytes)
        self._state.runtime = tempfile.mkdtemp(prefix="xrdbox-", dir="/tmp")
        os.chmod(self._state.runtime, 0o755)
        try:
            if self.with_postgres:
                self._up_postgres()
            if self.with_s3:
                self._up_s3()
            self._up_ray()
            self._up_dask()
        except BaseException:
            self.down()
            raise
        self._save()
        return self

    def _up_postgres(self) -> None:
        bindir = _postgres_bindir()
        data = Path(self._state.runtime) / "pg"
        data.mkdir()
        user = None
        pwfile = Path(self._state.runtime) / "pg.pw"
        pwfile.write_text(self._secrets["pg_password"] + "\n")
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise BoxError("running as root, PostgreSQL needs a 'postgres' user to run as; install "
                               "the postgresql package or run as another user") from exc
            user = "postgres"
            os.chown(data, pw.pw_uid, pw.pw_gid)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "xrdscale", "-A", "scram-sha-256",
                               f"--pwfile={pwfile}", "--no-sync"], capture_output=True, text=True, user=user)
        pwfile.unlink()
        if init.returncode != 0:
            raise BoxError(f"initdb failed:\n{init.stderr[-2000:]}")
        port = _free_port()
        service = self._start("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                           "-c", "listen_addresses=127.0.0.1", "-k", str(data),
                                           "-c", "fsync=off"], user=user, address=f"127.0.0.1:{port}")
        self._wait_port(service, port)
        self._state.addresses["postgres"] = f"postgresql://xrdscale@127.0.0.1:{port}/postgres"
        self._state.addresses["postgres_port"] = str(port)

    def _up_s3(self) -> None:
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        service = self._start("s3", [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              address=endpoint)
        self._wait_port(service, port)
        self._state.addresses["s3"] = endpoint
        import s3fs

        fs = s3fs.S3FileSystem(key=self._secrets["s3_key"], secret=self._secrets["s3_secret"],
                               client_kwargs={"endpoint_url": endpoint})
        fs.mkdir(self.bucket)
        self._state.addresses["bucket"] = f"s3://{self.bucket}"

    def _ray_argv(self) -> list[str]:
        return [str(Path(self.python).with_name("ray")) if Path(self.python).with_name("ray").exists() else "ray",
                "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]

    def _up_ray(self) -> None:
        gcs, client, head_nm = _free_port(), _free_port(), _free_port()
        tmp = str(Path(self._state.runtime) / "ray")
        head = self._start("ray-head", [*self._ray_argv(), "--head", "--port", str(gcs), "--ray-client-server-port",
                                        str(client), "--node-manager-port", str(head_nm), "--num-cpus", "2",
                                        "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", tmp,
                                        *self._agent_ports()],
                           env=self.service_env, address=f"ray://127.0.0.1:{client}")
        self._wait_port(head, gcs)
        self._wait_port(head, client)
        self._wait_port(head, head_nm)
        self._state.addresses["ray"] = f"ray://127.0.0.1:{client}"
        self._state.addresses["ray_gcs"] = f"127.0.0.1:{gcs}"
        if self.ray_gpu_node:
            nm = _free_port()
            node = self._start("ray-node", [*self._ray_argv(), "--address", f"127.0.0.1:{gcs}", "--node-manager-port",
                                            str(nm), "--num-cpus", "1", "--num-gpus", "1", *self._agent_ports()],
                               env=self.service_env)
            self._wait_port(node, nm)

    @staticmethod
    def _agent_ports() -> list[str]:
        # two nodes on one machine: every per-node port must differ (Ray's defaults collide)
        return ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
                "--object-manager-port", str(_free_port())]

    def _up_dask(self) -> None:
        from xrdscale.runtime.cluster import WORKER_MALLOC_ENV

        port = _free_port()
        address = f"tcp://127.0.0.1:{port}"
        scheduler = self._start("dask-scheduler", [self.python, "-m", "distributed.cli.dask_scheduler", "--host",
                                                   "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                                address=address)
        self._wait_port(scheduler, port)
        self._state.addresses["dask"] = address
        env = {**self.service_env, **{k: str(v) for k, v in WORKER_MALLOC_ENV.items()}}
        for i in range(self.dask_workers):
            self._start(f"dask-worker-{i}", [self.python, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                             "1", "--nthreads", "1", "--name", f"box-worker-{i}", "--memory-limit",
                                             "4GiB", "--no-dashboard", "--local-directory",
                                             str(Path(self._state.runtime) / f"dask-{i}")], env=env)
        from distributed import Client

        with Client(address, timeout=START_TIMEOUT) as c:
            c.wait_for_workers(self.dask_workers, timeout=START_TIMEOUT)

    def down(self) -> None:
        """Stop every service (last started first) and remove the runtime folder."""
        for service in reversed(self._state.services):
            stop_session(service.pid)
            proc = self._procs.pop(service.name, None)
            if proc is not None:
                try:
                    proc.wait(timeout=GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=GRACE)
            logger.info("stopped %s", service.name)
        if self._state.runtime and Path(self._state.runtime).is_dir():
            shutil.rmtree(self._state.runtime, ignore_errors=True)
        self._state.services = []
        for name in ("box.json", "box.env", "box.secrets.json"):
            (self.root / name).unlink(missing_ok=True)

    def running(self) -> dict[str, bool]:
        """Whether each service still has a live process."""
        return {s.name: bool(session_pids(s.pid)) for s in self._state.services}

    def __enter__(self) -> ClusterBox:
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()


def _postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found and Path(found).with_name("postgres").exists():
        return Path(found).parent
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), key=lambda p: p.name, reverse=True):
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    raise BoxError("PostgreSQL's initdb and postgres are not installed; install the postgresql package "
                   "(apt-get install postgresql) or start the box with postgres=False (--no-postgres)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xrdscale.testing.cluster up|down|status|kill``."""
    parser = argparse.ArgumentParser(prog="python -m xrdscale.testing.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "kill"])
    parser.add_argument("service", nargs="?", help="service to kill (kill): dask-worker-N, ray-node, ray-head, …")
    parser.add_argument("--dir", required=True, help="folder of the box's records and logs")
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes")
    parser.add_argument("--no-gpu-node", action="store_true", help="no second Ray node with --num-gpus 1")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "up":
            box = ClusterBox(args.dir, dask_workers=args.workers, ray_gpu_node=not args.no_gpu_node,
                             s3=not args.no_s3, postgres=not args.no_postgres).up()
            for k, v in box.addresses.items():
                print(f"{k}: {v}")
            print(f"environment: source {box.root / 'box.env'}")
        elif args.command == "down":
            ClusterBox.load(args.dir).down()
        elif args.command == "status":
            for name, alive in ClusterBox.load(args.dir).running().items():
                print(f"{name}: {'running' if alive else 'stopped'}")
        else:
            if not args.service:
                parser.error("kill needs a service name")
            ClusterBox.load(args.dir).kill(args.service)
    except BoxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
