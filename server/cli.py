"""Command lines: `serve` (the HTTP server) and `ditserve` (tiny models, memory report)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys

import pydantic
import torch
import uvicorn

from configs import OmniDiffusionSamplingParams
from engine import DEFAULT_MODEL, AsyncEngine, DiffusionParallelConfig, EngineConfig, EngineState, resolve_model
from engine.loras import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, parse_lora_modules
from engine.memory_report import format_report, memory_report
from engine.parallel_config import DTYPES, LOAD_FORMATS
from engine.tiny_models import TINY_PREFIX, tiny_model_names, write_tiny_model
from engine.worker_group import DEFAULT_STARTUP_TIMEOUT_S, usable_cores

_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def _make_tiny(args: argparse.Namespace) -> None:
    path = write_tiny_model(args.name.removeprefix(TINY_PREFIX), args.directory)
    print(f"wrote tiny/{args.name.removeprefix(TINY_PREFIX)} to {path}")


def _memory(args: argparse.Namespace) -> None:
    model = resolve_model(args.model, configs_only=True)
    layout = _parallel_config(args).layout
    ranks = memory_report(model, layout, getattr(torch, args.dtype))
    print(format_report(model, layout, args.dtype, ranks))


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks every layer of the DiT (and text encoders) is split over: memory 1/N (default 1)")
    parser.add_argument("--ulysses-degree", "--usp", type=int, default=1,
                        help="ranks the DiT's tokens are split over (Ulysses sequence parallel; default 1)")
    parser.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2],
                        help="2: the two guidance branches run at once on two groups of ranks (default 1)")


def _parallel_config(args: argparse.Namespace) -> DiffusionParallelConfig:
    return DiffusionParallelConfig(args.tensor_parallel_size, args.ulysses_degree, args.cfg_parallel_size)


def _auto_parallel_config(args: argparse.Namespace) -> DiffusionParallelConfig:
    """`--parallel auto`: one rank per CUDA device (per core, up to 8, on a CPU), layout by the model."""
    if (args.tensor_parallel_size, args.ulysses_degree, args.cfg_parallel_size) != (1, 1, 1):
        raise ValueError("--parallel auto chooses the sizes itself: leave out --tensor-parallel-size, "
                         "--ulysses-degree and --cfg-parallel-size")
    model = resolve_model(args.model, configs_only=True)
    if torch.cuda.is_available() and torch.cuda.device_count():
        devices, memory = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
    else:
        devices, memory = min(8, usable_cores()), None
    dtype = torch.float32 if args.dtype == "float32" or (args.dtype == "auto" and memory is None) else torch.bfloat16
    config, reason = DiffusionParallelConfig.auto(devices, model, memory, dtype)
    logging.getLogger("ditserve").info("--parallel auto on %d device(s): %s (%s)", devices,
                                       config.layout.describe(), reason)
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="ditserve tools")
    commands = parser.add_subparsers(dest="command", required=True)
    make_tiny = commands.add_parser("make-tiny", help="write a built-in tiny model as a diffusers folder")
    make_tiny.add_argument("name", help=f"one of {', '.join(tiny_model_names())} (the tiny/ prefix is optional)")
    make_tiny.add_argument("directory", help="folder to write (created if missing)")
    make_tiny.set_defaults(run=_make_tiny)
    memory = commands.add_parser(
        "memory", help="per-rank parameter memory under a parallel layout (from configs only)"
    )
    memory.add_argument("model", help="tiny/<family>, a diffusers folder (configs suffice) or a hub id")
    _add_layout_arguments(memory)
    memory.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    memory.set_defaults(run=_memory)
    commands.add_parser("serve", add_help=False, help="the HTTP server: same as the `serve` command, a name no "
                        "other package's script can take (Ray installs a `serve` of its own)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as exc:
        sys.exit(f"ditserve: error: {exc}")


def build_serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve", description="Serve a diffusion model behind the OpenAI Images API."
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help="tiny/<family>, a local diffusers folder, or a Hugging Face hub id "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--omni", action="store_true", help="accepted for compatibility with vLLM-Omni; no effect")
    parser.add_argument("--host", default=os.environ.get("DITSERVE_HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1, env DITSERVE_HOST)")
    parser.add_argument("--port", type=int, default=8091, help="default 8091")
    _add_layout_arguments(parser)
    parser.add_argument("--parallel", choices=["auto"], default=None,
                        help="auto: choose the layout for this machine's devices and the model (CFG parallel "
                             "first for true-CFG models, then Ulysses, TP only as far as memory needs)")
    parser.add_argument("--served-model-name", default=None, help="model id clients use (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("DITSERVE_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on /v1/* (env DITSERVE_API_KEY)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="parameter dtype; auto (default): bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="auto (default): read the checkpoint; dummy: build the full-size model from its "
                             "configuration with random weights (published hub ids need nothing on disk)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="images per pipeline call: queued requests with the same size, steps, guidance "
                             "and n run together (default 8; 1 turns batching off)")
    parser.add_argument("--max-queue-size", type=int, default=64,
                        help="requests admitted at once (waiting or running); more get 429 with Retry-After "
                             "(default 64)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds before a request is answered 504 (default: no limit)")
    for kind in ("text-encoder", "vae"):
        parser.add_argument(f"--{kind}-offload", default=None, metavar="DEVICE",
                            help=f"keep the {kind.replace('-', ' ')} on DEVICE (cpu, cuda:1...) between uses and "
                                 "copy it to the rank's device for each use: less GPU memory, one copy per use")
    parser.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                        help=f"seconds every rank may take to load (default {DEFAULT_STARTUP_TIMEOUT_S:.0f})")
    parser.add_argument("--default-sampling-params", default=None, metavar="JSON",
                        help='defaults over the family\'s, e.g. \'{"num_inference_steps": 4}\'')
    parser.add_argument("--max-upload-bytes", type=int, default=20 * 2**20,
                        help="largest accepted image upload, per file (default 20 MiB); larger get 413")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="on SIGTERM, seconds to let admitted requests finish before failing them (default 60)")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters to load at start (a folder, a .safetensors file or a hub id each); a "
                             "request uses one with \"model\": NAME, several with \"loras\"")
    parser.add_argument("--max-loras", type=int, default=DEFAULT_MAX_LORAS,
                        help="LoRA adapters resident on the ranks at once; the least recently used beyond are "
                             f"dropped and read again on use (default {DEFAULT_MAX_LORAS})")
    parser.add_argument("--max-lora-rank", type=int, default=DEFAULT_MAX_LORA_RANK,
                        help=f"adapters of a higher rank are refused (default {DEFAULT_MAX_LORA_RANK})")
    parser.add_argument("--enable-lora-loading", action="store_true",
                        default=os.environ.get(_RUNTIME_LORA_ENV, "").lower() in ("1", "true"),
                        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key; "
                             f"also env {_RUNTIME_LORA_ENV}=true, as in vLLM)")
    parser.add_argument("--disable-playground", action="store_true",
                        help="do not serve the web playground at / and /playground")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="default info: one line per request")
    parser.add_argument("--image-store-dir", default=None, metavar="DIR",
                        help="keep response_format=url images in DIR (a shared mount serves them from every "
                             "replica or server) instead of this process's memory")
    ray = parser.add_argument_group("scale-out on Ray Serve (pip install 'ditserve[ray]')")
    ray.add_argument("--replicas", type=int, default=1,
                     help="worker groups behind this endpoint, each a Ray Serve replica with its own devices")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster ('auto' after `ray start --head`); default: start a local one")
    ray.add_argument("--autoscaling", default=None, metavar="JSON",
                     help='Ray Serve autoscaling_config, e.g. \'{"min_replicas": 1, "max_replicas": 4, '
                          '"target_ongoing_requests": 2}\' (replaces --replicas)')
    ray.add_argument("--cpus-per-replica", type=float, default=1.0,
                     help="CPUs Ray reserves for each replica (on a CPU cluster its ranks share them; default 1)")
    return parser


def _sampling_overrides(text: str | None) -> OmniDiffusionSamplingParams:
    if not text:
        return OmniDiffusionSamplingParams()
    try:
        return pydantic.TypeAdapter(OmniDiffusionSamplingParams).validate_python(json.loads(text))
    except (json.JSONDecodeError, pydantic.ValidationError) as exc:
        fields = ", ".join(f.name for f in dataclasses.fields(OmniDiffusionSamplingParams))
        raise SystemExit(f"serve: error: --default-sampling-params must be a JSON object with fields {fields}: {exc}")


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would die
    of the signal; a server that shut down cleanly should exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _on_ray(args: argparse.Namespace) -> bool:
    return args.replicas > 1 or args.ray_address is not None or args.autoscaling is not None


def _ray_plan(args: argparse.Namespace):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every replica's log lines as they are (read when ray is imported)
    try:
        from server.ray_replicas import RayPlan
    except ImportError as exc:
        raise SystemExit(f"serve: error: --replicas, --ray-address and --autoscaling need Ray Serve: "
                         f"pip install 'ditserve[ray]' ({exc})")
    try:
        autoscaling = None if args.autoscaling is None else json.loads(args.autoscaling)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"serve: error: --autoscaling must be a JSON object: {exc}")
    if autoscaling is not None and not isinstance(autoscaling, dict):
        raise SystemExit(f"serve: error: --autoscaling must be a JSON object, not {args.autoscaling}")
    return RayPlan(args.replicas, args.ray_address, autoscaling, args.cpus_per_replica)


def serve_main(argv: list[str] | None = None) -> None:
    from server.app import create_app
    from server.settings import ServerSettings

    args = build_serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replicas < 1:
        raise SystemExit(f"serve: error: --replicas={args.replicas} must be at least 1")
    plan = _ray_plan(args) if _on_ray(args) else None
    if plan is not None and args.enable_lora_loading:
        raise SystemExit("serve: error: --enable-lora-loading changes one server's adapters; with replicas, load "
                         "adapters at start with --lora-modules")
    try:
        config = EngineConfig(
            model=args.model,
            parallel=_auto_parallel_config(args) if args.parallel == "auto" else _parallel_config(args),
            dtype=args.dtype,
            load_format=args.load_format,
            default_overrides=_sampling_overrides(args.default_sampling_params),
            max_queue_size=args.max_queue_size,
            max_batch_size=args.max_batch_size,
            request_timeout_s=args.request_timeout,
            startup_timeout_s=args.startup_timeout,
            lora_modules=parse_lora_modules(args.lora_modules),
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            text_encoder_offload=args.text_encoder_offload,
            vae_offload=args.vae_offload,
        )
        # a bad name fails here, before anything starts
        resolve_model(args.model, configs_only=args.load_format == "dummy")
    except ValueError as exc:
        raise SystemExit(f"serve: error: {exc}")
    settings = ServerSettings(
        model=args.model,
        served_model_name=args.served_model_name or args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_upload_bytes=args.max_upload_bytes,
        enable_lora_loading=args.enable_lora_loading,
        enable_playground=not args.disable_playground,
        image_store_dir=args.image_store_dir,
    )
    if plan is not None:
        from server.ray_replicas import serve_on_ray

        serve_on_ray(config, settings, plan)
        return
    engine = AsyncEngine(config)
    app = create_app(engine, settings)
    _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                           timeout_graceful_shutdown=args.shutdown_timeout)).run()
    if engine.state is EngineState.FAILED:
        raise SystemExit(f"serve: error: {engine.failure}")


if __name__ == "__main__":
    main()
