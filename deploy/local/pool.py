"""A local serving pool: N ``streamgen serve`` replicas on loopback ports behind nginx (gRPC, least_conn).

Run it through ``deploy/local/run.sh N [options] [-- serve flags]``; ``--help`` lists the options::

    deploy/local/run.sh 3 -- --preset test --random-init --text-encoder hash
    python -m clients.stream --server 127.0.0.1:50050 --prompt "a red mug" --seconds 5 --out out.mp4

What it does, in order: start the replicas (``--base-port`` + i, /metrics on ``--metrics-base-port`` + i),
wait until each reports SERVING on grpc.health.v1, ask each for ``GetModelInfo.model_id`` and refuse a
mixed pool (exit 3: a retried start could land on another model), render
``deploy/local/nginx.conf.template`` into the run directory and run nginx in the foreground with that
prefix (never the system service), then supervise:

* a serving replica that exits non-zero or by a signal (a crash, ``kill -9``) is restarted on its
  port, and rejoins the pool once SERVING with the pool's model id (nginx skipped it meanwhile:
  passive health); one that fails again before serving is left down (no crash loop);
* a replica that exits 0 drained on purpose (SIGTERM) and stays down;
* SIGTERM / SIGINT to this process drains every replica (they end their streams with
  REASON_SERVER_SHUTDOWN after their ``--drain-timeout-s``), stops nginx gracefully, and exits 0
  when all replicas exited 0.

Progress goes to stdout as one JSON object per line (``event``: replica_started, pool_ready,
replica_exited, replica_restarted, replica_refused, mixed_models, stopped) and the current state to
``<run dir>/pool.json``; replica logs are ``<run dir>/replica-<i>.log``.

This is development and test tooling: a real deployment uses deploy/compose.yaml or deploy/k8s/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from streamgen.api.v1 import pb, pb_grpc
from streamgen.server.health import check

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEMPLATE = HERE / "nginx.conf.template"
EXIT_MIXED_MODELS, EXIT_NOT_READY = 3, 4


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"   # starting -> serving -> exited (drained) | refused
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def model_id(address: str, timeout_s: float = 5.0) -> str:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.StreamGenStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s)
    return str(info.model_id)


def render_nginx_conf(run_dir: Path, listen: str, status_listen: str, upstreams: list[str],
                      fail_timeout_s: float, client_header_timeout_s: float) -> Path:
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout={fail_timeout_s:g}s;" for u in upstreams)
    text = TEMPLATE.read_text()
    for key, value in {"RUN_DIR": str(run_dir), "LISTEN": listen, "STATUS_LISTEN": status_listen,
                       "UPSTREAM_SERVERS": servers,
                       "CLIENT_HEADER_TIMEOUT": f"{client_header_timeout_s:g}s"}.items():
        text = text.replace(f"@@{key}@@", value)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    path = run_dir / "nginx.conf"
    path.write_text(text)
    return path


class Pool:
    def __init__(self, args: argparse.Namespace, serve_args: list[str]) -> None:
        self.args = args
        self.serve_args = serve_args
        self.own_run_dir = args.run_dir is None
        self.run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="streamgen-pool-")).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        n = args.replicas
        ports = free_ports(2 * n + 2)
        self.port = args.port or ports[-1]
        self.status_port = args.status_port or ports[-2]
        per_replica = dict(args.replica_args)
        self.replicas = [
            Replica(i, (args.base_port + i) if args.base_port else ports[i],
                    (args.metrics_base_port + i) if args.metrics_base_port else ports[n + i],
                    shlex.split(per_replica.get(i, "")), self.run_dir / f"replica-{i}.log")
            for i in range(n)]
        self.model_id = ""
        self.nginx: subprocess.Popen[bytes] | None = None
        self.stopping = False

    # ------------------------------------------------------------------ output
    def emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def write_state(self) -> None:
        state = {"balancer": f"127.0.0.1:{self.port}", "status_url": f"http://127.0.0.1:{self.status_port}/nginx_status",
                 "run_dir": str(self.run_dir), "pid": os.getpid(),
                 "nginx_pid": self.nginx.pid if self.nginx else None, "model_id": self.model_id,
                 "extra_upstreams": self.args.extra_upstream,
                 "replicas": [{"index": r.index, "address": r.address, "metrics_url":
                               f"http://127.0.0.1:{r.metrics_port}/metrics", "pid": r.proc.pid if r.proc else None,
                               "state": r.state, "restarts": r.restarts, "exit_codes": r.exit_codes,
                               "log": str(r.log)} for r in self.replicas]}
        tmp = self.run_dir / "pool.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run_dir / "pool.json")

    # ------------------------------------------------------------------ replicas
    def start_replica(self, r: Replica) -> None:
        cmd = [sys.executable, "-m", "streamgen.cli", "serve", "--host", "127.0.0.1", "--port", str(r.port),
               "--metrics-port", str(r.metrics_port), *self.serve_args, *r.args]
        with r.log.open("ab") as log:
            # Own session: a Ctrl-C on the terminal reaches this supervisor only, which drains the replicas.
            r.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        r.state = "starting"
        self.emit("replica_started", index=r.index, address=r.address, pid=r.proc.pid, restarts=r.restarts)

    def poll_starting(self, r: Replica) -> None:
        """A starting replica that reports SERVING joins the pool if its model is the pool's."""
        if check(r.address, timeout_s=1.0) != "SERVING":
            return
        mid = model_id(r.address)
        if self.model_id and mid != self.model_id:
            r.state = "refused"
            self.emit("replica_refused", index=r.index, address=r.address, model_id=mid, pool_model_id=self.model_id)
            self.signal_replica(r, signal.SIGTERM)
            return
        r.state = "serving"
        self.emit("replica_serving", index=r.index, address=r.address, model_id=mid)

    def signal_replica(self, r: Replica, sig: signal.Signals) -> None:
        if r.proc is not None and r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(sig)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.args.ready_timeout_s
        while any(r.state == "starting" for r in self.replicas):
            if self.stopping:
                return False
            for r in self.replicas:
                if r.state != "starting":
                    continue
                assert r.proc is not None
                if r.proc.poll() is not None:
                    self.emit("replica_failed", index=r.index, exit_code=r.proc.returncode, log=str(r.log),
                              log_tail=r.log.read_text(errors="replace")[-2000:])
                    return False
                if check(r.address, timeout_s=1.0) == "SERVING":
                    r.state = "serving"
            if time.monotonic() > deadline:
                self.emit("not_ready", timeout_s=self.args.ready_timeout_s)
                return False
            time.sleep(0.2)
        return True

    def check_identities(self) -> bool:
        ids = {r.index: model_id(r.address) for r in self.replicas}
        for upstream in self.args.extra_upstream:
            with contextlib.suppress(grpc.RpcError):  # a dead extra upstream has no identity to compare
                ids[upstream] = model_id(upstream, timeout_s=2.0)
        if len(set(ids.values())) > 1:
            self.emit("mixed_models", model_ids={str(k): v for k, v in ids.items()})
            print("run.sh: error: the replicas serve different models (GetModelInfo.model_id): "
                  + ", ".join(f"{k}={v}" for k, v in ids.items())
                  + "; a retried or balanced stream could land on another model, so the pool is refused",
                  file=sys.stderr, flush=True)
            return False
        self.model_id = next(iter(ids.values()), "")
        return True

    # ------------------------------------------------------------------ nginx
    def start_nginx(self) -> bool:
        upstreams = [r.address for r in self.replicas] + list(self.args.extra_upstream)
        conf = render_nginx_conf(self.run_dir, f"127.0.0.1:{self.port}", f"127.0.0.1:{self.status_port}",
                                 upstreams, self.args.fail_timeout_s, self.args.client_header_timeout_s)
        base = [self.args.nginx, "-p", str(self.run_dir), "-c", str(conf), "-e", str(self.run_dir / "nginx-error.log")]
        test = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
        if test.returncode != 0:
            self.emit("nginx_failed", stderr=test.stderr[-2000:])
            return False
        self.nginx = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.nginx.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            time.sleep(0.05)
        self.emit("nginx_failed", exit_code=self.nginx.poll(),
                  error_log=(self.run_dir / "nginx-error.log").read_text(errors="replace")[-2000:])
        return False

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            code = self._start_and_supervise()
        finally:
            stopped = self.stop()
            self.emit("stopped", replica_exit_codes={str(r.index): r.exit_codes for r in self.replicas},
                      clean=stopped == 0)
            if self.own_run_dir and not self.args.keep_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        return code or stopped

    def _start_and_supervise(self) -> int:
        for r in self.replicas:
            self.start_replica(r)
        self.write_state()
        if not self.wait_ready():
            return 0 if self.stopping else EXIT_NOT_READY
        if not self.check_identities():
            return EXIT_MIXED_MODELS
        if not self.start_nginx():
            return 1
        self.write_state()
        self.emit("pool_ready", balancer=f"127.0.0.1:{self.port}", run_dir=str(self.run_dir),
                  model_id=self.model_id, replicas=[r.address for r in self.replicas],
                  extra_upstreams=self.args.extra_upstream)
        return self.supervise()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def supervise(self) -> int:
        while not self.stopping:
            if self.nginx is not None and self.nginx.poll() is not None:
                self.emit("nginx_exited", exit_code=self.nginx.returncode)
                return 1
            changed = False
            for r in self.replicas:
                assert r.proc is not None
                code = r.proc.poll()
                if code is not None and r.state in ("starting", "serving", "refused"):
                    r.exit_codes.append(code)
                    # A replica that crashes before it ever served again would crash again: no restart loop.
                    crashed = code != 0 and r.state == "serving"
                    r.state = "exited"
                    self.emit("replica_exited", index=r.index, exit_code=code,
                              restarting=crashed and self.args.restart, log=str(r.log))
                    if crashed and self.args.restart:
                        r.restarts += 1
                        self.start_replica(r)
                    changed = True
                elif r.state == "starting":
                    before = r.state
                    self.poll_starting(r)
                    changed = changed or r.state != before
            if changed:
                self.write_state()
            time.sleep(0.1)
        return 0

    def stop(self) -> int:
        """Drain every replica (SIGTERM), then stop nginx; 0 when all exited 0."""
        self.stopping = True
        for r in self.replicas:
            self.signal_replica(r, signal.SIGTERM)
        deadline = time.monotonic() + self.args.stop_timeout_s
        clean = True
        for r in self.replicas:
            if r.proc is None:
                continue
            try:
                code = r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                code = r.proc.wait()
            if r.state != "exited":
                r.exit_codes.append(code)
                r.state = "exited"
            clean = clean and code == 0
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # graceful: finish open requests (none are left)
            try:
                self.nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()
        with contextlib.suppress(OSError):
            self.write_state()
        return 0 if clean else 1


def _replica_args(text: str) -> tuple[int, str]:
    index, sep, flags = text.partition("=")
    if not sep or not index.isdigit():
        raise argparse.ArgumentTypeError(f"want INDEX=FLAGS (e.g. 1='--dtype float32'), got {text!r}")
    return int(index), flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy/local/run.sh", description=__doc__.split("\n")[0],
                                epilog="flags after -- go to every 'streamgen serve' (default: the committed model)")
    p.add_argument("replicas", type=int, help="number of replicas (0: nginx in front of --extra-upstream only)")
    p.add_argument("--port", type=int, default=50050, help="balancer port on 127.0.0.1 (0 = any free) (default: 50050)")
    p.add_argument("--base-port", type=int, default=50061,
                   help="replica i serves on BASE+i (0 = any free ports) (default: 50061)")
    p.add_argument("--metrics-base-port", type=int, default=9101,
                   help="replica i's /metrics on BASE+i (0 = any free ports) (default: 9101)")
    p.add_argument("--status-port", type=int, default=0, help="nginx stub_status port (0 = any free)")
    p.add_argument("--extra-upstream", action="append", default=[], metavar="HOST:PORT",
                   help="also balance to this address (a replica started elsewhere); repeatable")
    p.add_argument("--replica-args", action="append", default=[], type=_replica_args, metavar="I=FLAGS",
                   help="extra serve flags for replica I only (canaries; tests of the mixed-pool refusal)")
    p.add_argument("--fail-timeout-s", type=float, default=5.0,
                   help="after a failed connect, nginx skips a replica this long (default: 5)")
    p.add_argument("--client-header-timeout-s", type=float, default=10.0,
                   help="nginx closes a client connection that sends no request this long (default: 10)")
    p.add_argument("--ready-timeout-s", type=float, default=180.0, help="wait this long for SERVING (default: 180)")
    p.add_argument("--stop-timeout-s", type=float, default=60.0,
                   help="on stop, wait this long for replicas to drain before SIGKILL (default: 60)")
    p.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a replica that crashed (exit non-zero or killed) (default: on)")
    p.add_argument("--run-dir", help="config, pid, state and log files here (default: a temporary directory, "
                                     "removed on exit)")
    p.add_argument("--keep-run-dir", action="store_true", help="keep the temporary run directory on exit")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1:]
    args = build_parser().parse_args(argv)
    if args.replicas < 0 or (args.replicas == 0 and not args.extra_upstream):
        print("run.sh: error: give N >= 1 replicas (or N = 0 with --extra-upstream)", file=sys.stderr)
        return 2
    if not Path(args.nginx).is_file():
        print(f"run.sh: error: nginx not found ({args.nginx}); install Debian's nginx (make nginx-deps)",
              file=sys.stderr)
        return 2
    return Pool(args, serve_args).run()


if __name__ == "__main__":
    sys.exit(main())
