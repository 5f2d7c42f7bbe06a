"""Edit an image offline with the Omni API (Qwen-Image-Edit family).

python examples/offline_inference/image_to_image/image_edit.py --model tiny/qwen-image-edit \
    --image input.png --prompt "make the sky purple" --height 64 --width 64 --output edited.png
"""

from __future__ import annotations

import argparse
import time

from PIL import Image

from engine import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny/qwen-image-edit",
                        help="an edit model: tiny/qwen-image-edit, a folder or hub id")
    parser.add_argument("--image", required=True, help="the image to edit (PNG, JPEG or WebP)")
    parser.add_argument("--prompt", required=True, help="what to change")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--height", type=int, default=None, help="default: the model's")
    parser.add_argument("--width", type=int, default=None, help="default: the model's")
    parser.add_argument("--num-inference-steps", type=int, default=None)
    parser.add_argument("--true-cfg-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", default="edited.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    source = Image.open(args.image).convert("RGB")
    started = time.perf_counter()
    parallel = DiffusionParallelConfig(tensor_parallel_size=args.tensor_parallel_size)
    with Omni(model=args.model, parallel_config=parallel) as omni:
        loaded = time.perf_counter()
        params = OmniDiffusionSamplingParams(
            num_inference_steps=args.num_inference_steps,
            true_cfg_scale=args.true_cfg_scale,
            height=args.height,
            width=args.width,
            seed=args.seed,
        )
        prompt = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "multi_modal_data": {"image": source}}
        output = omni.generate(prompt, params)[0]
        output.images[0].save(args.output)
    print(
        f"saved {args.output} ({output.images[0].width}x{output.images[0].height}, seed {output.seed}); "
        f"load {loaded - started:.2f} s, edit {output.timings['total_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
