"""A Google Cloud Storage emulator on loopback for the gs:// tests: `gcp-storage-emulator` (PyPI, pure
Python, in the `test` extra) started as its own process, in memory, with one bucket.

Clients are pointed at it by environment variables, which the r1jax subprocesses the tests start
inherit: `STORAGE_EMULATOR_HOST` (gcsfs, which etils.epath uses for gs://), `TENSORSTORE_GCS_HTTP_URL`
(tensorstore's gcs driver, which orbax writes arrays with) and `GOOGLE_AUTH_TOKEN_FOR_TESTING`
(tensorstore sends this token instead of looking for credentials).

One addition to the emulator (`_add_generation_headers`): real GCS answers a download with the
object's generation in `x-goog-generation`; the emulator (2026.7.19) does not, and tensorstore, which
writes orbax's OCDBT manifest conditionally on the generation it read, then fails with "Malformed
StorageGeneration" as soon as a process updates a manifest another one wrote (a resume)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

BUCKET = "r1jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_command(port: int) -> list[str]:
    return [sys.executable, __file__, str(port)]


def _add_generation_headers() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    objects.download = download
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is plain:
                handlers[method] = download


def serve(port: int) -> None:
    """The emulator on 127.0.0.1:`port`, in memory, with BUCKET, until terminated."""
    import logging
    import signal
    import threading

    from gcp_storage_emulator.server import create_server

    logging.disable(logging.CRITICAL)
    _add_generation_headers()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    stop.wait()
    server.stop()


@pytest.fixture(scope="module")
def gcs():
    """Starts the emulator, sets the environment for it, and yields `gs://BUCKET`; stops it after the
    module's tests."""
    port = _free_port()
    proc = subprocess.Popen(emulator_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start on port {port}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
