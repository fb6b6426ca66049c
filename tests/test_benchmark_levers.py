"""benchmarks/levers.py: each row is its recipe's model, timed and counted as that model (patch dropout's dropped
tokens cost no FLOPs), its ratio to the first row."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import levers  # noqa: E402


def run(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["levers.py", "--batch-size", "4", "--rounds", "1", "--steps", "1",
                                      "--precision", "fp32", *argv])
    levers.main()
    return capsys.readouterr().out


def test_rows_are_the_recipes_models_and_patch_dropout_halves_the_encoder_flops(monkeypatch, capsys):
    plain, dropped = "speedrun+shifted_patches=false+patch_dropout=0", "speedrun+shifted_patches=false"
    out = run(monkeypatch, capsys, "--recipes", plain, dropped, "speedrun")
    assert out.startswith("CPU: ")  # the CPU class first, as in every benchmark
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("speedrun")}
    assert list(rows) == [plain, dropped, "speedrun"]
    assert [rows[name][0] for name in rows] == ["119,098", "119,098", "128,794"]  # shifted patches' wider embedding
    assert rows[plain][3] == "1.00"  # the first row is the baseline
    flops = {name: float(values[1]) for name, values in rows.items()}
    # 64 patch tokens and [CLS] against 32 and [CLS]: the encoder, nearly all of the FLOPs, about halves
    assert 0.45 < flops[dropped] / flops[plain] < 0.6


def test_a_bad_row_is_one_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(monkeypatch, capsys, "--recipes", "speedrun+widht=96")
    assert exit_info.value.code == 2
    assert "'widht=96' in 'speedrun+widht=96' is not KEY=VALUE" in capsys.readouterr().err
