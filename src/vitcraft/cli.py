"""The ``vitcraft`` command: train, pretrain, eval, predict, viz, report, serve, export, list-models.

Each subcommand parses its flags and calls the library; a user's mistake
ends with one ``vitcraft: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

from vitcraft.config import DataConfig, PretrainConfig, TrainConfig, default_of
from vitcraft.errors import VitcraftError

EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}  # --format -> default file in the run dir
# what `train --resume` takes: it continues a run with the settings the run was started with, trained longer
RESUME_FLAGS = ("resume", "epochs", "no_figures", "no_tensorboard")
# the DataConfig flags of eval and viz
DATA_SOURCE_FIELDS = ("data", "data_root", "image_size", "cache_dir", "cache", "workers", "skip_bad_images")
METAVARS = {int: "N", float: "X"}
PREDICTION_FORMATS = (".csv", ".jsonl")  # the suffixes `predict --output` writes
SKIPPED_NAMES = 10  # at most this many skipped files are named; the rest are counted


# ------------------------------------------------------- flags from config fields
def flag_name(spec: dataclasses.Field) -> str:
    """The command-line flag of a config field: ``--batch-size`` for batch_size, unless it names its own."""
    return "--" + (spec.metadata.get("flag") or spec.name.replace("_", "-"))


def _shown(value: Any) -> str:
    """A default as a user types it on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _flag_help(spec: dataclasses.Field, default: Any, default_note: str | None) -> str:
    shown = default_note or (spec.metadata.get("none_means") if default is None else _shown(default))
    text = spec.metadata["help"] + (f" (default: {shown})" if shown else "")
    if spec.metadata.get("flag"):  # a --config file names the field
        text += f"; {spec.name} in a --config file"
    return text.replace("%", "%%")  # argparse formats help with %


def _list_parser(item: type):
    """'16,24,32' -> [16, 24, 32]; argparse reports the error with the flag's name."""
    example, kind = ("16,24,32", "integers") if item is int else ("0.8,1.0", "numbers")

    def parse(text: str) -> list:
        try:
            return [item(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} separated by commas, such as {example}; "
                                             f"got {text!r}") from None
    return parse


def _parsing(spec: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's type, choices, action and metavar for a field annotated ``hint``."""
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]  # X | None -> X
    kind, metavar = kinds[0], spec.metadata.get("metavar")
    if len(kinds) != 1:
        raise TypeError(f"no command-line flag for {spec.name}: {hint}")
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}  # --x / --no-x, so a flag can undo a --config file
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return {"type": _list_parser(item), "metavar": metavar or f"{METAVARS[item]},{METAVARS[item]},..."}
    if spec.metadata.get("choices"):
        return {"choices": spec.metadata["choices"]}
    if kind not in (int, float, str):
        raise TypeError(f"no command-line flag for {spec.name}: {hint}")
    return {"type": kind, "metavar": metavar or METAVARS.get(kind)}


def add_setting_flag(parser, cls: type, name: str, flag: str | None = None, default_note: str | None = None,
                     use_default: bool = False) -> None:
    """A flag setting field ``name`` of config dataclass ``cls``, with the field's help, type and choices.

    The parsed value lands in ``args.<name>``. It is None when the flag is not given, so that a --config file's
    value or the field's default stays, unless ``use_default``: then the field's default is the flag's.
    ``default_note`` replaces the default shown in the help (where the default is not the field's).
    """
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = default_of(cls, name)
    parser.add_argument(f"--{flag}" if flag else flag_name(spec), dest=name, default=default if use_default else None,
                        help=_flag_help(spec, default, default_note),
                        **_parsing(spec, typing.get_type_hints(cls)[name]))


def add_setting_flags(parser, cls: type, names: tuple[str, ...] | None = None,
                      default_note: str | None = None) -> None:
    """A flag per field of ``cls`` (or of those in ``names``), see add_setting_flag."""
    for spec in dataclasses.fields(cls):
        if names is None or spec.name in names:
            add_setting_flag(parser, cls, spec.name, default_note=default_note)


def settings_given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given, by field name."""
    return {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)
            if getattr(args, spec.name, None) is not None}


def add_run_flags(p: argparse.ArgumentParser, run_config: type, command: str, default_recipe: str) -> None:
    """The flags of train and pretrain: the run's, the model's, the recipe's (TrainConfig) and the data's."""
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", help="YAML or JSON file with the sections preset, model, train, "
                                                      "data" + (" and pretrain" if command == "pretrain" else "")
                                                      + "; keys are the flags' names with underscores")
    run.add_argument("--recipe", metavar="NAME", help="start from a named recipe (model and settings; "
                                                      "`vitcraft list-recipes`); --config and flags override it "
                                                      f"(default: {default_recipe})")
    run.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<preset>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint, with its "
                                                         "own settings; only --epochs may change")
    run.add_argument("--overwrite", action="store_true", help="replace the files of an existing run in --out")
    run.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    run.add_argument("--no-tensorboard", action="store_true",
                     help="do not log scalars to RUN_DIR/tensorboard (logged only if tensorboard is installed)")
    model = p.add_argument_group("model")
    add_setting_flag(model, run_config, "preset")
    add_setting_flag(model, run_config, "init")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model config field, e.g. --model-arg hidden_size=64 (repeatable)")
    recipe = p.add_argument_group("recipe (the train section of --config)")
    add_setting_flags(recipe, TrainConfig)
    recipe.add_argument("--no-augment", action="store_true", help="no flip and no random crop "
                                                                  "(flip_p 0, crop_scale null)")
    add_setting_flags(p.add_argument_group("data (the data section of --config)"), DataConfig)


def build_parser() -> argparse.ArgumentParser:
    from vitcraft.recipes import DEFAULT_RECIPE, PRETRAIN_RECIPE
    from vitcraft.runs import RunConfig  # the --preset flag; runs.py imports torch, which the CLI needs anyway

    parser = argparse.ArgumentParser(prog="vitcraft", description="Build, train and look inside Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model (default: the seed tutorial's run on CIFAR-10)",
                            description="Train a model and write its run directory. A flag left out keeps the "
                                        "--config file's value, else the default shown.")
    add_run_flags(p, RunConfig, "train", DEFAULT_RECIPE)
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser("pretrain", help="self-supervised pretraining of a ViT without labels (masked "
                                             "autoencoders); fine-tune it after with train --init RUN_DIR",
                            description="Pretrain a ViT's encoder as a masked autoencoder (He et al. 2021) and write "
                                        "its run directory, as train does; the labels are not used. A flag left out "
                                        "keeps the --config file's value, else the default shown.")
    add_run_flags(p, RunConfig, "pretrain", PRETRAIN_RECIPE)
    add_setting_flags(p.add_argument_group("pretraining (the pretrain section of --config)"), PretrainConfig)
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser("eval", help="test loss, top-1/top-5 and per-class accuracy of a run")
    p.add_argument("run_dir")
    add_setting_flags(p, DataConfig, DATA_SOURCE_FIELDS, default_note="the run's")
    add_setting_flag(p, TrainConfig, "eval_batch_size", flag="batch-size", use_default=True)
    add_setting_flag(p, TrainConfig, "device", use_default=True)
    p.add_argument("--onnx", metavar="FILE", help="score this file exported by `vitcraft export` (fp32 or int8) in "
                                                  "onnxruntime instead of the run's PyTorch model")
    p.add_argument("--tta-flip", action="store_true", help="test-time flip averaging: each image's prediction "
                                                           "averages its class probabilities with its mirror image's")
    p.set_defaults(handler=cmd_eval)

    p = commands.add_parser("predict", help="top-k classes of image files, or of every image in folders")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", metavar="PATH", help="an image file, or a folder: every image in its tree")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown per image (default: 5)")
    p.add_argument("--output", metavar="FILE", help="write the predictions to FILE, a .csv or .jsonl file, "
                                                    "instead of printing them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_setting_flag(p, TrainConfig, "eval_batch_size", flag="batch-size", use_default=True)
    add_setting_flag(p, TrainConfig, "device", use_default=True)
    p.set_defaults(handler=cmd_predict)

    p = commands.add_parser("viz", help="attention overlays for image files or test images")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--method", choices=["cls", "rollout"], default="cls")
    p.add_argument("--layer", type=int, default=-1, help="block index for --method cls (default: last)")
    p.add_argument("--head", default="mean", help="head index or mean (default)")
    p.add_argument("--out", help="output PNG (default RUN_DIR/viz-<method>.png)")
    add_setting_flags(p, DataConfig, DATA_SOURCE_FIELDS, default_note="the run's")
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
    add_setting_flag(p, TrainConfig, "device", use_default=True)
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser("export", help="write a run's model as ONNX or TorchScript, for inference elsewhere")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=sorted(EXPORT_FILES), default="onnx")
    p.add_argument("--out", help="output file (default RUN_DIR/model.onnx, RUN_DIR/model-int8.onnx with "
                                 "--quantize int8, or RUN_DIR/model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quantize", choices=["int8"], help="quantise the ONNX graph with onnxruntime (needs onnxruntime)")
    p.add_argument("--int8-method", choices=["static", "dynamic"], default="dynamic",
                   help="dynamic: int8 weights, activations quantised per batch (default: as accurate as static "
                        "here, and faster in onnxruntime; docs/deploy.md); static: int8 activations too, their "
                        "ranges calibrated on training images")
    p.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="training images that calibrate static int8 (default 256)")
    add_setting_flags(p, DataConfig, DATA_SOURCE_FIELDS, default_note="the run's")
    p.set_defaults(handler=cmd_export)

    p = commands.add_parser("list-models", help="the model presets")
    p.set_defaults(handler=cmd_list_models)
    p = commands.add_parser("list-recipes", help="the training recipes, with what they measured")
    p.set_defaults(handler=cmd_list_recipes)
    return parser


# -------------------------------------------------------------------- train
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
    from vitcraft.recipes import DEFAULT_RECIPE, PRETRAIN_RECIPE, get_recipe
    from vitcraft.runs import RunConfig, load_run_config_file

    values = loaded = load_run_config_file(args.config) if args.config else {}
    if (args.init or values.get("init")) and (args.preset or values.get("preset")):
        raise VitcraftError("--init decides the model's shape from its source; leave out --preset (or the config "
                            "file's preset) with it")
    # the recipe is the bottom layer, under the --config file and then the flags; with --init the source decides
    # the model, so only the recipe's training settings apply
    pretraining = args.command == "pretrain"
    recipe = get_recipe(getattr(args, "recipe", None) or (PRETRAIN_RECIPE if pretraining else DEFAULT_RECIPE),
                        pretrain=pretraining)
    init = args.init or values.get("init")
    given = {**(values.get("train") or {}), **settings_given(args, TrainConfig)}
    train = {**recipe.train, **given}
    if "warmup_steps" in given and "warmup_fraction" not in given:
        train.pop("warmup_fraction", None)  # a warmup given in steps replaces the recipe's fraction
    values = {"preset": args.preset or values.get("preset") or (default_of(RunConfig, "preset") if init
                                                                 else recipe.preset),
              "init": init,
              "model": {**({} if init else recipe.model_for(train.get("budget"))), **(values.get("model") or {}),
                        **_parse_model_args(args.model_arg)},
              "train": train,
              "data": {**(values.get("data") or {}), **settings_given(args, DataConfig)},
              "pretrain": {**(values.get("pretrain") or {}), **settings_given(args, PretrainConfig)}
              if pretraining else None}
    if values["pretrain"] is None and "pretrain" in (loaded or {}):
        raise VitcraftError(f"{args.config} has a pretrain section: run it with vitcraft pretrain")
    if args.no_augment:
        if args.flip_p is not None or args.crop_scale is not None:
            raise VitcraftError("--no-augment turns the flip and the crop off; leave out --flip-p and --crop-scale "
                                "with it")
        values["train"].update(flip_p=0.0, crop_scale=None)
    if not values["train"].get("teacher") and {"distillation", "distill_alpha", "distill_tau"} & set(values["train"]):
        raise VitcraftError("distillation settings (--distillation, --distill-alpha, --distill-tau) need a "
                            "teacher: --teacher RUN_DIR")
    return RunConfig.from_dict(values)


def flags_resume_ignores(args: argparse.Namespace) -> list[str]:
    """The flags given with `train --resume` that would not change the resumed run, as typed."""
    defaults = vars(build_parser().parse_args([args.command]))
    names = {spec.name: flag_name(spec) for cls in (TrainConfig, DataConfig, PretrainConfig)
             for spec in dataclasses.fields(cls)}
    return [names.get(dest, "--" + dest.replace("_", "-")) for dest, value in vars(args).items()
            if dest not in RESUME_FLAGS and value != defaults[dest]]


def cmd_train(args: argparse.Namespace) -> None:
    from vitcraft.runs import load_run_config
    from vitcraft.train import Distributed, train

    if args.resume:
        ignored = flags_resume_ignores(args)
        if ignored:
            raise VitcraftError(f"--resume continues {args.resume} with the settings it was started with, so it "
                                f"does not take {', '.join(ignored)}; only --epochs may change (to train longer)")
        out = Path(args.resume)
        run = load_run_config(out)
        if (run.pretrain is not None) != (args.command == "pretrain"):
            other = "pretrain" if run.pretrain is not None else "train"
            raise VitcraftError(f"{out} is a {other} run: continue it with vitcraft {other} --resume {out}")
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
    """The test split a run was trained on, or the one --data names (see _run_splits)."""
    return _run_splits(run_dir, args, metadata)[1]


def _run_splits(run_dir: Path, args: argparse.Namespace, metadata: dict):
    """(train, test) splits a run was trained on, or those --data names, at the model's image size or --image-size.

    Prepared with the model's crop_pct (its metadata's), so eval sees exactly what training evaluated on.
    """
    from vitcraft.data import load_splits
    from vitcraft.device import available_cpus
    from vitcraft.runs import load_run_config, run_config_path

    # a hub-style model folder has no run config: then --data must say which data
    saved = load_run_config(run_dir).data if run_config_path(run_dir) else DataConfig(data="")
    data = args.data or saved.data
    if not data:
        raise VitcraftError(f"{run_dir} does not say which data it was trained on; pass --data")
    data_root = args.data_root or (saved.data_root if not args.data else None)
    cache_dir = args.cache_dir or saved.cache_dir

    def given_or_saved(name: str):
        given = getattr(args, name, None)
        return given if given is not None else getattr(saved, name)

    train_set, test_set = load_splits(data, Path(data_root) if data_root else None,
                                      args.image_size or metadata["model_config"]["image_size"],
                                      Path(cache_dir) if cache_dir else None, crop_pct=metadata.get("crop_pct"),
                                      stream=not given_or_saved("cache"),
                                      skip_bad_images=given_or_saved("skip_bad_images"),
                                      workers=given_or_saved("workers") or available_cpus())
    if test_set.num_channels != metadata["model_config"]["num_channels"]:
        raise VitcraftError(f"{data} has {test_set.num_channels}-channel images but the model takes "
                            f"{metadata['model_config']['num_channels']}")
    return train_set, test_set


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
    if args.onnx:  # the exported graph instead, on the CPU, with the run's data and normalisation
        import torch

        from vitcraft.export import OnnxModel

        if args.image_size:
            raise VitcraftError("an ONNX file takes the image size it was exported at; leave out --image-size")
        model, device = OnnxModel(args.onnx, expected=metadata["model_config"]), torch.device("cpu")
    _allow_image_size(model, args.image_size, metadata)
    test_set = _run_test_set(Path(args.run_dir), args, metadata)
    names = metadata["class_names"]
    if len(test_set.class_names) != len(names):
        raise VitcraftError(f"the data has {len(test_set.class_names)} classes but the model {len(names)}")
    result = evaluate(model, test_set, normalization, device, autocast_dtype(device, "fp32"), args.eval_batch_size,
                      progress=True, flip=args.tta_flip)
    print(f"test images  {len(test_set)}")
    print(f"test loss    {result['loss']:.4f}")
    print(f"top-1        {100 * result['acc']:.2f}%")
    print(f"top-5        {100 * result['top5']:.2f}%")
    print("per-class accuracy:")
    for name, acc in zip(names, result["per_class_acc"]):
        print(f"  {name:<20} {100 * acc:6.2f}%")


def cmd_predict(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from vitcraft.files import atomic_write
    from vitcraft.inference import find_files

    out = _predictions_file(args.output, args.overwrite) if args.output else None
    predictor = _predictor(args.run_dir, args.device)
    files = find_files(args.paths)
    if out is not None:  # an earlier --output in a folder being read is not an input
        files = [path for path in files if path.resolve() != out.resolve()]
    if not files:
        raise VitcraftError(f"found no files in {', '.join(args.paths)}")
    predictions = _predict_files(predictor, files, args.top_k, args.eval_batch_size)
    if out is None:
        for path, top in predictions:  # tqdm.write keeps the progress bar below the lines
            tqdm.write("\n".join([str(path), *(f"  {name:<20} {100 * p:6.2f}%" for name, p in top)]))
    else:
        atomic_write(out, lambda tmp: _write_predictions(tmp, out.suffix.lower(), predictions))
        print(f"wrote {out}")


def _predictions_file(output: str, overwrite: bool) -> Path:
    """The --output path, once its suffix names a format and it replaces nothing that --overwrite does not allow."""
    out = Path(output)
    if out.suffix.lower() not in PREDICTION_FORMATS:
        suffix = repr(out.suffix) if out.suffix else "no suffix"
        raise VitcraftError(f"--output {out}: its suffix chooses the format, {' or '.join(PREDICTION_FORMATS)}; "
                            f"got {suffix}")
    if out.is_dir():
        raise VitcraftError(f"--output {out} is a folder; name a file in it")
    if out.exists() and not overwrite:
        raise VitcraftError(f"{out} already exists; pass --overwrite to replace it, or another --output")
    return out


def _predict_files(predictor, files: list[Path], k: int, batch_size: int):
    """(path, top-k) per image among ``files``, with a progress bar on a terminal.

    Afterwards the files that are not images are named on stderr; if no file
    was an image, that is a VitcraftError instead.
    """
    from tqdm import tqdm

    skipped, found = [], 0
    with tqdm(total=len(files), desc="predict", unit="file", leave=False, disable=not sys.stderr.isatty()) as bar:
        def skip(path: Path, error: VitcraftError) -> None:
            skipped.append((path, error))
            bar.update()

        for path, top in predictor.predict_files(files, k, batch_size, on_skip=skip):
            found += 1
            bar.update()
            yield path, top
    if not found:  # one error line, with the first file's reason
        raise VitcraftError(f"found no images to predict: {_skipped_note(skipped)} ({skipped[0][1]})")
    if skipped:
        print(f"vitcraft: {_skipped_note(skipped)}", file=sys.stderr)


def _skipped_note(skipped: list[tuple[Path, VitcraftError]]) -> str:
    """'skipped 2 files that are not images: a.txt, b.bin', naming at most SKIPPED_NAMES files."""
    names = [str(path) for path, _ in skipped[:SKIPPED_NAMES]]
    if len(skipped) > SKIPPED_NAMES:
        names.append(f"and {len(skipped) - SKIPPED_NAMES} more")
    what = "1 file that is not an image" if len(skipped) == 1 else f"{len(skipped)} files that are not images"
    return f"skipped {what}: {', '.join(names)}"


def _write_predictions(path: str, kind: str, predictions) -> None:
    """Write (path, top-k) pairs to ``path`` as ``kind`` (".csv" or ".jsonl"), probabilities unrounded."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        if kind == ".jsonl":
            for file, top in predictions:
                record = {"file": str(file), "top": [{"class": name, "probability": p} for name, p in top]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        writer = csv.writer(f)
        for row, (file, top) in enumerate(predictions):
            if row == 0:  # top_k clips k to the number of classes, so the first row says how many columns
                writer.writerow(["file", *(f"{column}_{rank}" for rank in range(1, len(top) + 1)
                                           for column in ("class", "prob"))])
            writer.writerow([str(file), *(value for pair in top for value in pair)])


def cmd_viz(args: argparse.Namespace) -> None:
    from vitcraft.attention_maps import POOLING_TITLE, attention_map_kind, unavailable_map_reason
    from vitcraft.inference import read_images
    from vitcraft.plots import draw_overlays, overlay_examples

    model, metadata, normalization, _ = _load(args.run_dir, "cpu")
    if unavailable_map_reason(model, args.method):  # e.g. Swin: no [CLS] token; say so before loading data
        raise VitcraftError(unavailable_map_reason(model, args.method))
    _allow_image_size(model, args.image_size, metadata)  # for the test images; image files get the model's size
    head = args.head if args.head == "mean" else _int_flag("--head", args.head)
    if args.images:
        images, labels = read_images(args.images, metadata), [None] * len(args.images)
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

    if args.quantize and args.format != "onnx":
        raise VitcraftError("--quantize int8 quantises an ONNX graph: use it with --format onnx")
    default = "model-int8.onnx" if args.quantize else EXPORT_FILES[args.format]
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    if out.exists() and not args.overwrite:
        raise VitcraftError(f"{out} already exists; pass --overwrite to replace it, or another --out")
    model, metadata, normalization, _ = _load(args.run_dir, "cpu")  # a run directory or a model folder
    if args.format == "torchscript":
        print(f"wrote {export.export_torchscript(model, out)}")
        return
    if not args.quantize:
        print(f"wrote {export.export_onnx(model, out)}")
        return
    calibration = None
    if args.int8_method == "static":
        train_set, test_set = _run_splits(Path(args.run_dir), args, metadata)
        calibration = export.calibration_images(train_set, normalization, args.calibration_images,
                                                test_set.image_size)
    written = export.export_int8(model, out, args.int8_method, calibration)
    how = f"calibrated on {len(calibration)} training images" if calibration is not None else "no calibration"
    print(f"wrote {written} (int8, {args.int8_method}: {how})")


def cmd_list_recipes(args: argparse.Namespace) -> None:
    from vitcraft.recipes import RECIPES

    for name, recipe in RECIPES.items():
        print(f"{name:<16} {recipe.preset:<16} {recipe.description}")


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
    except BrokenPipeError:  # the reader of the output went away (`vitcraft list-recipes | head -1`)
        # stop quietly, as Unix tools do; stdout goes to devnull so that Python's flush at exit fails no more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
