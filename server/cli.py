"""Command lines: `serve` (the HTTP server) and `ditserve` (tiny models, memory report).

This module only parses: it imports nothing heavier than configs/, so `--help` and argument errors
answer at once; the commands themselves (server/commands.py) import the engine, torch and diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys

from configs import (
    CACHE_BACKENDS,
    DEFAULT_MODEL,
    DTYPES,
    LOAD_FORMATS,
    SCHEDULING,
    EngineOptions,
    load_all_families,
    load_builtin_models,
)

_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
ENGINE = EngineOptions()  # every engine flag's default, and its `dest`, is a field of EngineOptions


def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks every layer of the DiT (and text encoders) is split over: memory 1/N (default 1)")
    parser.add_argument("--ulysses-degree", "--usp", type=int, default=1,
                        help="ranks the DiT's tokens are split over (Ulysses sequence parallel; default 1)")
    parser.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2],
                        help="2: the two guidance branches run at once on two groups of ranks (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditserve", description="ditserve tools")
    commands = parser.add_subparsers(dest="command", required=True)
    make_tiny = commands.add_parser("make-tiny", help="write a built-in tiny model as a diffusers folder")
    tiny_names = ", ".join(f"tiny/{name}" for name in load_all_families())
    make_tiny.add_argument("name", help=f"one of {tiny_names} (the tiny/ prefix is optional)")
    make_tiny.add_argument("directory", help="folder to write (created if missing)")
    memory = commands.add_parser(
        "memory", help="per-rank parameter memory under a parallel layout (from configs only)"
    )
    memory.add_argument("model", help="tiny/<family>, a diffusers folder (configs suffice) or a hub id")
    _add_layout_arguments(memory)
    memory.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    memory.add_argument("--quantization", "-q", default=None, metavar="fp8|int8|gguf[:TYPE]",
                        help="the weights' bytes quantized so (gguf: the folder's .gguf file, else gguf:Q8_0, "
                             "gguf:Q4_K...)")
    memory.add_argument("--decode-size", default=None, metavar="WxH",
                        help="also the VAE decode's activation peak at this size, whole and tiled")
    commands.add_parser("serve", add_help=False, help="the HTTP server: same as the `serve` command, a name no "
                        "other package's script can take (Ray installs a `serve` of its own)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    from server import commands

    try:
        {"make-tiny": commands.make_tiny, "memory": commands.memory}[args.command](args)
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
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the names clients may use for the model, e.g. 'qwen-image gpt-image-1' (an OpenAI "
                             "client's model name); the first is the one reported (default: the model argument)")
    parser.add_argument("--api-key", default=os.environ.get("DITSERVE_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on /v1/* (env DITSERVE_API_KEY)")
    parser.add_argument("--dtype", default=ENGINE.dtype, choices=DTYPES,
                        help="parameter dtype; auto (default): bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--load-format", default=ENGINE.load_format, choices=LOAD_FORMATS,
                        help="auto (default): read the checkpoint; dummy: build the full-size model from its "
                             "configuration with random weights (published hub ids need nothing on disk)")
    parser.add_argument("--quantization", "-q", default=ENGINE.quantization, metavar="fp8|int8|gguf",
                        help="keep weights quantized, sharded like their layers: fp8 (an FP8 checkpoint as stored, "
                             "or a bf16 one quantized at load), int8 (per-channel, at load), gguf (the DiT from a "
                             ".gguf file); with --load-format dummy, gguf:Q4_K picks the type")
    parser.add_argument("--transformer-file", default=ENGINE.transformer_file, metavar="PATH.gguf",
                        help="--quantization gguf: the DiT's .gguf file (default: the model folder's "
                             "transformer/*.gguf)")
    parser.add_argument("--vae-use-tiling", action="store_true",
                        help="decode (and encode) large images in overlapping tiles: a bounded peak at any size")
    parser.add_argument("--vae-use-slicing", action="store_true",
                        help="decode the images of a batch one at a time")
    parser.add_argument("--max-batch-size", type=int, default=ENGINE.max_batch_size,
                        help="images per pipeline call: queued requests with the same size, steps, guidance "
                             f"and n run together (default {ENGINE.max_batch_size}; 1 turns batching off)")
    parser.add_argument("--scheduling", default=ENGINE.scheduling, choices=SCHEDULING,
                        help="continuous: a request joins the running ones at their next denoising step and DiT "
                             "calls of equal shape run as one; request: one pipeline call at a time "
                             f"(default {ENGINE.scheduling})")
    parser.add_argument("--max-active-requests", type=int, default=ENGINE.max_active_requests,
                        help="continuous scheduling: pipeline calls running at once "
                             f"(default {ENGINE.max_active_requests})")
    parser.add_argument("--max-queue-size", type=int, default=ENGINE.max_queue_size,
                        help="requests admitted at once (waiting or running); more get 429 with Retry-After "
                             f"(default {ENGINE.max_queue_size})")
    parser.add_argument("--max-megapixel-steps", type=float, default=ENGINE.max_megapixel_steps,
                        help="the most work one request may ask for, width x height / 1e6 x steps x n; more get "
                             f"400 (default {ENGINE.max_megapixel_steps:g}: 2048x2048, 50 steps, 4 images fit)")
    parser.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=ENGINE.request_timeout_s,
                        help="seconds before a request is answered 504 (default: no limit)")
    for kind in ("text-encoder", "vae"):
        parser.add_argument(f"--{kind}-offload", default=None, metavar="DEVICE",
                            help=f"keep the {kind.replace('-', ' ')} on DEVICE (cpu, cuda:1...) between uses and "
                                 "copy it to the rank's device for each use: less GPU memory, one copy per use")
    parser.add_argument("--startup-timeout", dest="startup_timeout_s", type=float, default=ENGINE.startup_timeout_s,
                        help=f"seconds every rank may take to load (default {ENGINE.startup_timeout_s:.0f})")
    parser.add_argument("--cache-backend", default=ENGINE.cache_backend, choices=CACHE_BACKENDS,
                        help="step caching: skip the DiT's blocks at steps where they change little, the same "
                             "steps on every rank (default none; a request may send cache=off)")
    parser.add_argument("--cache-config", default=None, metavar="JSON",
                        help='the backend\'s knobs, e.g. \'{"threshold": 0.1, "warmup_steps": 2, '
                             '"max_cached_steps": 3}\' (first_block_cache) or \'{"cache_interval": 3, '
                             '"disable_cache_before_step": 2}\' (taylorseer) or \'{"threshold": 0.06, '
                             '"mag_ratios": [...]}\' (magcache; see docs/parallelism.md)')
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=ENGINE.enforce_eager,
                        help="run the DiT eagerly; --no-enforce-eager compiles its repeated blocks with "
                             "torch.compile (default: compiled on CUDA, eager on CPU, where compiling gains "
                             "little: docs/benchmarks.md)")
    parser.add_argument("--warmup-sizes", type=lambda text: tuple(text.split(",")), default=ENGINE.warmup_sizes,
                        metavar="WxH,...", help="with compile: sizes compiled and run before /health says ready, "
                                                "e.g. 1024x1024,1328x1328 (default: the model's default size); "
                                                "other sizes compile once, on first use, and are logged")
    parser.add_argument("--compile-cache-dir", default=ENGINE.compile_cache_dir, metavar="DIR",
                        help="compiled graphs kept across starts and rank restarts (default "
                             "~/.cache/ditserve/compile)")
    parser.add_argument("--prompt-cache-bytes", type=int, default=ENGINE.prompt_cache_bytes, metavar="BYTES",
                        help="text-encoder outputs kept for prompts seen before, least recently used out "
                             f"(default {ENGINE.prompt_cache_bytes // 2**20} MiB; 0: off)")
    parser.add_argument("--result-cache-bytes", type=int, default=ENGINE.result_cache_bytes, metavar="BYTES",
                        help="finished images kept to answer an identical request that names its seed "
                             f"(default {ENGINE.result_cache_bytes // 2**20} MiB)")
    parser.add_argument("--no-result-cache", dest="result_cache_bytes", action="store_const", const=0,
                        help="answer every request by generating (same as --result-cache-bytes 0)")
    parser.add_argument("--default-sampling-params", dest="default_overrides", default=None, metavar="JSON",
                        help='defaults over the family\'s, e.g. \'{"num_inference_steps": 4}\'')
    parser.add_argument("--max-upload-bytes", type=int, default=20 * 2**20,
                        help="largest accepted image upload, per file (default 20 MiB); larger get 413")
    parser.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                        help="largest accepted JSON request body (default 4 MiB); larger get 413")
    parser.add_argument("--read-timeout", type=float, default=10.0,
                        help="seconds a client may take to send a request's headers, and again its JSON body; "
                             "slower connections are closed (a body: 408) (default 10); idle keep-alive "
                             "connections close after 5")
    parser.add_argument("--shutdown-timeout", type=float, default=60.0,
                        help="on SIGTERM, seconds to let admitted requests finish; then the rest get 503 and the "
                             "server exits (default 60)")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters to load at start (a folder, a .safetensors file or a hub id each); a "
                             "request uses one with \"model\": NAME, several with \"loras\"")
    parser.add_argument("--max-loras", type=int, default=ENGINE.max_loras,
                        help="LoRA adapters resident on the ranks at once; the least recently used beyond are "
                             f"dropped and read again on use (default {ENGINE.max_loras})")
    parser.add_argument("--max-lora-rank", type=int, default=ENGINE.max_lora_rank,
                        help=f"adapters of a higher rank are refused (default {ENGINE.max_lora_rank})")
    parser.add_argument("--allowed-lora-paths", nargs="+", default=None, metavar="DIR",
                        help="runtime LoRA loading reads adapters only under these folders (default: the folders "
                             "of --lora-modules); hub ids only when 'hub' is listed")
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


def builtin_names() -> list[str]:
    """The models that ship with the project, from configs/ alone."""
    return [f"builtin/{name}" for name in load_builtin_models()] + [f"tiny/{name}" for name in load_all_families()]


def serve_main(argv: list[str] | None = None) -> None:
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    if args.model.startswith(("builtin/", "tiny/")) and args.model not in builtin_names():
        parser.exit(2, f"serve: error: unknown built-in model {args.model!r}; built-in: {', '.join(builtin_names())}\n")
    from server import commands  # torch, diffusers: seconds

    commands.serve(args)


if __name__ == "__main__":
    main()
