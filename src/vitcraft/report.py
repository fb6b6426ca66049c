"""One self-contained HTML page describing a training run: ``write_report(run_dir)``.

The page reads what a run directory holds:

* ``run.json`` (required; ``config.json`` in runs of older versions), as
  training writes it: ``{"run": {"preset", "model", "train": {...},
  "data": {...}}, "model_config": {...ViTConfig fields...},
  "class_names": [...], "num_parameters": N, ...}``. Every dict becomes a table
  (a dict inside a section gets its own, e.g. "run / train"), the loose
  top-level values one more; ``"num_parameters"`` is the parameter count, else
  the model is built from ``"model_config"`` (or ``"model"``) and counted;
* ``metrics.jsonl``: one JSON object per epoch (optional);
* ``samples.png``, ``curves.png``, ``attention.png``, ``rollout.png``,
  ``confusion.png``, ``reconstruction.png`` (each optional, from :mod:`vitcraft.plots`).

Figures are embedded as base64 data URIs and the CSS is inline, so the file
opens anywhere, offline, and can be mailed or archived on its own. Every piece
of text from the run (names, config values) goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Callable

import torch

from vitcraft.hub import CONFIG_NAME, METADATA_KEY, model_fields
from vitcraft.model import ViTForClassification, count_parameters
from vitcraft.runs import METRICS_FILE, RUN_CONFIG_FILE, run_config_path

# (file, heading, what it shows and how to read it), in page order
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("samples.png", "Training samples",
     "Up to sixteen training images exactly as the model receives them, after data augmentation "
     "(such as random crops and flips), with the normalisation undone so the colours look "
     "normal again. Each title is the image's label. Check that the pictures still show their "
     "class: if augmentation crops the object away or the labels look wrong, the model is "
     "learning from bad examples. Small images (for example CIFAR's 32 x 32 pixels) look "
     "blocky when enlarged; that is the data, not a bug."),
    ("curves.png", "Training curves",
     "Left: the average cross-entropy loss on the training set and on the test set after each "
     "epoch; lower is better. Middle: the share of test images classified correctly, in percent. "
     "Right: the learning rate the optimizer used at every step (the schedule). Both losses "
     "falling together means the model is still learning; the test loss rising while the "
     "training loss keeps falling means it is starting to memorise the training set "
     "(overfitting). The training loss is measured with augmentation and dropout switched on, "
     "so early on it can sit above the test loss. An accuracy curve that has flattened out says "
     "that more epochs of the same schedule will help little. A pretraining run has no accuracy: its "
     "losses are the masked autoencoder's mean squared error on the hidden patches, and the middle "
     "panel is the learning rate."),
    ("attention.png", "Where [CLS] looks (last layer)",
     "Up to ten test images, each overlaid with the attention that the [CLS] token (the token whose "
     "output is classified) pays to every image patch in the last transformer block, averaged "
     "over the attention heads and enlarged to the image size. Red marks the patches it attends "
     "to most, blue the least; every image is coloured on its own scale, so compare where the "
     "attention goes, not how strong it is between images. Titles give the true class (GT) and "
     "the prediction: green when they agree, red when the model was wrong. A trained model "
     "usually looks at the object rather than the background; an untrained one gives noisy maps. "
     "Attention shows where information is read from, which hints at, but does not fully "
     "explain, the decision."),
    ("rollout.png", "Attention rollout (all layers)",
     "The same images with attention rollout. In the last layer, [CLS] attends to tokens that "
     "earlier layers have already mixed with other patches, so a single layer's map can point "
     "at the wrong place. Rollout follows the mixing through every block: it averages the heads, "
     "adds the identity for the residual (skip) connection, and multiplies the attention "
     "matrices of all layers. The map shows how much each patch, through all the layers, "
     "flows into [CLS]. It is usually smoother and more object-shaped than the single-layer "
     "map. Colours and titles read as above."),
    ("confusion.png", "Confusion matrix",
     "Every test image counted once: its row is the true class, its column the predicted class. "
     "The diagonal holds the correct predictions; the percentage next to each row name is that "
     "class's accuracy (its diagonal cell divided by its row total). Dark cells off the "
     "diagonal show which classes the model mixes up, typically ones that look alike at low "
     "resolution (in CIFAR-10, cat and dog, or car and truck)."),
    ("reconstruction.png", "What the masked autoencoder reconstructs (pretraining runs)",
     "Eight test images, one per row. First the original; then the masked input, the only patches the encoder "
     "saw (the hidden ones grey, three in four by default, chosen at random but the same every time the figure "
     "is drawn); then the decoder's prediction of every patch; last that prediction with the visible patches "
     "pasted back, which shows how the guessed patches fit around the seen ones. The loss is computed only on "
     "the hidden patches, so the prediction of a visible patch is never trained and may look wrong. Expect "
     "blurry guesses: the squared error rewards the average of what could be there, and the point of "
     "pretraining is not sharp pictures but an encoder that has learned what images are made of. With "
     "norm_pix_loss the decoder predicts each patch's pixels normalised by their own mean and variance; the "
     "figure maps them back with the original patch's statistics, as the MAE paper's figures do. A prediction "
     "that is one flat colour everywhere means the model has not learned yet."),
)


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


# metrics.jsonl key -> (column heading, value formatter); columns appear in this order
METRIC_COLUMNS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "epoch": ("epoch", str),
    "step": ("step", str),
    "train_loss": ("train loss", _fixed(4)),
    "train_acc": ("train accuracy", _percent),
    "test_loss": ("test loss", _fixed(4)),
    "test_acc": ("test accuracy", _percent),
    "test_top5": ("test top-5", _percent),
    "lr": ("learning rate", lambda value: f"{value:.2e}"),
    "epoch_seconds": ("seconds / epoch", _fixed(1)),
    "train_seconds": ("training seconds", _fixed(1)),
    "images_per_second": ("images / second", lambda value: f"{value:,.0f}"),
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
.configs { display: flex; flex-wrap: wrap; gap: 0 2em; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
.missing { color: #888; font-style: italic; }
.summary { background: #f7f7f7; border-left: 4px solid #4a7; padding: .5em 1em; }
"""


def write_report(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Write one self-contained HTML page about the run in ``run_dir``; return its path.

    ``out_path`` defaults to ``run_dir / "report.html"``. Raises
    FileNotFoundError (naming the path) when ``run_dir`` or its run.json
    is missing; missing metrics or figures are noted on the page instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    config_path = run_config_path(run_dir)
    if config_path is not None:
        config = json.loads(config_path.read_text())
    elif (run_dir / CONFIG_NAME).is_file():  # a model folder (save_pretrained): its model config and metadata
        config = json.loads((run_dir / CONFIG_NAME).read_text())
        config = {"model": model_fields(config), **config.get(METADATA_KEY, {})}
    else:
        raise FileNotFoundError(f"{RUN_CONFIG_FILE} not found: {run_dir / RUN_CONFIG_FILE}")
    metrics = read_metrics(run_dir / METRICS_FILE)
    run_name = run_dir.resolve().name

    body = [f"<h1>vitcraft run: {_esc(run_name)}</h1>",
            _summary(config, metrics),
            "<h2>Configuration</h2>", _config_tables(config),
            "<h2>Metrics per epoch</h2>", _metrics_table(metrics),
            "<h2>Figures</h2>"]
    body += [_figure(run_dir / name, heading, text) for name, heading, text in FIGURES]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>vitcraft run {_esc(run_name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")

    out_path = Path(out_path) if out_path is not None else run_dir / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics.jsonl file ([] if it does not exist); blank lines skipped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    return records


def parameter_count(config: dict[str, Any]) -> int:
    """Trainable parameters: config["num_parameters"] if recorded, else counted on the built model.

    The model is built on the "meta" device: shapes only, no memory and no
    initialisation work, so even a large model counts instantly.
    """
    if config.get("num_parameters") is not None:
        return int(config["num_parameters"])
    with torch.device("meta"):
        model = ViTForClassification(config.get("model_config", config.get("model", {})))
    return count_parameters(model)


# --------------------------------------------------------------------------- page parts
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _summary(config: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    """A short paragraph: parameter count, epochs run, best and final test accuracy."""
    try:
        parameters = f"{parameter_count(config):,}"
    except (ValueError, TypeError) as error:  # a config this version cannot build
        parameters = f"unknown (the model could not be built: {error})"
    lines = [f"<b>Trainable parameters:</b> {_esc(parameters)}"]
    accuracies = [(m["test_acc"], m.get("epoch", i + 1)) for i, m in enumerate(metrics)
                  if m.get("test_acc") is not None]
    if metrics:
        lines.append(f"<b>Epochs recorded:</b> {len(metrics)}")
    if accuracies:
        best, best_epoch = max(accuracies, key=lambda pair: pair[0])
        lines.append(f"<b>Test accuracy:</b> best {_esc(_percent(best))} (epoch {_esc(best_epoch)}), "
                     f"final {_esc(_percent(accuracies[-1][0]))}")
    return '<p class="summary">' + "<br>\n".join(lines) + "</p>"


def _config_value(value: Any) -> str:
    """Show strings as they are, lists of scalars comma-separated, everything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    return json.dumps(value)


def _table(rows: list[tuple[Any, Any]], header: tuple[str, str] = ("setting", "value")) -> str:
    cells = "\n".join(f"<tr><th>{_esc(key)}</th><td>{_esc(_config_value(value))}</td></tr>"
                      for key, value in rows)
    return (f"<table>\n<tr><th>{_esc(header[0])}</th><th>{_esc(header[1])}</th></tr>\n"
            f"{cells}\n</table>")


def _config_tables(config: dict[str, Any]) -> str:
    """One table per dict of config.json, nested ones titled by their path ("run / train"),
    then one for the loose top-level values. Empty dicts stay a "{}" row of their parent."""
    parts = []

    def add(title: str, values: dict[str, Any]) -> None:
        rows = [(key, value) for key, value in values.items() if not (isinstance(value, dict) and value)]
        if rows:
            parts.append(f"<div><h3>{_esc(title)}</h3>\n{_table(rows)}</div>")
        for key, value in values.items():
            if isinstance(value, dict) and value:
                add(f"{title} / {key}", value)

    for section, values in config.items():
        if isinstance(values, dict) and values:
            add(section, values)
    loose = [(key, value) for key, value in config.items() if not (isinstance(value, dict) and value)]
    if loose:
        parts.append(f"<div><h3>run metadata</h3>\n{_table(loose)}</div>")
    return '<div class="configs">\n' + "\n".join(parts) + "\n</div>"


def _metrics_table(metrics: list[dict[str, Any]]) -> str:
    """The epochs as rows; known columns first in a fixed order, unknown keys after them."""
    if not metrics:
        return '<p class="missing">No metrics recorded (metrics.jsonl not found or empty).</p>'
    present = {key for record in metrics for key in record}
    columns = [key for key in METRIC_COLUMNS if key in present]
    columns += [key for record in metrics for key in record if key not in METRIC_COLUMNS]
    columns = list(dict.fromkeys(columns))  # unknown keys: first-seen order, once each

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "&ndash;"
        column = METRIC_COLUMNS.get(key)
        if column and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _esc(column[1](value))
        return _esc(f"{value:.4g}" if isinstance(value, float) else value)

    head = "".join(f"<th>{_esc(METRIC_COLUMNS.get(key, (key,))[0])}</th>" for key in columns)
    rows = "\n".join("<tr>" + "".join(f"<td>{cell(key, record.get(key))}</td>" for key in columns) + "</tr>"
                     for record in metrics)
    return f'<table class="metrics">\n<tr>{head}</tr>\n{rows}\n</table>'


def _figure(path: Path, heading: str, explanation: str) -> str:
    """A figure section: heading, explanation, and the PNG inlined (or a "not produced" note)."""
    parts = [f"<h3>{_esc(heading)}</h3>", f"<p>{_esc(explanation)}</p>"]
    if path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(heading)}"></figure>')
    else:
        parts.append(f'<p class="missing">{_esc(path.name)}: not produced for this run.</p>')
    return "\n".join(parts)
