"""`vitcraft predict` over many files and folders: batches, skipped non-images, CSV and JSONL files."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import small_run, train_quietly

from vitcraft.cli import main


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bulk") / "run"
    train_quietly(small_run(tiny_folder, out.parent), out)
    return out


@pytest.fixture(scope="module")
def tree(tiny_folder, tmp_path_factory) -> Path:
    """The tiny test images in a nested tree, with a text file, a truncated PNG and a garbage PNG among them."""
    root = tmp_path_factory.mktemp("tree") / "images"
    shutil.copytree(tiny_folder / "test" / "bottom", root / "bottom")
    shutil.copytree(tiny_folder / "test" / "middle", root / "more" / "middle")
    shutil.copytree(tiny_folder / "test" / "top", root / "more" / "deeper" / "top")
    (root / "notes.txt").write_text("not an image\n")
    whole = (root / "bottom" / "000.png").read_bytes()
    (root / "more" / "truncated.png").write_bytes(whole[:len(whole) // 2])
    (root / "more" / "deeper" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00 garbage" * 20)
    return root


NOT_IMAGES = ("notes.txt", "truncated.png", "garbage.png")


def images_in(tree: Path) -> list[Path]:
    return sorted(path for path in tree.rglob("*.png") if path.name not in NOT_IMAGES)


def printed(capsys, *args: str) -> dict[str, list[tuple[str, str]]]:
    """`vitcraft predict ARGS` as printed: path -> [(class name, "xx.xx"), ...]."""
    capsys.readouterr()
    assert main(["predict", *args, "--device", "cpu"]) == 0
    answers: dict[str, list[tuple[str, str]]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  "):  # a "  name  xx.xx%" line of the path above
            name, percent = line.strip().rsplit(None, 1)
            answers[next(reversed(answers))].append((name, percent.rstrip("%")))
        else:
            answers[line] = []
    return answers


def written(capsys, run: Path, out: Path, *args: str) -> tuple[list[tuple[str, list[tuple[str, float]]]], str]:
    """(rows of `vitcraft predict RUN ARGS --output OUT` read back from the file, its stderr)."""
    capsys.readouterr()
    assert main(["predict", str(run), *args, "--output", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    if out.suffix == ".jsonl":
        records = [json.loads(line) for line in out.read_text().splitlines()]
        return [(r["file"], [(t["class"], t["probability"]) for t in r["top"]]) for r in records], err
    with open(out, newline="") as f:
        header, *rows = list(csv.reader(f))
    k = (len(header) - 1) // 2
    assert header == ["file", *(f"{column}_{i}" for i in range(1, k + 1) for column in ("class", "prob"))]
    return [(row[0], [(row[1 + 2 * i], float(row[2 + 2 * i])) for i in range(k)]) for row in rows], err


def test_a_folder_tree_gives_a_row_per_image_equal_to_predicting_it_alone(run, tree, tmp_path, capsys):
    rows, err = written(capsys, run, tmp_path / "preds.csv", str(tree), "--top-k", "2", "--batch-size", "5")
    assert [file for file, _ in rows] == [str(path) for path in images_in(tree)]
    assert "skipped 3 files that are not images" in err
    assert all(name in err for name in NOT_IMAGES) and "Traceback" not in err
    for file, top in rows:
        alone = printed(capsys, str(run), file, "--top-k", "2")
        assert alone == {file: [(name, f"{100 * p:.2f}") for name, p in top]}
        assert len(top) == 2 and top[0][1] >= top[1][1]


def test_csv_and_jsonl_hold_the_same_rows_at_any_batch_size(run, tree, tmp_path, capsys):
    one_batch, _ = written(capsys, run, tmp_path / "a.jsonl", str(tree), "--batch-size", "1000")
    small_batches, _ = written(capsys, run, tmp_path / "b.jsonl", str(tree), "--batch-size", "2")
    as_csv, _ = written(capsys, run, tmp_path / "c.CSV", str(tree), "--batch-size", "2")
    assert small_batches == as_csv  # the same numbers, and the CSV's text gives back every float exactly
    # the same answers whatever the batch size; a matrix product may round its last bit otherwise at another size
    assert [(file, [name for name, _ in top]) for file, top in one_batch] == \
        [(file, [name for name, _ in top]) for file, top in small_batches]
    assert [p for _, top in one_batch for _, p in top] == \
        pytest.approx([p for _, top in small_batches for _, p in top], rel=1e-5, abs=1e-7)
    assert len(one_batch) == len(images_in(tree)) and len(one_batch[0][1]) == 3  # top-k clipped to the classes
    assert all(isinstance(p, float) for _, top in one_batch for _, p in top)


def test_printing_is_unchanged_and_names_the_skipped_files(run, tree, capsys):
    answers = printed(capsys, str(run), str(tree / "more"), str(tree / "bottom" / "001.png"), "--top-k", "1")
    expected = [path for path in images_in(tree) if "more" in path.parts] + [tree / "bottom" / "001.png"]
    assert list(answers) == [str(path) for path in expected]
    assert all(len(top) == 1 for top in answers.values())
    capsys.readouterr()
    assert main(["predict", str(run), str(tree), "--batch-size", "3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("vitcraft: skipped 3 files that are not images: ")


def test_many_skipped_files_are_counted_past_the_first_ten(run, tree, tmp_path, capsys):
    for i in range(12):
        (tmp_path / f"note{i:02d}.txt").write_text("text")
    shutil.copy(tree / "bottom" / "000.png", tmp_path / "z.png")
    assert main(["predict", str(run), str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipped 12 files" in err and "note09.txt, and 2 more" in err and "note10" not in err


def test_an_existing_output_is_kept_without_overwrite(run, tree, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("earlier work\n")
    assert main(["predict", str(run), str(tree), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitcraft: error: ") and "--overwrite" in err and err.count("\n") == 1
    assert out.read_text() == "earlier work\n"
    rows, _ = written(capsys, run, out, str(tree), "--overwrite")
    assert len(rows) == len(images_in(tree))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["preds.csv"]  # no temporary file left


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("suffix", "got '.txt'"),
    ("no suffix", "got no suffix"),
    ("only text", "found no images to predict: skipped 1 file that is not an image"),
    ("empty folder", "found no files in"),
    ("batch size", "the batch size must be at least 1"),
])
def test_bad_input_is_one_error_line(run, tree, tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.txt").write_text("text")
    args = {"missing": [str(tree), str(tmp_path / "nowhere")],
            "suffix": [str(tree), "--output", str(tmp_path / "preds.txt")],
            "no suffix": [str(tree), "--output", str(tmp_path / "preds")],
            "only text": [str(tmp_path / "only"), "--output", str(tmp_path / "preds.csv")],
            "empty folder": [str(tmp_path / "empty")],
            "batch size": [str(tree), "--batch-size", "0", "--output", str(tmp_path / "preds.jsonl")]}[case]
    capsys.readouterr()
    assert main(["predict", str(run), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("vitcraft: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and captured.out == ""
    if case == "missing":
        assert str(tmp_path / "nowhere") in captured.err
    assert not any(path.name.startswith(("preds", ".preds")) for path in tmp_path.iterdir())


def test_predict_files_reads_one_batch_at_a_time(run, tree):
    from vitcraft.inference import find_files, load_predictor

    predictor = load_predictor(run)
    reads = []
    read = predictor.read
    predictor.read = lambda path: reads.append(path) or read(path)
    files = find_files([tree / "bottom"])
    predictions = predictor.predict_files(files, k=1, batch_size=3)
    next(predictions)
    assert len(reads) == 3  # the first batch only
    assert len(list(predictions)) == len(files) - 1
    with pytest.raises(ValueError, match="cannot read image"):  # without on_skip, a non-image is an error
        list(predictor.predict_files([tree / "notes.txt"]))
