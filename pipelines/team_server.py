"""The team's MLflow tracking server on one machine: PostgreSQL (Debian's ``postgresql`` package, a fresh
cluster in a temporary directory) as the backend store and ``mlflow server`` serving the artifacts it stores
under ``--artifacts-destination``, both bound to 127.0.0.1.

    python -m pipelines.team_server up [--state .team] [--pg-port N] [--port N] [--artifacts DIR]
    python -m pipelines.team_server down [--state .team]

``up`` prints ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``; stages log there through that variable alone.
``make team-up`` / ``make team-down`` run these. A server that cannot start (PostgreSQL missing, a port
taken, a server that exits or does not answer) is one line on stderr and exit code 1, never a hang.
The team_server fixture in tests/integration/conftest.py runs these two commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
DB = "mlflow"
PG_USER = "postgres"  # the account Debian's package creates; initdb and postgres refuse to run as root


class TeamServerError(RuntimeError):
    """A server that could not start or stop; the message is one line."""


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb (Debian's layout), else the directory
    of an ``initdb`` on PATH, else None."""
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if candidates:
        return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise TeamServerError(
                f"{what}: port {port} on {HOST} is taken; pick another or stop what holds it"
            ) from None


def _as_postgres(cmd: list[str]) -> list[str]:
    """``cmd`` as the postgres account when we are root (initdb, pg_ctl and postgres refuse root)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise TeamServerError("running as root and `runuser` is missing: cannot start PostgreSQL as the postgres user")
    return ["runuser", "-u", PG_USER, "--", *cmd]


def _run(cmd: list[str], what: str, timeout: float = 60) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TeamServerError(f"{what}: no answer within {timeout:.0f} s ({' '.join(cmd)})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise TeamServerError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


@dataclass
class TeamServer:
    """Where the running servers are: enough to reach and stop them (written to ``<state>/server.json``)."""

    pg_bindir: str
    pgdata: str  # the temporary cluster directory (removed by stop)
    pg_port: int
    artifacts: str
    port: int
    mlflow_pid: int | None = None
    mlflow_log: str = ""

    @property
    def backend_uri(self) -> str:
        return f"postgresql://{PG_USER}@{HOST}:{self.pg_port}/{DB}"

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @classmethod
    def start(
        cls, artifacts: Path, log_dir: Path, pg_port: int | None = None, port: int | None = None, timeout: float = 120
    ) -> TeamServer:
        """Start PostgreSQL in a new temporary cluster, then ``mlflow server`` on it; stop what started if
        the rest fails. ``timeout``: seconds for the MLflow server to answer (its first start migrates the
        database)."""
        bindir = postgres_bindir()
        if bindir is None:
            raise TeamServerError(
                "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
                "apt-get install postgresql"
            )
        pg_port = pg_port or free_port()
        port = port or free_port()
        check_port_free(pg_port, "PostgreSQL")
        check_port_free(port, "MLflow server")
        artifacts.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        pgdata = Path(tempfile.mkdtemp(prefix="mimflow-pg-"))
        server = cls(
            str(bindir),
            str(pgdata),
            pg_port,
            str(artifacts.resolve()),
            port,
            mlflow_log=str((log_dir / "mlflow-server.log").resolve()),
        )
        try:
            server._start_postgres()
            server._start_mlflow(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _start_postgres(self) -> None:
        pgdata, bindir = Path(self.pgdata), Path(self.pg_bindir)
        if os.geteuid() == 0:
            shutil.chown(pgdata, PG_USER)
        _run(
            _as_postgres(
                [str(bindir / "initdb"), "-D", str(pgdata), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"]
            ),
            "PostgreSQL initdb",
        )
        options = f"-p {self.pg_port} -c listen_addresses={HOST} -k {pgdata} -c fsync=off"
        _run(
            _as_postgres(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(pgdata),
                    "-o",
                    options,
                    "-l",
                    str(pgdata / "server.log"),
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            ),
            f"PostgreSQL on {HOST}:{self.pg_port}",
            timeout=45,
        )
        _run(
            _as_postgres([str(bindir / "createdb"), "-h", HOST, "-p", str(self.pg_port), "-U", PG_USER, DB]),
            "PostgreSQL createdb",
        )

    def _start_mlflow(self, timeout: float) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # no job runner: its consumer processes (GenAI scorers) cost CPU and nothing here submits jobs
        env = dict(
            os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
        )
        with open(self.mlflow_log, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.mlflow_pid = proc.pid
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise TeamServerError(f"mlflow server exited {proc.returncode}: {self._last_log_line()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TeamServerError(
            f"mlflow server on {self.uri} did not answer within {timeout:.0f} s: {self._last_log_line()}"
        )

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in Path(self.mlflow_log).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        """Stop the MLflow server (its whole process group: the server and its workers), then PostgreSQL,
        and remove the temporary cluster. Safe to call on a half-started server."""
        if self.mlflow_pid is not None:
            try:
                os.killpg(self.mlflow_pid, signal.SIGTERM)
                deadline = time.time() + 5
                while time.time() < deadline and _alive(self.mlflow_pid):
                    time.sleep(0.2)
                if _alive(self.mlflow_pid):
                    os.killpg(self.mlflow_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.mlflow_pid = None
        pgdata = Path(self.pgdata)
        if (pgdata / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres(
                    [str(Path(self.pg_bindir) / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "30", "stop"]
                ),
                capture_output=True,
                timeout=45,
            )
        shutil.rmtree(pgdata, ignore_errors=True)

    def save(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        tmp = state / "server.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(state / "server.json")

    @classmethod
    def load(cls, state: Path) -> TeamServer | None:
        path = state / "server.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child, if it is one
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.team_server", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state", type=Path, default=Path(".team"), help="where server.json and logs go")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact store (default <state>/artifacts)")
    parser.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port (default: a free one)")
    parser.add_argument("--port", type=int, default=None, help="MLflow server port (default: a free one)")
    args = parser.parse_args(argv)
    try:
        running = TeamServer.load(args.state)
        if args.action == "down":
            if running is None:
                print(f"no team server recorded in {args.state / 'server.json'}")
                return 0
            running.stop()
            (args.state / "server.json").unlink()
            print(f"stopped the MLflow server on {running.uri} and its PostgreSQL")
            return 0
        if running is not None and running.mlflow_pid is not None and _alive(running.mlflow_pid):
            raise TeamServerError(
                f"a team server is already up at {running.uri} ({args.state / 'server.json'}); `make team-down` first"
            )
        server = TeamServer.start(args.artifacts or args.state / "artifacts", args.state, args.pg_port, args.port)
        server.save(args.state)
    except TeamServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow server with PostgreSQL {server.backend_uri}, artifacts in {server.artifacts}")
    print(f"MLFLOW_TRACKING_URI={server.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
