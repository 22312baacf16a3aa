"""A real S3 endpoint for tests: moto's server, run in this process on a free 127.0.0.1 port.

    server = S3Server().start()
    server.make_bucket("ckpt")
    env = server.child_env()          # os.environ + env(), minus AWS settings that could point elsewhere
    subprocess.run([...], env=env)    # s3fs / boto3 in the child talk to the server with no endpoint in code
    server.stop()                     # the port is closed: new requests fail with EndpointConnectionError
    server.restart()                  # serves again on the same port

State: moto keeps buckets and objects in module-level backends of *this* process, not in the server object, so
stop() + start()/restart() keeps every bucket and object (it simulates an outage, not data loss). Call reset() to
drop everything (POST /moto-api/reset), e.g. between tests that share one server. Anything else in this process
that uses moto (`mock_aws`) sees and changes the same state.

Needs `moto[server]` (Flask, Werkzeug) and boto3; keep boto3/botocore at versions aiobotocore accepts, e.g. by
installing `s3fs[boto3]` alongside.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

# Settings that would override ours or send requests elsewhere (a profile, a session token, a config file that
# names another endpoint); child_env() removes them.
_CONFLICTING = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_REGION",
                "AWS_S3_ADDRESSING_STYLE")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer on `host:port` (a free port unless given), serving every AWS API moto mocks."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._server: Any = None
        # Werkzeug logs one line per request on stderr; keep errors only.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "S3Server":
        if self._server is not None:
            return self
        from moto.server import ThreadedMotoServer

        # ThreadedMotoServer.start() waits forever if the server thread cannot bind, so check the port first.
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise OSError(f"cannot start the S3 server: {self.host}:{self.port} is in use ({e})") from e
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self._server = server
        self._wait_until_serving()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket: later connections are refused (botocore raises
        EndpointConnectionError after its retries). Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()  # shutdown() + server_close() + join the server thread

    def restart(self) -> "S3Server":
        """stop() then start() on the same port; buckets and objects survive (see the module docstring)."""
        self.stop()
        return self.start()

    def reset(self) -> None:
        """Delete every bucket and object (all of moto's state in this process)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", data=b"", method="POST")
        with _no_proxy_opener().open(req, timeout=10) as r:
            r.read()

    def _wait_until_serving(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with _no_proxy_opener().open(f"{self.endpoint}/moto-api/data.json", timeout=2) as r:
                    json.load(r)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3/botocore/aiobotocore/s3fs in a child process at this server.
        botocore (>= 1.31) reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; FSSPEC_S3_ENDPOINT_URL is fsspec's
        per-protocol default for S3FileSystem(endpoint_url=...), read when fsspec is imported."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe 169.254.169.254 for credentials or region
            # no ~/.aws/config or credentials file (a profile there could set another endpoint or credentials)
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "NO_PROXY": _no_proxy_hosts(self.host),
            "no_proxy": _no_proxy_hosts(self.host),
        }

    def child_env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (default os.environ) without AWS settings that could conflict, plus env(), plus `extra`."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _CONFLICTING}
        env.update(self.env())
        env.update(extra)
        return env

    def client(self) -> Any:
        """A boto3 S3 client for this server (explicit endpoint and credentials: no environment needed)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(retries={"max_attempts": 1}, proxies={}))

    def fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for fsspec.filesystem("s3", ...) / url_to_fs(url, ...) in this process."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}, "skip_instance_cache": True}

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (3-63 characters: lower-case letters, digits, '-', '.'); returns "s3://name"."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size of every object in `bucket` under `prefix`."""
        paginator = self.client().get_paginator("list_objects_v2")
        return {o["Key"]: o["Size"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])}


def _no_proxy_hosts(host: str) -> str:
    hosts = [host, "127.0.0.1", "localhost"]
    existing = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
    if existing:
        hosts.append(existing)
    return ",".join(dict.fromkeys(hosts))


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ReadOnlyGateway:
    """An S3 endpoint that refuses writes, as a bucket policy or a read-only key does: it passes GET and HEAD on to
    `server` and answers every PUT, POST and DELETE with S3's 403 AccessDenied. Run in a thread on a free port."""

    DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
              b'</Message></Error>')

    def __init__(self, server: S3Server, host: str = "127.0.0.1") -> None:
        import http.server
        import threading

        upstream = server.endpoint
        opener = _no_proxy_opener()
        denied = self.DENIED

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _refuse(self) -> None:
                if self.headers.get("Expect", "").lower() == "100-continue":
                    self.close_connection = True  # refused before the body is sent, as S3 does
                else:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(denied)))
                self.end_headers()
                self.wfile.write(denied)

            do_PUT = do_POST = do_DELETE = _refuse

            def _forward(self) -> None:
                req = urllib.request.Request(upstream + self.path, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    resp = opener.open(req, timeout=10)
                    status, headers, body = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _forward

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.endpoint = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
