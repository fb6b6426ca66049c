"""vitcraft.report: a self-contained, escaped HTML page built from a run directory."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.image
import numpy as np
import pytest

from vitcraft import ViTConfig
from vitcraft.report import FIGURES, write_report

METRICS = [
    {"epoch": 1, "train_loss": 2.1234, "test_loss": 1.9876, "test_acc": 0.3125, "lr": 0.001,
     "epoch_seconds": 12.34, "images_per_second": 4051.7},
    {"epoch": 2, "train_loss": 1.5, "test_loss": 1.4321, "test_acc": 0.567, "lr": 0.0005,
     "epoch_seconds": 11.0, "images_per_second": 4100.0},
]


def make_run(run_dir, figures=("curves.png", "confusion.png"), num_parameters=None):
    """A run directory like older versions wrote: config.json (the run's), metrics.jsonl and some figures."""
    run_dir.mkdir(parents=True)
    config = {"model": ViTConfig().to_dict(), "train": {"epochs": 2, "lr": 1e-3},
              "data": {"dataset": "cifar10", "class_names": ["plane", "<b>cat</b>"]}}
    if num_parameters is not None:
        config["num_parameters"] = num_parameters
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS) + "\n")
    for i, name in enumerate(figures):
        matplotlib.image.imsave(run_dir / name, np.full((4, 4), float(i)))
    return run_dir


def test_report_embeds_figures_metrics_and_parameter_count(tmp_path):
    run_dir = make_run(tmp_path / "my_run")
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert "my_run" in page
    for name in ("curves.png", "confusion.png"):
        data = base64.b64encode((run_dir / name).read_bytes()).decode()
        assert f'src="data:image/png;base64,{data}"' in page
    for name in ("samples.png", "attention.png", "rollout.png"):
        assert f"{name}: not produced" in page
    assert page.count("<h3>") >= len(FIGURES)  # every figure has its section and explanation
    for value in ("2.1234", "1.9876", "31.25%", "56.70%", "1.00e-03", "12.3", "4,052", "1.4321"):
        assert value in page
    assert "119,098" in page  # the default ViTConfig, counted on the built model
    assert "best 56.70% (epoch 2)" in page


def test_report_is_self_contained_and_escaped(tmp_path):
    page = write_report(make_run(tmp_path / "run")).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?:""", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "<b>cat</b>" not in page


def test_report_uses_recorded_parameter_count_and_custom_path(tmp_path):
    run_dir = make_run(tmp_path / "run", figures=(), num_parameters=1234)
    path = write_report(run_dir, tmp_path / "out" / "page.html")
    page = path.read_text()
    assert path == tmp_path / "out" / "page.html"
    assert "1,234" in page and "119,098" not in page
    assert "data:image/png" not in page


def test_report_without_metrics_says_so(tmp_path):
    run_dir = make_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").unlink()
    assert "No metrics recorded" in write_report(run_dir).read_text()


def test_report_errors_name_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run.json"):
        write_report(tmp_path / "empty")
    run_dir = make_run(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        write_report(run_dir)


def test_report_reads_the_config_layout_training_writes(tmp_path):
    """run.json as train.py writes it: nested run sections get their own tables, the model is counted."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"run": {"preset": "seed-tiny", "model": {}, "train": {"epochs": 2, "batch_size": 256},
                      "data": {"data": "cifar10"}},
              "model_config": ViTConfig(num_classes=3).to_dict(), "class_names": ["a", "b", "c"]}
    (run_dir / "run.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 196, "train_acc": 0.25,
                                                       "train_seconds": 784.82}) + "\n")
    page = write_report(run_dir).read_text()
    assert "<h3>run / train</h3>" in page and "<th>batch_size</th><td>256</td>" in page
    assert "<h3>run / data</h3>" in page and "<h3>run metadata</h3>" in page
    assert "<th>model</th><td>{}</td>" in page  # an empty dict stays a row of its parent
    assert '"batch_size"' not in page  # no section is dumped as a JSON blob
    assert "118,755" in page  # counted on model_config (3 classes), not on the default 10-class model
    for heading, value in (("train accuracy", "25.00%"), ("training seconds", "784.8"), ("step", "196")):
        assert f"<th>{heading}</th>" in page and f"<td>{value}</td>" in page
