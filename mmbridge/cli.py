"""Command line: `mmbridge train | eval | chat | serve | export | import | demo | report | world | env`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _train(args) -> None:
    from mmbridge.config import load_recipe
    from mmbridge.train.trainer import train

    # every kind (a multimodal LM, or `kind: lcl` vision-encoder pretraining) runs through the same engine
    recipe = load_recipe(args.recipe, args.set + ([f"device={args.device}"] if args.device else []))
    run_dir = Path(args.out or Path("runs") / recipe.name)
    train(recipe, run_dir, resume=args.resume)
    print(f"run directory: {run_dir}")


def _world(args) -> None:
    from mmbridge.config import RecipeError, load_recipe
    from mmbridge.data.sources import world_manifest

    recipe = load_recipe(args.recipe, args.set)
    if not recipe.world:
        raise RecipeError(f"{args.recipe}: the recipe has no `world` section")
    manifest, images = world_manifest(recipe.world)
    print(f"images: {images}")
    for split, tasks in manifest.items():
        for task, path in tasks.items():
            print(f"world/{split}/{task}: {path}")


def _eval(args) -> None:
    from mmbridge.eval.evaluate import evaluate_file
    from mmbridge.runs import load_run

    model, processor = load_run(args.run_dir, device=args.device)
    metrics, rows = evaluate_file(
        model,
        processor,
        args.data,
        args.images,
        args.task,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:  # beside the metrics: each record's prediction, or (choice) every candidate's scores
        Path(args.out).write_text(text + "\n")
        beside = ".scores.jsonl" if args.task == "choice" else ".predictions.jsonl"
        Path(args.out).with_suffix(beside).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _chat(args) -> None:
    from mmbridge.eval.evaluate import generate_answers
    from mmbridge.runs import load_run

    model, processor = load_run(args.run_dir, device=args.device)
    image = Path(args.image).resolve()
    record = {
        "id": "chat",
        "image": image.name,
        "conversations": [{"from": "human", "value": f"<image>\n{args.question}"}, {"from": "gpt", "value": ""}],
    }
    answer = generate_answers(model, processor, [record], image.parent, args.max_new_tokens, 1, progress=False)[0]
    print(answer)
    return answer


def _serve(args) -> None:
    import uvicorn

    from mmbridge.runs import load_run
    from mmbridge.serve.app import create_app
    from mmbridge.serve.guard import LOOPBACK_HOSTS

    loopback = args.host in LOOPBACK_HOSTS or args.host.startswith("127.")
    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else LOOPBACK_HOSTS if loopback else ["*"]
    key = args.api_key or os.environ.get("MMBRIDGE_API_KEY") or None
    if not loopback and key is None:
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
            "model (set MMBRIDGE_API_KEY, and put a TLS reverse proxy in front)",
            file=sys.stderr,
            flush=True,
        )
    model, processor = load_run(args.run_dir, device=args.device)
    name = Path(args.run_dir).resolve().name
    app = create_app(
        model,
        processor,
        name,
        max_batch=args.max_batch,
        max_images=args.max_images,
        max_tokens=args.max_tokens,
        max_image_pixels=args.max_image_pixels,
        max_body=int(args.max_body_mb * 1024 * 1024),
        max_queue=args.max_queue,
        api_key=key,
        allowed_hosts=[h.strip() for h in hosts if h.strip()],
    )
    print(f"serving {args.run_dir} as model {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _export(args) -> None:
    from mmbridge.interop.export import export_run

    export_run(args.run_dir, args.out_dir)
    if args.check:
        from mmbridge.interop.check import check_export

        check_export(args.run_dir, args.out_dir, args.check)


def _import(args) -> None:
    from mmbridge.interop.llava_import import import_llava

    import_llava(args.src, args.out_dir)


def _demo(args) -> None:
    from mmbridge.demo import run_demo

    overrides = args.set + ([f"device={args.device}"] if args.device else [])
    run_demo(quick=args.quick, out=args.out, overrides=overrides, export=not args.no_export, recipe_name=args.recipe)


def _report(args) -> None:
    from mmbridge.eval.report import ReportError, write_report

    try:
        print(f"report: {write_report(args.run_dir, args.out)}")
    except ReportError as e:  # not a run directory, or a file in it that cannot be read: named in the message
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _env(args) -> None:
    from mmbridge.machine import describe, report

    print(json.dumps(describe()) if args.json else report())


def _device_flag(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument(
        "--device",
        default=default,
        metavar="DEVICE",
        help="auto (this process's GPU if CUDA is available, else CPU), cpu, cuda or cuda:N"
        + ("" if default else "; overrides the recipe's `device`"),
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="mmbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML recipe")
    p.add_argument("recipe", help="recipe YAML file (or a bundled recipe name, e.g. demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    _device_flag(p, default=None)
    p.set_defaults(fn=_train)

    p = sub.add_parser("eval", help="evaluate a run on a LLaVA-format JSON file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument(
        "--task",
        required=True,
        choices=["caption", "vqa", "grounding", "choice"],
        help="choice: rank candidate answers by log-likelihood, no generation",
    )
    p.add_argument("--out", help="write the metrics JSON here (and predictions beside it)")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    _device_flag(p)
    p.set_defaults(fn=_eval)

    p = sub.add_parser("chat", help="ask a trained run about an image")
    p.add_argument("run_dir")
    p.add_argument("--image", required=True)
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    _device_flag(p)
    p.set_defaults(fn=_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server for a trained run")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $MMBRIDGE_API_KEY; the environment keeps the "
        "key out of the process list other users can read)",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAME,...",
        help="Host header names to answer (against DNS rebinding; '*.example.com' for subdomains, '*' for "
        "any); default localhost,127.0.0.1,::1 on a loopback address, else any",
    )
    p.add_argument("--max-batch", type=int, default=8, help="decode up to this many waiting requests together")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 503 with Retry-After"
    )
    p.add_argument("--max-images", type=int, default=4, help="images allowed in one request")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="each image's pixels, read from its header before it is decoded",
    )
    p.add_argument("--max-body-mb", type=float, default=20.0, help="the largest request body, in MiB (413 beyond)")
    p.add_argument("--max-tokens", type=int, default=256, help="the longest reply (a request may ask for fewer)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _device_flag(p)
    p.set_defaults(fn=_serve)

    p = sub.add_parser("export", help="write a run as a stock transformers LLaVA folder (LoRA merged)")
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="a new folder (an existing non-empty one is refused)")
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="then answer N held-out questions of the recipe's first eval set with transformers' generate "
        "and with mmbridge, side by side",
    )
    p.set_defaults(fn=_export)

    p = sub.add_parser("import", help="turn a transformers LLaVA folder into a run directory")
    p.add_argument("src", help="a LlavaForConditionalGeneration folder (config, safetensors, processor files)")
    p.add_argument("out_dir", help="the new run directory (an existing non-empty one is refused)")
    p.set_defaults(fn=_import)

    p = sub.add_parser("demo", help="the bundled pretraining run on CPU, then a results table")
    p.add_argument("--quick", action="store_true", help="a handful of steps, for a first look and tests")
    p.add_argument("--out", default=None, help="run directory (default runs/demo or runs/demo-quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--no-export", action="store_true", help="skip the stock transformers export (RUN/export) and its check"
    )
    p.add_argument(
        "--recipe", default="demo", help="another bundled recipe on the demo's world and eval sets (e.g. objects)"
    )
    _device_flag(p, default=None)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("report", help="one self-contained HTML page about a run: recipe, curves, eval, examples")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="the HTML file to write (default RUN/report.html)")
    p.set_defaults(fn=_report)

    p = sub.add_parser("world", help="generate (once) and list the shapes world of a recipe: its images and files")
    p.add_argument("recipe", help="recipe YAML file or a bundled recipe name (e.g. demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(fn=_world)

    p = sub.add_parser("env", help="the machine and software versions (paste into a bug report)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(fn=_env)

    args = parser.parse_args(argv)
    from mmbridge.config import RecipeError
    from mmbridge.data.images import ImageError
    from mmbridge.data.llava import DataError
    from mmbridge.interop import InteropError
    from mmbridge.train.checkpoint import CheckpointError

    try:
        return args.fn(args)
    except (RecipeError, DataError, ImageError, FileNotFoundError, InteropError) as e:  # the user's input, not our bug
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, FloatingPointError) as e:  # disk, run directory, or a diverged run: said plainly
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
