"""What the command lines run once their arguments are parsed (server/cli.py parses)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading

import pydantic
import torch
import uvicorn

from configs import EngineOptions, OmniDiffusionSamplingParams
from configs.engine_options import parse_size
from engine import AsyncEngine, DiffusionParallelConfig, EngineConfig, EngineState, resolve_model
from engine.host import usable_cores
from engine.loras import parse_lora_modules
from engine.memory_report import format_decode_peaks, format_report, memory_report
from engine.models.tiny_models import TINY_PREFIX, write_tiny_model
from server.app import create_app
from server.lora_paths import LoraPathPolicy
from server.middleware.connection_limits import http_protocol
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


def make_tiny(args: argparse.Namespace) -> None:
    path = write_tiny_model(args.name.removeprefix(TINY_PREFIX), args.directory)
    print(f"wrote tiny/{args.name.removeprefix(TINY_PREFIX)} to {path}")


def memory(args: argparse.Namespace) -> None:
    model = resolve_model(args.model, configs_only=True)
    layout = _parallel_config(args).layout
    ranks = memory_report(model, layout, getattr(torch, args.dtype), quantization=args.quantization)
    print(format_report(model, layout, args.dtype, ranks, args.quantization))
    if args.decode_size:
        print(format_decode_peaks(model, parse_size(args.decode_size), getattr(torch, args.dtype)))


def _parallel_config(args: argparse.Namespace) -> DiffusionParallelConfig:
    return DiffusionParallelConfig(args.tensor_parallel_size, args.ulysses_degree, args.cfg_parallel_size)


def _auto_parallel_config(args: argparse.Namespace) -> DiffusionParallelConfig:
    """`--parallel auto`: one rank per CUDA device (per core, up to 8, on a CPU), layout by the model."""
    if (args.tensor_parallel_size, args.ulysses_degree, args.cfg_parallel_size) != (1, 1, 1):
        raise ValueError("--parallel auto chooses the sizes itself: leave out --tensor-parallel-size, "
                         "--ulysses-degree and --cfg-parallel-size")
    model = resolve_model(args.model, configs_only=True)
    if torch.cuda.is_available() and torch.cuda.device_count():
        devices, device_memory = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    else:
        devices, device_memory = min(8, usable_cores()), None
    full_precision = args.dtype == "float32" or (args.dtype == "auto" and device_memory is None)  # auto on a CPU
    dtype = torch.float32 if full_precision else torch.bfloat16
    config, reason = DiffusionParallelConfig.auto(devices, model, device_memory, dtype, args.quantization)
    logger.info("--parallel auto on %d device(s): %s (%s)", devices, config.layout.describe(), reason)
    return config


def _sampling_overrides(text: str | None) -> OmniDiffusionSamplingParams:
    if not text:
        return OmniDiffusionSamplingParams()
    try:
        return pydantic.TypeAdapter(OmniDiffusionSamplingParams).validate_python(json.loads(text))
    except (json.JSONDecodeError, pydantic.ValidationError) as exc:
        fields = ", ".join(f.name for f in dataclasses.fields(OmniDiffusionSamplingParams))
        raise SystemExit(f"serve: error: --default-sampling-params must be a JSON object with fields {fields}: {exc}")


def _json_object(text: str | None, flag: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise SystemExit(f"serve: error: {flag} must be a JSON object: {exc}")
    if not isinstance(value, dict):
        raise SystemExit(f"serve: error: {flag} must be a JSON object, not {text}")
    return value


# After the drain, what uvicorn still waits for: the 503s and stream error events being written.
_ANSWER_GRACE_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn, with a shutdown that answers everyone: on SIGTERM it stops accepting, lets admitted
    requests finish for up to `drain_timeout_s`, then answers the rest 503 (a stream gets an error
    event) before uvicorn closes the connections. uvicorn alone would cancel them (plain-text 500).

    A server that shut down cleanly exits 0; one whose model could not load or restart exits 1."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout_s: float):
        super().__init__(config)
        self.engine, self.drain_timeout_s = engine, drain_timeout_s

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT and SIGTERM ask for the graceful shutdown (a second SIGINT forces it), through
        uvicorn's public `should_exit` / `force_exit`. Unlike uvicorn's own handlers these do not
        raise the signal again once the server stopped, so a clean shutdown exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._ask_to_exit) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _ask_to_exit(self, signum: int, frame) -> None:
        if self.should_exit and signum == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        await self.engine.drain(self.drain_timeout_s)
        await super().shutdown(sockets)


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a taken port fails `serve` at once, not after the load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"serve: error: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _on_ray(args: argparse.Namespace) -> bool:
    return args.replicas > 1 or args.ray_address is not None or args.autoscaling is not None


def _ray_plan(args: argparse.Namespace):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every replica's log lines as they are (read when ray is imported)
    try:
        from server.ray_replicas import RayPlan
    except ImportError as exc:
        raise SystemExit(f"serve: error: --replicas, --ray-address and --autoscaling need Ray Serve: "
                         f"pip install 'ditserve[ray]' ({exc})")
    autoscaling = None if args.autoscaling is None else _json_object(args.autoscaling, "--autoscaling")
    return RayPlan(args.replicas, args.ray_address, autoscaling, args.cpus_per_replica)


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replicas < 1:
        raise SystemExit(f"serve: error: --replicas={args.replicas} must be at least 1")
    plan = _ray_plan(args) if _on_ray(args) else None
    if plan is not None and args.enable_lora_loading:
        raise SystemExit("serve: error: --enable-lora-loading changes one server's adapters; with replicas, load "
                         "adapters at start with --lora-modules")
    try:
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineOptions) if hasattr(args, f.name)}
        options.update(default_overrides=_sampling_overrides(args.default_overrides),
                       lora_modules=parse_lora_modules(args.lora_modules),
                       cache_config=_json_object(args.cache_config, "--cache-config"))
        parallel = _auto_parallel_config(args) if args.parallel == "auto" else _parallel_config(args)
        config = EngineConfig(model=args.model, parallel_config=parallel, **options)
        # a bad name fails here, before anything starts
        resolve_model(args.model, configs_only=args.load_format == "dummy")
    except ValueError as exc:
        raise SystemExit(f"serve: error: {exc}")
    settings = ServerSettings(
        model=args.model,
        served_model_names=tuple(args.served_model_name or [args.model]),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_upload_bytes=args.max_upload_bytes,
        max_request_bytes=args.max_request_bytes,
        read_timeout_s=args.read_timeout,
        enable_lora_loading=args.enable_lora_loading,
        lora_paths=LoraPathPolicy.from_flags(args.allowed_lora_paths, config.lora_modules),
        enable_playground=not args.disable_playground,
        image_store_dir=args.image_store_dir,
    )
    if plan is not None:
        from server.ray_replicas import serve_on_ray

        serve_on_ray(config, settings, plan)
        return
    sock = _listening_socket(args.host, args.port)
    engine = AsyncEngine(config)
    server: _Server | None = None
    app = create_app(engine, settings, on_cannot_serve=lambda: setattr(server, "should_exit", True))
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    http=http_protocol(args.read_timeout), timeout_graceful_shutdown=_ANSWER_GRACE_S)
    server = _Server(uvicorn_config, engine, args.shutdown_timeout)
    server.run(sockets=[sock])
    if engine.state is EngineState.FAILED:  # could not load, or could not restart: a supervisor must see it
        raise SystemExit(f"serve: error: {engine.failure}")


