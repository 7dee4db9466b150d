"""Running the app: `ServerThread` (uvicorn in a background thread, for tests and benchmarks) and `cli_serve` (what
`dgemma serve` does)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

from ..errors import InputError
from .worker import DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_MB


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A listening socket on host:port (0 = a free port), or InputError naming the flag: out of range, in use, or an
    address this machine does not have."""
    if not 0 <= port <= 65535:
        raise InputError(f"{flag} {port}: a port is a number from 0 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "already in use" if e.errno in (48, 98) else (e.strerror or str(e))
        raise InputError(f"cannot listen on {host}:{port}: {why}") from None
    except socket.gaierror as e:  # pragma: no cover - a subclass of OSError on every supported Python
        sock.close()
        raise InputError(f"--host {host}: {e.strerror}") from None
    return sock


class ServerThread:
    """uvicorn serving the app on a loopback port (0 = a free one) in a background thread."""

    def __init__(self, model, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "dgemma",
                 max_batch: int = DEFAULT_MAX_BATCH, batching: str = "merged",
                 prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB, speed: str = "exact", log_level: str = "warning",
                 allow_remote_images: bool = False):
        import uvicorn

        from .app import create_app

        if not is_loopback(host):
            raise InputError(f"ServerThread binds loopback addresses only, not {host!r}")
        self.app = create_app(model, model_name=model_name, max_batch=max_batch, batching=batching,
                              prompt_cache_mb=prompt_cache_mb, speed=speed, allow_remote_images=allow_remote_images)
        self.worker = self.app.state.worker
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="dgemma-uvicorn")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def served_name(path) -> str:
    p = Path(str(path))
    return p.name if p.exists() else str(path)


def vllm_command(model_ref: str, **options) -> list[str]:
    """The `vllm serve` argv for a checkpoint (dgemma/vllm.py writes it from vLLM's recipe)."""
    from ..vllm import vllm_command as command

    return command(model_ref, **options)


def _print_vllm_command(path, *, served_model_name, host: str, port: int, max_model_len, max_batch) -> None:
    from ..vllm import print_vllm_command

    print_vllm_command(path, served_model_name=served_model_name, host=host, port=port, max_model_len=max_model_len,
                       max_num_seqs=max_batch)


def cli_serve(*, model_path, backend: str, host: str, port: int, max_batch: int | None, served_model_name,
              dtype, device, print_vllm_command: bool, max_model_len: int | None, batching: str = "merged",
              prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB, speed: str = "exact", log_level: str = "info",
              allow_remote_images: bool = False) -> None:
    """What `dgemma serve` does (the click command in cli.py only forwards its options here). Bad flags, a port in
    use and a missing extra end in InputError (one `error:` line from the CLI)."""
    import sys

    import click

    from ..assets import default_model_path, text_model_path

    # With no --model an OpenAI-style server answers text: the shipped text model when the package has one.
    path = model_path if model_path is not None else (text_model_path() or default_model_path())
    if print_vllm_command:
        _print_vllm_command(path, served_model_name=served_model_name, host=host, port=port,
                            max_model_len=max_model_len, max_batch=max_batch)
        return
    if prompt_cache_mb < 0:
        raise InputError(f"--prompt-cache-mb {prompt_cache_mb}: must be >= 0 (0 turns the prompt cache off)")
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    if not is_loopback(host):
        click.echo(f"warning: serving on {host}, which is not a loopback address: the server has no "
                   "authentication", err=True)
    import uvicorn

    from ..api import load
    from ..backend import backend_class
    from .app import create_app

    try:
        backend_class(backend)
        model = load(path, backend=backend, dtype=dtype, device=device, progress=sys.stderr.isatty())
        name = served_model_name or served_name(path)
        batch = max_batch or DEFAULT_MAX_BATCH
        app = create_app(model, model_name=name, max_batch=batch, batching=batching, prompt_cache_mb=prompt_cache_mb,
                         speed=speed, allow_remote_images=allow_remote_images)
    except BaseException:
        sock.close()
        raise
    cache = f"prompt cache {prompt_cache_mb:g} MB" if prompt_cache_mb else "no prompt cache"
    click.echo(f"dgemma serve: {name} on {model.backend.describe()}, max batch {batch} ({batching} batching, "
               f"{cache}, speed {speed}), http://{host}:{sock.getsockname()[1]}/v1", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
