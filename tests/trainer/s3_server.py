"""A real S3-compatible server for the tests: moto in server mode (`moto_server`) on 127.0.0.1,
with authentication switched on once the test user exists, so that requests signed with other
credentials are refused as AWS would refuse them. The trainer reaches it through its real
clients (s3fs for datasets, pyarrow for artifacts), configured the way a Ray pod is: credentials
from the storage Secret's environment variables, the endpoint from spec.storage.endpoint (pods
also get it as AWS_ENDPOINT_URL)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}],
}


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def env(self, *, endpoint: bool = True) -> dict[str, str]:
        """The environment a Ray pod gets from spec.storage (secretRef keys, endpoint)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }
        if endpoint:
            env["AWS_ENDPOINT_URL"] = self.endpoint
        return env

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def upload(self, bucket: str, key: str, path: Path) -> str:
        self.client().upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(endpoint: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server at {endpoint} not ready after {timeout}s")


def start(buckets: tuple[str, ...]) -> S3Server:
    """Start moto_server, create an IAM user allowed s3:*, the buckets, then turn auth on."""
    import boto3

    binary = shutil.which("moto_server")
    if binary is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_ready(endpoint, process)
    admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, **admin)
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    server = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
    for bucket in buckets:
        server.client().create_bucket(Bucket=bucket)
    # From here on every request must be signed by a known user (moto's server-mode auth).
    urllib.request.urlopen(
        urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},  # not a form: moto reads it raw
        )
    ).read()
    return server


def stop(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
