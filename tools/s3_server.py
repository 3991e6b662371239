"""A throw-away S3-protocol server (moto's server mode) on 127.0.0.1, for tests and for trying
`s3://` remotes on a workstation. Needs `moto[server]` (in the `dev` extra).

    python tools/s3_server.py start DIR   # prints the endpoint URL once it answers; pid in DIR/pid
    python tools/s3_server.py stop DIR    # stops exactly the server `start` started (by its pid)

Point clients at it with `S3_ENDPOINT_URL=<endpoint>` (what mosaicml-streaming and bigtrain read)
and any `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`; `env(endpoint)` gives that environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bigtrain-test", "AWS_SECRET_ACCESS_KEY": "bigtrain-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def env(endpoint: str) -> dict[str, str]:
    """The variables that point boto3, mosaicml-streaming and bigtrain at `endpoint`."""
    return {**CREDENTIALS, "S3_ENDPOINT_URL": endpoint}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(directory: Path, timeout_s: float = 60.0, authenticate: bool = False) -> str:
    """Start the server in its own session, logging to `directory/server.log`; return its URL.
    With `authenticate`, it checks credentials as AWS does: keys it never issued are refused."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(directory / "server.log", "ab")
    server_env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env)
    (directory / "pid").write_text(f"{proc.pid}\n")
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {directory}/server.log")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return endpoint
        except OSError:
            time.sleep(0.2)
    stop(directory)
    raise RuntimeError(f"moto server did not answer within {timeout_s:.0f} s; see {directory}/server.log")


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (and, when it is our child, been reaped: a zombie still answers
    signal 0)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # started by another process (the `start` command line)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def stop(directory: Path) -> None:
    """Stop the server started in `directory` (SIGTERM, then SIGKILL after 10 s)."""
    pid_file = directory / "pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if _gone(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    pid_file.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: s3_server.py start|stop DIR")
    if sys.argv[1] == "start":
        print(start(Path(sys.argv[2])))
    else:
        stop(Path(sys.argv[2]))
