"""An nginx relay, for scale: the fake engine behind Debian's nginx-light, as bench/overhead.py
runs it.

One process (``daemon off; master_process off; worker_processes 1``), so /proc/PID/stat of the
child holds all of its CPU time; everything it writes (pid, error log, temporary files) stays in
the bench's temporary folder, so it runs as root without /var/log/nginx or /run. Upstream
connections are kept alive (``keepalive 64``, HTTP/1.1, no ``Connection`` header forwarded) and
nothing is buffered in either direction, as a streaming relay of an LLM engine is set up.

Run alone: ``python bench/nginx_relay.py --upstream-port PORT --port PORT --workdir DIR``
(writes DIR/nginx.conf and runs nginx in the foreground).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_BINARY = "/usr/sbin/nginx"


def nginx_binary() -> str | None:
    """The nginx executable: on PATH, else Debian's /usr/sbin/nginx; None when not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return DEFAULT_BINARY if os.access(DEFAULT_BINARY, os.X_OK) else None


def render_config(
    workdir: Path, host: str, port: int, upstream_port: int, connections: int = 16_384
) -> str:
    """nginx.conf for a relay on ``host:port`` to the engine on ``host:upstream_port``."""
    w = workdir.resolve()
    return f"""# written by bench/nginx_relay.py
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {w}/nginx-temp/client_body;
    proxy_temp_path {w}/nginx-temp/proxy;
    fastcgi_temp_path {w}/nginx-temp/fastcgi;
    uwsgi_temp_path {w}/nginx-temp/uwsgi;
    scgi_temp_path {w}/nginx-temp/scgi;

    # client connections: as long-lived as wrk's and the stream clients'
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 8m;
    client_body_buffer_size 64k;

    upstream engine {{
        server {host}:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


def write_config(workdir: Path, host: str, port: int, upstream_port: int) -> Path:
    """Write nginx.conf (and the temporary folders) into ``workdir``; returns the file."""
    (workdir / "nginx-temp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render_config(workdir, host, port, upstream_port))
    return conf


def argv(binary: str, workdir: Path, conf: Path) -> list[str]:
    """The command line: prefix, config and startup error log all inside ``workdir``."""
    w = workdir.resolve()
    return [binary, "-p", f"{w}/", "-c", str(conf.resolve()), "-e", f"{w}/nginx-error.log"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    if not args.host.startswith("127."):
        parser.error("the nginx relay uses loopback addresses only")
    binary = nginx_binary()
    if binary is None:
        print("nginx is not installed (apt-get install -y nginx-light)", file=sys.stderr)
        return 2
    conf = write_config(args.workdir, args.host, args.port, args.upstream_port)
    # nginx in the foreground, until it is stopped
    return subprocess.call(argv(binary, args.workdir, conf))


if __name__ == "__main__":
    sys.exit(main())
