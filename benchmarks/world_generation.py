"""How fast the shapes world is written: `write_world` of N training images (no val/test) at a given size.

Moved out of the test suite, where a wall-clock bound (200 images at 256 px in under 8 s) failed on a busy
machine. Each repeat writes into a fresh temporary folder; the result is the best and the median time, and the
images per second of the best. The last line is one JSON object.

    python benchmarks/world_generation.py             # 200 images at 256 px, 3 repeats (~0.7 s each)
    python benchmarks/world_generation.py --smoke     # seconds: 20 images at 64 px, one repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from mmbridge.data import shapes_world

SMOKE_KEYS = ("benchmark", "images", "image_size", "repeats", "best_s", "median_s", "images_per_s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="training images (no val or test split)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: 20 images at 64 px, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.image_size, args.repeats = 20, 64, 1
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            shapes_world.write_world(folder, n_train=args.images, n_val=0, n_test=0, image_size=args.image_size)
            times.append(time.perf_counter() - t0)
    result = {
        "benchmark": "world_generation",
        "smoke": args.smoke,
        "images": args.images,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "best_s": round(min(times), 3),
        "median_s": round(statistics.median(times), 3),
        "images_per_s": round(args.images / min(times), 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
