"""The ``vitcraft`` command: train, eval, predict, viz, report, serve, export, list-models.

Each subcommand parses its flags and calls the library; a user's mistake
ends with one ``vitcraft: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from vitcraft.errors import VitcraftError

# flag -> (section, key) of the run config; a flag left unset keeps the config file's or default value
TRAIN_FLAGS = {
    "epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "warmup_steps": int,
    "schedule": str, "min_lr": float, "max_steps": int, "label_smoothing": float, "grad_clip": float,
    "seed": int, "precision": str, "device": str, "threads": int, "eval_batch_size": int,
    "auto_augment": str, "random_erasing": float, "mixup_alpha": float, "cutmix_alpha": float, "mix_prob": float,
    "teacher": str, "distillation": str, "distill_alpha": float, "distill_tau": float, "progressive_sizes": list,
}
TRAIN_KEYS = {"lr": "learning_rate", "threads": "num_threads"}
DATA_FLAGS = {"data": str, "data_root": str, "image_size": int, "cache_dir": str}
EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}  # --format -> default file in the run dir


def _add_data_flags(parser: argparse.ArgumentParser, default_note: str) -> None:
    parser.add_argument("--data", help=f"torchvision dataset name (cifar10, cifar100, mnist, fashion-mnist, svhn) "
                                       f"or an ImageFolder folder with train/ and test/ {default_note}")
    parser.add_argument("--data-root", help="where torchvision datasets are downloaded")
    parser.add_argument("--image-size", type=int, help="resize images to this square size")
    parser.add_argument("--cache-dir", help="cache of decoded image folders (default ~/.cache/vitcraft)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitcraft", description="Build, train and look inside Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model (default: the seed tutorial's run on CIFAR-10)")
    _add_data_flags(p, "(default cifar10)")
    p.add_argument("--preset", help="model preset (see list-models; default seed-tiny)")
    p.add_argument("--config", help="YAML or JSON file with sections preset, model, train, data")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --model-arg hidden_size=64 (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--schedule", choices=["constant", "cosine"])
    p.add_argument("--min-lr", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--no-augment", action="store_true", help="no flip and no random crop")
    p.add_argument("--auto-augment", choices=["randaugment", "trivialaugment"],
                   help="a random augmentation policy per image (default: none, as the tutorial)")
    p.add_argument("--random-erasing", type=float, metavar="P", help="erase a random box of each image with "
                                                                     "probability P (DeiT: 0.25)")
    p.add_argument("--mixup-alpha", type=float, metavar="ALPHA", help="MixUp with Beta(ALPHA, ALPHA) (DeiT: 0.8)")
    p.add_argument("--cutmix-alpha", type=float, metavar="ALPHA", help="CutMix with Beta(ALPHA, ALPHA) (DeiT: 1.0)")
    p.add_argument("--mix-prob", type=float, metavar="P", help="probability that a batch is mixed (default 1)")
    p.add_argument("--teacher", metavar="RUN_DIR", help="distil from the model trained in RUN_DIR (DeiT; the "
                                                        "student is best a deit-* preset)")
    p.add_argument("--distillation", choices=["hard", "soft"], help="hard (default): the teacher's top class; "
                                                                    "soft: its distribution")
    p.add_argument("--distill-alpha", type=float, help="weight of the teacher's loss (default 0.5)")
    p.add_argument("--distill-tau", type=float, help="temperature of soft distillation (default 1)")
    p.add_argument("--progressive-sizes", type=_int_list, metavar="N,N,...",
                   help="train at these image sizes in turn, epochs split evenly, e.g. 16,24,32")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing run in --out")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not log scalars to RUN_DIR/tensorboard (logged only if tensorboard is installed)")
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser("eval", help="test loss, top-1/top-5 and per-class accuracy of a run")
    p.add_argument("run_dir")
    _add_data_flags(p, "(default: the run's own data)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_eval)

    p = commands.add_parser("predict", help="top-k classes of image files")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_predict)

    p = commands.add_parser("viz", help="attention overlays for image files or test images")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--method", choices=["cls", "rollout"], default="cls")
    p.add_argument("--layer", type=int, default=-1, help="block index for --method cls (default: last)")
    p.add_argument("--head", default="mean", help="head index or mean (default)")
    p.add_argument("--out", help="output PNG (default RUN_DIR/viz-<method>.png)")
    _add_data_flags(p, "(default: the run's own data)")
    p.set_defaults(handler=cmd_viz)

    p = commands.add_parser("report", help="write RUN_DIR/report.html, one self-contained page")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output HTML (default RUN_DIR/report.html)")
    p.set_defaults(handler=cmd_report)

    p = commands.add_parser("serve", help="a local web page to try the model on your own images "
                                          "(needs pip install 'vitcraft[serve]')")
    p.add_argument("run_dir", help="a run directory, or a model folder written by vitcraft.hub.save_pretrained")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("export", help="write a run's model as ONNX or TorchScript, for inference elsewhere")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=sorted(EXPORT_FILES), default="onnx")
    p.add_argument("--out", help="output file (default RUN_DIR/model.onnx or RUN_DIR/model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=cmd_export)

    p = commands.add_parser("list-models", help="the model presets")
    p.set_defaults(handler=cmd_list_models)
    return parser


# -------------------------------------------------------------------- train
def _int_list(text: str) -> list[int]:
    """'16,24,32' -> [16, 24, 32]; argparse reports the error with the flag's name."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, such as 16,24,32; "
                                         f"got {text!r}") from None


def _parse_model_args(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise VitcraftError(f"--model-arg takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text  # a bare word such as sdpa or gelu
    return overrides


def run_config_from_args(args: argparse.Namespace):
    from vitcraft.train import RunConfig, load_run_config_file

    values = load_run_config_file(args.config) if args.config else {}
    values = {"preset": values.get("preset", "seed-tiny"), "model": dict(values.get("model") or {}),
              "train": dict(values.get("train") or {}), "data": dict(values.get("data") or {})}
    if args.preset:
        values["preset"] = args.preset
    values["model"].update(_parse_model_args(args.model_arg))
    for flag in TRAIN_FLAGS:
        if getattr(args, flag) is not None:
            values["train"][TRAIN_KEYS.get(flag, flag)] = getattr(args, flag)
    if args.grad_checkpointing:
        values["train"]["grad_checkpointing"] = True
    if args.no_augment:
        values["train"].update(flip_p=0.0, crop_scale=None)
    if not values["train"].get("teacher") and {"distillation", "distill_alpha", "distill_tau"} & set(values["train"]):
        raise VitcraftError("distillation settings (--distillation, --distill-alpha, --distill-tau) need a "
                            "teacher: --teacher RUN_DIR")
    for flag in DATA_FLAGS:
        if getattr(args, flag) is not None:
            values["data"][flag] = getattr(args, flag)
    return RunConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> None:
    from vitcraft.train import Distributed, load_run_config, train

    if args.resume:
        out = Path(args.resume)
        run = load_run_config(out)
        if args.epochs is not None:  # the one thing a resumed run may change: train longer
            run.train.epochs = args.epochs
        train(run, out, resume=True, progress=True, figures=not args.no_figures,
              tensorboard=not args.no_tensorboard)
        return
    run = run_config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"{run.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    train(run, out, overwrite=args.overwrite, figures=not args.no_figures, tensorboard=not args.no_tensorboard)
    if Distributed.from_environment().is_main:  # under torchrun, once
        print(f"run saved in {out}")


# -------------------------------------------------------- eval / predict / viz
def _run_test_set(run_dir: Path, args: argparse.Namespace, metadata: dict):
    """The test split a run was trained on, or the one --data names, at the model's image size or --image-size."""
    from vitcraft.data import load_splits
    from vitcraft.train import RUN_CONFIG_FILE, DataConfig, load_run_config

    # a hub-style model folder has no run config: then --data must say which data
    saved = load_run_config(run_dir).data if (run_dir / RUN_CONFIG_FILE).is_file() else DataConfig(data="")
    data = args.data or saved.data
    if not data:
        raise VitcraftError(f"{run_dir} does not say which data it was trained on; pass --data")
    data_root = args.data_root or (saved.data_root if not args.data else None)
    cache_dir = args.cache_dir or saved.cache_dir
    _, test_set = load_splits(data, Path(data_root) if data_root else None,
                              args.image_size or metadata["model_config"]["image_size"],
                              Path(cache_dir) if cache_dir else None)
    if test_set.num_channels != metadata["model_config"]["num_channels"]:
        raise VitcraftError(f"{data} has {test_set.num_channels}-channel images but the model takes "
                            f"{metadata['model_config']['num_channels']}")
    return test_set


def _predictor(run_dir: str, device_name: str):
    """The run directory's (or model folder's) model, ready for images."""
    from vitcraft.device import pick_device
    from vitcraft.inference import load_predictor

    return load_predictor(run_dir, pick_device(device_name))


def _load(run_dir: str, device_name: str):
    predictor = _predictor(run_dir, device_name)
    return predictor.model, predictor.metadata, predictor.normalization, predictor.device


def _allow_image_size(model, image_size: int | None, metadata: dict) -> None:
    """Let the model run at --image-size (a ViT resamples its position embeddings), if one is given."""
    from vitcraft.resize import allow_image_sizes

    if image_size and image_size != metadata["model_config"]["image_size"]:
        allow_image_sizes(model, [image_size], metadata.get("preset", "seed-tiny"))


def cmd_eval(args: argparse.Namespace) -> None:
    from vitcraft.device import autocast_dtype
    from vitcraft.train import evaluate

    model, metadata, normalization, device = _load(args.run_dir, args.device)
    _allow_image_size(model, args.image_size, metadata)
    test_set = _run_test_set(Path(args.run_dir), args, metadata)
    names = metadata["class_names"]
    if len(test_set.class_names) != len(names):
        raise VitcraftError(f"the data has {len(test_set.class_names)} classes but the model {len(names)}")
    result = evaluate(model, test_set, normalization, device, autocast_dtype(device, "fp32"), args.batch_size,
                      progress=True)
    print(f"test images  {len(test_set)}")
    print(f"test loss    {result['loss']:.4f}")
    print(f"top-1        {100 * result['acc']:.2f}%")
    print(f"top-5        {100 * result['top5']:.2f}%")
    print("per-class accuracy:")
    for name, acc in zip(names, result["per_class_acc"]):
        print(f"  {name:<20} {100 * acc:6.2f}%")


def cmd_predict(args: argparse.Namespace) -> None:
    from vitcraft.inference import read_images

    predictor = _predictor(args.run_dir, args.device)
    images = read_images(args.images, predictor.metadata["model_config"])
    for path, top in zip(args.images, predictor.top_k(images, args.top_k)):
        print(path)
        for name, probability in top:
            print(f"  {name:<20} {100 * probability:6.2f}%")


def cmd_viz(args: argparse.Namespace) -> None:
    from vitcraft.figures import (POOLING_TITLE, attention_map_kind, draw_overlays, overlay_examples,
                                  unavailable_map_reason)
    from vitcraft.inference import read_images

    model, metadata, normalization, _ = _load(args.run_dir, "cpu")
    if unavailable_map_reason(model, args.method):  # e.g. Swin: no [CLS] token; say so before loading data
        raise VitcraftError(unavailable_map_reason(model, args.method))
    _allow_image_size(model, args.image_size, metadata)  # for the test images; image files get the model's size
    head = args.head if args.head == "mean" else _int_flag("--head", args.head)
    if args.images:
        images, labels = read_images(args.images, metadata["model_config"]), [None] * len(args.images)
    else:
        test_set = _run_test_set(Path(args.run_dir), args, metadata)
        images, labels = overlay_examples(test_set)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"viz-{args.method}.png"
    what = "attention rollout" if args.method == "rollout" else f"[CLS] attention, block {args.layer}"
    # a pooling model (CCT) has one map per image: --layer and --head do not apply
    title = POOLING_TITLE if attention_map_kind(model) == "pooling" else f"{what}, head {head}"
    try:
        draw_overlays(out, model, images, normalization, metadata["class_names"], labels, args.method,
                      args.layer, head, title=title)
    except ValueError as error:  # layer/head out of range
        raise VitcraftError(str(error)) from None
    print(f"wrote {out}")


def _int_flag(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise VitcraftError(f"{flag} takes an integer or 'mean', got {text!r}") from None


def cmd_report(args: argparse.Namespace) -> None:
    from vitcraft.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from vitcraft.serve import serve
    except ImportError as error:  # the web packages are an optional extra
        raise VitcraftError(f"vitcraft serve needs {error.name}: pip install 'vitcraft[serve]'") from None
    serve(_predictor(args.run_dir, args.device), Path(args.run_dir).resolve().name, args.host, args.port)


def cmd_export(args: argparse.Namespace) -> None:
    from vitcraft import export
    from vitcraft.checkpoint import load_trained_model

    out = Path(args.out) if args.out else Path(args.run_dir) / EXPORT_FILES[args.format]
    if out.exists() and not args.overwrite:
        raise VitcraftError(f"{out} already exists; pass --overwrite to replace it, or another --out")
    model, _ = load_trained_model(args.run_dir)
    write = export.export_onnx if args.format == "onnx" else export.export_torchscript
    print(f"wrote {write(model, out)}")


def cmd_list_models(args: argparse.Namespace) -> None:
    from vitcraft.registry import describe_models

    for name, description in describe_models().items():
        print(f"{name:<20} {description}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (VitcraftError, ValueError, FileNotFoundError) as error:
        print(f"vitcraft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitcraft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
