"""Generate one image offline with the Omni API.

python examples/offline_inference/text_to_image/text_to_image.py \
    --prompt "a large red circle on the left on a blue background" --output circle.png
"""

from __future__ import annotations

import argparse
import time

from engine import DEFAULT_MODEL, DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{DEFAULT_MODEL} (default), tiny/<family>, a diffusers folder or a hub id")
    parser.add_argument("--prompt", default="a small yellow triangle at the top left on a purple background")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-inference-steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", default="output.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    parallel = DiffusionParallelConfig(tensor_parallel_size=args.tensor_parallel_size)
    with Omni(model=args.model, parallel_config=parallel) as omni:
        loaded = time.perf_counter()
        params = OmniDiffusionSamplingParams(
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            seed=args.seed,
        )
        output = omni.generate(args.prompt, params)[0]
        output.images[0].save(args.output)
    print(
        f"saved {args.output} ({output.images[0].width}x{output.images[0].height}, seed {output.seed}); "
        f"load {loaded - started:.2f} s, generate {output.timings['total_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
