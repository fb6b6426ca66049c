"""``vitcraft serve`` as a user meets it: a real server process on loopback, its JSON API,
bad uploads, a load test, and the page driven in headless Chromium."""

import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("starlette", "uvicorn", "python_multipart"):
    pytest.importorskip(_module, reason="vitcraft serve needs the serve extra: pip install -e '.[serve]'")

from conftest import make_image, small_run, train_quietly  # noqa: E402

from vitcraft import serve  # noqa: E402
from vitcraft.cli import main  # noqa: E402
from vitcraft.hub import save_pretrained  # noqa: E402
from vitcraft.inference import load_predictor  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SERVER_START_SECONDS = 180  # importing torch on a busy CI machine can take a while
REQUEST_SECONDS = 120  # no request may hang the test run; a healthy one takes milliseconds
RSS_GROWTH_LIMIT_MB = 20  # after warm-up (measured: under 1 MB); keeping the 90 kB answers of 320 requests is 29 MB


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def run_dir(tiny_folder, tmp_path_factory):
    """A tiny trained run (3 classes, 8 x 8 images, 4 blocks of 4 heads)."""
    tmp = tmp_path_factory.mktemp("serve")
    out = tmp / "run"
    train_quietly(small_run(tiny_folder, tmp), out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two image files of other sizes than the model's: a "top" band and a "bottom" band."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for label, seed in ((2, 5), (0, 6)):
        paths.append(folder / f"band{label}.png")
        make_image(label, np.random.default_rng(seed), size=48).save(paths[-1])
    return paths


class Server:
    """``vitcraft serve RUN --port 0`` in a child process, as a user starts it."""

    def __init__(self, run: Path, log: Path):
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vitcraft", "serve", str(run), "--port", "0", "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], SERVER_START_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if "http://127.0.0.1:" not in line:
            self.stop()
            raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.url = line.split(" at ")[1].split()[0].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])

    def rss_mb(self) -> float:
        """The server process's resident memory, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process.stdout.close()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    started = Server(run_dir, tmp_path_factory.mktemp("server") / "stderr.log")
    yield started
    started.stop()


def multipart(fields: dict, file_bytes: bytes | None, filename: str = "image.png") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form with text ``fields`` and the file as "image"."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in fields.items()]
    if file_bytes is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + file_bytes + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(server: Server, body: bytes, content_type: str) -> tuple[int, dict]:
    """POST /api/predict over loopback -> (status, JSON answer)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_SECONDS)
    try:
        connection.request("POST", "/api/predict", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def predict_file(server: Server, path: Path, **fields) -> tuple[int, dict]:
    return post(server, *multipart(fields, path.read_bytes(), path.name))


def decode_png(data_uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix):]))))


def cli_predictions(run: Path, path: Path, capsys) -> list[tuple[str, str]]:
    """(class name, "xx.xx%") lines of `vitcraft predict RUN IMAGE`."""
    capsys.readouterr()
    assert main(["predict", str(run), str(path), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    return [(line.split()[0], line.split()[1]) for line in lines]


# ------------------------------------------------------------------ the API
def test_predictions_equal_vitcraft_predict_and_overlays_come_back(server, run_dir, images, capsys):
    status, answer = predict_file(server, images[0])
    assert status == 200
    shown = [(entry["name"], f"{100 * entry['probability']:.2f}%") for entry in answer["top5"]]
    assert shown == cli_predictions(run_dir, images[0], capsys)
    assert len(shown) == 3  # top-5 of a 3-class model
    assert answer["name"] == images[0].name and (answer["layers"], answer["heads"]) == (4, 4)
    assert (answer["layer"], answer["head"]) == (3, "mean")  # the defaults: last block, mean of heads
    picture = decode_png(answer["image"])
    assert picture.shape == (serve.DISPLAY_SIDE, serve.DISPLAY_SIDE, 3)
    for key in ("overlay_cls", "overlay_rollout"):
        overlay = decode_png(answer[key])
        assert overlay.shape == picture.shape
        assert np.abs(overlay.astype(int) - picture).mean() > 10  # a colour map lies over the image


def test_block_and_head_redraw_the_overlays(server, images):
    _, default = predict_file(server, images[0])
    _, first_block = predict_file(server, images[0], layer=0)
    _, one_head = predict_file(server, images[0], layer=0, head=1)
    assert first_block["layer"] == 0 and one_head["head"] == 1
    assert first_block["overlay_cls"] != default["overlay_cls"]
    assert first_block["overlay_rollout"] == default["overlay_rollout"]  # rollout spans every block
    assert one_head["overlay_rollout"] != first_block["overlay_rollout"]
    assert one_head["top5"] == default["top5"]


def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(server, images, tmp_path):
    truncated = images[0].read_bytes()
    truncated = truncated[:len(truncated) // 2]
    huge = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(huge, format="PNG")  # 60 megapixels in a few kB
    cases = [
        (multipart({}, b"just some text\n", "notes.txt"), 400, "cannot read image notes.txt: cannot identify"),
        (multipart({}, truncated, "cut.png"), 400, "cannot read image cut.png: image file is truncated"),
        (multipart({}, huge.getvalue(), "huge.png"), 400,
         "10000 x 6000 pixels is more than the limit of 50,000,000"),
        (multipart({}, b"", "empty.png"), 400, "empty.png is empty"),
        (multipart({}, os.urandom(serve.MAX_UPLOAD_BYTES + 1)), 413, "larger than the limit of 10 MB"),
        (multipart({"layer": 9}, images[0].read_bytes()), 400, "layer must be an integer in [-4, 4), got 9"),
        (multipart({"head": "all"}, images[0].read_bytes()), 400, "head an integer or 'mean'"),
        (multipart({"layer": 1}, None), 400, "no file in the field 'image'"),
        ((b"raw bytes", "image/png"), 415, "multipart/form-data"),
    ]
    for (body, content_type), status, message in cases:
        answered, answer = post(server, body, content_type)
        assert answered == status and message in answer["error"], (message, answered, answer)
    assert predict_file(server, images[0])[0] == 200


@pytest.mark.slow
def test_concurrent_requests_do_not_interfere_and_memory_stays_flat(server, images):
    requests = [(path, layer) for path in images for layer in (0, 3)]
    expected = {(path, layer): predict_file(server, path, layer=layer)[1] for path, layer in requests}

    def check(index: int) -> bool:
        path, layer = requests[index % len(requests)]
        status, answer = predict_file(server, path, layer=layer)
        return status == 200 and answer == expected[(path, layer)]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, range(40)))  # warm-up: every worker thread and allocator pool in use
        before = server.rss_mb()
        results = list(pool.map(check, range(320)))
    after = server.rss_mb()
    print(f"server RSS {before:.1f} MB -> {after:.1f} MB over 320 requests")
    assert results.count(True) == 320
    assert after - before < RSS_GROWTH_LIMIT_MB, (before, after)


# ------------------------------------------------------------------ loading and the command
def test_a_hub_folder_serves_the_same_predictions_as_its_run(run_dir, images, tmp_path):
    from_run = load_predictor(run_dir)
    folder = save_pretrained(from_run.model, tmp_path / "hub", extra_metadata={
        key: from_run.metadata[key] for key in ("class_names", "mean", "std")})
    from_folder = load_predictor(folder)
    batch = from_run.read(images[1])[None]
    assert from_folder.top_k(batch) == from_run.top_k(batch)
    assert sorted(name for name, _ in from_folder.top_k(batch)[0]) == ["bottom", "middle", "top"]
    for method in ("cls", "rollout"):
        ours, theirs = from_folder.attention(batch, method, 1, 2), from_run.attention(batch, method, 1, 2)
        assert ours.shape == (1, 2, 2) and torch.allclose(ours, theirs, atol=1e-6)


def test_serve_command_errors_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    monkeypatch.delitem(sys.modules, "vitcraft.serve")
    assert main(["serve", str(run_dir)]) == 2
    assert "vitcraft serve needs uvicorn: pip install 'vitcraft[serve]'" in capsys.readouterr().err


# ------------------------------------------------------------------ the page in a browser
def _browser():
    """A headless Chromium under Selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium "
                                                                 "(pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.skip(f"the browser test needs {path}: apt-get install chromium chromium-driver "
                        f"(.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # given, so Selenium never tries to download a browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='vitcraft-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, run_dir, images, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser()
    wait = WebDriverWait(browser, REQUEST_SECONDS)
    try:
        browser.get(server.url + "/")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#layer-select option")) == 4)
        browser.find_element(By.ID, "file-input").send_keys(str(images[0]))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#top5 li"))
        rows = [(row.find_element(By.CLASS_NAME, "name").text, row.find_element(By.CLASS_NAME, "prob").text)
                for row in browser.find_elements(By.CSS_SELECTOR, "#top5 li")]
        assert rows == cli_predictions(run_dir, images[0], capsys)
        for name in ("image-view", "overlay-cls", "overlay-rollout"):
            script = f"return document.getElementById('{name}').naturalWidth"
            wait.until(lambda b, script=script: b.execute_script(script) == serve.DISPLAY_SIDE)
        browser.save_screenshot(str(tmp_path / "serve.png"))

        before = browser.find_element(By.ID, "overlay-cls").get_attribute("src")
        Select(browser.find_element(By.ID, "layer-select")).select_by_value("0")
        wait.until(lambda b: b.find_element(By.ID, "overlay-cls").get_attribute("src") != before)
        assert "block 0" in browser.find_element(By.ID, "caption-cls").text

        # every resource the page loaded came from the vitcraft server itself
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(server.url + "/") for url in loaded), loaded

        text_file = tmp_path / "notes.txt"
        text_file.write_text("not an image\n")
        browser.find_element(By.ID, "file-input").send_keys(str(text_file))
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert "cannot read image notes.txt" in browser.find_element(By.ID, "error").text
        assert not browser.find_element(By.ID, "results").is_displayed()
    finally:
        browser.quit()


def test_a_model_without_cls_attention_gets_predictions_and_a_reason(images):
    from vitcraft import create_model
    from vitcraft.inference import Predictor

    model = create_model("cnn-small", image_size=8, num_classes=3).eval()
    predictor = Predictor(model, {"model_config": model.config.to_dict(), "class_names": ["a", "b", "c"],
                                  "mean": [0.5] * 3, "std": [0.5] * 3}, torch.device("cpu"))
    answer = serve.explain(predictor, images[0].read_bytes(), "band.png", -1, "mean")
    assert sorted(entry["name"] for entry in answer["top5"]) == ["a", "b", "c"]
    assert answer["overlay_cls"] is None and answer["overlay_rollout"] is None
    assert "not available" in answer["caption_cls"] and answer["layers"] is None
