"""Starting from pretrained weights: --init / create_model(pretrained=) / from_pretrained on every kind of source.

The references are real: timm and transformers ViTs with random weights, saved
as the folders those libraries write, and placed in a Hugging Face hub cache
(``models--ORG--NAME/snapshots/REV/`` + ``refs/main``) read with HF_HUB_OFFLINE=1.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import small_run, train_quietly, write_folder_dataset

import vitcraft
from vitcraft import ViTForClassification
from vitcraft.convert import fused_state_dict
from vitcraft.errors import VitcraftError
from vitcraft.interop import from_hf
from vitcraft.pretrained import adapt_input_channels, model_for_data, read_source
from vitcraft.resize import resample_position_embeddings
from vitcraft.runs import load_trained_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

HF_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.2): no weight is a 0 or 1 that would hide a mix-up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return module.eval()


def hub_cache(root, repo_id: str, folder) -> dict[str, str]:
    """Put ``folder``'s files into a Hugging Face hub cache under ``root`` as ``repo_id``; the env reading it."""
    snapshot = root / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    return {"HF_HOME": str(root), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    """Three classes of 16 x 16 images (the HF reference's size)."""
    return write_folder_dataset(tmp_path_factory.mktemp("d16") / "data", per_class=(12, 4), size=16)


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    config = transformers.ViTConfig(**HF_SHAPE, num_labels=5, id2label={i: f"label{i}" for i in range(5)})
    model = randomized(transformers.ViTForImageClassification(config))
    folder = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406],
                                                                  "image_std": [0.229, 0.224, 0.225]}))
    return model, folder


@pytest.fixture(scope="module")
def vit_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "run"
    train_quietly(small_run(tiny_folder, out.parent, epochs=1), out)
    return out


# --------------------------------------------------------------------------- a run directory is a hub folder
def test_a_run_directory_opens_with_from_pretrained(vit_run):
    x = torch.randn(2, 3, 8, 8)
    trained, metadata = load_trained_model(vit_run)
    loaded = ViTForClassification.from_pretrained(vit_run)
    torch.testing.assert_close(loaded(x)[0], trained(x)[0], rtol=0, atol=0)
    assert vitcraft.hub.load_metadata(vit_run)["class_names"] == metadata["class_names"] == ["bottom", "middle", "top"]


def test_a_run_written_by_an_older_version_still_opens_and_resumes(vit_run, tiny_folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(vit_run, old)
    (old / "config.json").unlink()  # then config.json held the run's recipe, and there was no run.json
    (old / "run.json").rename(old / "config.json")
    x = torch.randn(2, 3, 8, 8)
    reference = load_trained_model(vit_run)[0](x)[0]
    torch.testing.assert_close(ViTForClassification.from_pretrained(old)(x)[0], reference, rtol=0, atol=0)
    torch.testing.assert_close(load_trained_model(old)[0](x)[0], reference, rtol=0, atol=0)
    assert read_source(old).metadata["class_names"] == ["bottom", "middle", "top"]
    recipe = json.loads((old / "config.json").read_text())
    train_quietly(small_run(tiny_folder, tmp_path, epochs=2), old, resume=True)
    assert json.loads((old / "run.json").read_text())["run"] == recipe["run"]  # the recipe moved, not lost
    assert json.loads((old / "config.json").read_text())["model_type"] == "vitcraft-vit"


# --------------------------------------------------------------------------- what the data decides
def test_init_from_a_run_with_the_same_classes_keeps_every_weight(vit_run, tiny_folder, tmp_path):
    run = dataclasses.replace(small_run(tiny_folder, tmp_path, epochs=1, learning_rate=1e-9), init=str(vit_run))
    lines = []
    train_quietly(run, tmp_path / "ft", log=lines.append, figures=False)
    init = json.loads((tmp_path / "ft" / "run.json").read_text())["init"]
    assert init["dropped"] == [] and init["new"] == [] and init["resampled"] == []
    assert len(init["sha256"]) == 64 and init["weights"].endswith("model.safetensors")
    assert "every weight of the source is used" in lines[0]


def test_other_classes_get_a_new_classifier_and_grayscale_sums_the_filters(vit_run, tmp_path):
    gray = write_folder_dataset(tmp_path / "gray", per_class=(6, 2), size=8, mode="L", classes=("x", "y"))
    source = read_source(vit_run)
    model, report = model_for_data(source, ["x", "y"], 8, 1)
    assert report.dropped == ["classifier.bias", "classifier.weight"]
    assert report.new == ["classifier.weight", "classifier.bias"] and model.classifier.out_features == 2
    backbone = {k: v for k, v in fused_state_dict(model).items() if not k.startswith("classifier.")}
    for key, value in backbone.items():
        expected = source.state[key]
        if key == "embedding.patch_embeddings.projection.weight":
            expected = expected.sum(dim=1, keepdim=True)
        assert torch.equal(value, expected), key
    # a gray image through the summed filters is the colour model on (x, x, x): the features agree
    original = load_trained_model(vit_run)[0]
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model.eval().forward_features(x)[0],
                               original.forward_features(x.expand(-1, 3, -1, -1))[0], rtol=0, atol=1e-5)
    run = dataclasses.replace(small_run(gray, tmp_path, epochs=1, model={}), init=str(vit_run))
    train_quietly(run, tmp_path / "ft")
    saved = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert saved["model_config"]["num_channels"] == 1 and saved["class_names"] == ["x", "y"]


def test_image_size_resamples_the_positions_once(vit_run):
    source = read_source(vit_run)
    model, report = model_for_data(source, ["bottom", "middle", "top"], 16, 3)
    expected = resample_position_embeddings(source.state["embedding.position_embeddings"], 1, (2, 2), (4, 4))
    assert torch.equal(model.embedding.position_embeddings.data, expected)
    assert model.config.image_size == 16 and report.new == [] and "2x2 -> 4x4" in report.resampled[0]
    assert model(torch.randn(1, 3, 16, 16))[0].shape == (1, 3)


def test_channel_adaptation_follows_timm():
    filters = torch.randn(6, 3, 4, 4)
    from timm.models._manipulate import adapt_input_conv

    for channels in (1, 2, 3, 5):
        torch.testing.assert_close(adapt_input_channels(filters, channels), adapt_input_conv(channels, filters))


# --------------------------------------------------------------------------- the ecosystem's folders
def test_hugging_face_classifier_backbone_loads_exactly(hf_classifier, data16):
    reference, folder = hf_classifier
    source = read_source(folder)
    assert source.metadata["mean"] == [0.485, 0.456, 0.406]
    model, report = model_for_data(source, ["bottom", "middle", "top"], 16, 3)
    converted = fused_state_dict(from_hf(reference))
    ours = fused_state_dict(model)
    assert set(ours) == set(converted)
    for key in ours:
        if not key.startswith("classifier."):
            assert torch.equal(ours[key], converted[key]), key
    assert report.dropped == ["classifier.weight", "classifier.bias"] and model.classifier.out_features == 3


def test_hugging_face_vit_model_without_a_head(tmp_path):
    config = transformers.ViTConfig(**HF_SHAPE)
    backbone = randomized(transformers.ViTModel(config, add_pooling_layer=True))
    backbone.save_pretrained(tmp_path / "backbone", safe_serialization=True)
    with pytest.warns(UserWarning, match="has no classifier: classifier.weight, classifier.bias newly initialised"):
        model = ViTForClassification.from_pretrained(tmp_path / "backbone")
    x = torch.randn(2, 3, 16, 16)
    features = backbone(pixel_values=x).last_hidden_state[:, 0]  # after the final LayerNorm
    torch.testing.assert_close(model.forward_features(x)[0], features, rtol=0, atol=1e-4)
    model, report = model_for_data(read_source(tmp_path / "backbone"), ["a", "b"], 16, 3)
    assert report.dropped == [] and report.new == ["classifier.weight", "classifier.bias"]


def test_timm_folder_gives_its_normalisation(tmp_path, data16):
    from timm.models._hub import save_for_hf

    reference = randomized(timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=16,
                                             patch_size=4, embed_dim=32, depth=2, num_heads=4))
    save_for_hf(reference, str(tmp_path / "timm"), safe_serialization=True)
    source = read_source(tmp_path / "timm")
    assert source.metadata["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    out = tmp_path / "ft"
    run = dataclasses.replace(small_run(data16, tmp_path, epochs=1, model={}), init=str(tmp_path / "timm"))
    train_quietly(run, out)
    saved = json.loads((out / "run.json").read_text())
    assert saved["mean"] == pytest.approx(list(timm.data.IMAGENET_DEFAULT_MEAN))
    assert saved["model_config"]["hidden_size"] == 32 and saved["init"]["new"] == ["classifier.weight",
                                                                                  "classifier.bias"]


def test_create_model_with_pretrained_checks_the_shape(hf_classifier, capsys):
    _, folder = hf_classifier
    with pytest.raises(VitcraftError, match="is not a seed-tiny model: hidden_size 32 \\(preset: 48\\)"):
        vitcraft.create_model("seed-tiny", pretrained=folder)
    model = vitcraft.create_model("seed-tiny", pretrained=folder, **HF_SHAPE, hidden_act="gelu",
                                  final_layernorm=True, layer_norm_eps=1e-12)
    assert model.classifier.out_features == 5  # the source's head kept: no num_classes asked for
    assert "every weight of the source is used" in capsys.readouterr().out


# --------------------------------------------------------------------------- the command line, through the hub cache
def run_cli(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitcraft", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_cli_init_from_a_hub_id_in_the_cache_and_offline_without_it(hf_classifier, data16, tmp_path):
    _, folder = hf_classifier
    env = hub_cache(tmp_path / "hf-home", "someorg/tiny-vit", folder)
    common = ["--data", str(data16), "--epochs", "1", "--batch-size", "8", "--threads", "1", "--no-figures",
              "--no-tensorboard", "--cache-dir", str(tmp_path / "cache")]
    done = run_cli(["train", "--init", "someorg/tiny-vit", "--out", str(tmp_path / "ft"), *common], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "initialised from someorg/tiny-vit" in done.stdout
    init = json.loads((tmp_path / "ft" / "run.json").read_text())["init"]
    assert "models--someorg--tiny-vit" in init["weights"] and init["dropped"] == ["classifier.weight",
                                                                                  "classifier.bias"]
    missing = run_cli(["train", "--init", "someorg/not-there", "--out", str(tmp_path / "no"), *common], env, tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("vitcraft: error: someorg/not-there is neither a local folder nor a Hugging "
                                     "Face hub model")
    both = run_cli(["train", "--init", "someorg/tiny-vit", "--preset", "seed-tiny", *common], env, tmp_path)
    assert both.returncode == 2 and "leave out --preset" in both.stderr


def test_every_command_takes_a_model_folder_as_a_run_directory(vit_run, tiny_folder, tmp_path, capsys):
    from vitcraft.cli import main

    folder = load_trained_model(vit_run)[0].save_pretrained(
        tmp_path / "folder", extra_metadata={"class_names": ["bottom", "middle", "top"]})
    image = next((tiny_folder / "test" / "top").iterdir())
    assert main(["predict", str(folder), str(image)]) == 0
    assert main(["eval", str(folder), "--data", str(tiny_folder), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert main(["report", str(folder)]) == 0 and (folder / "report.html").is_file()
    assert main(["export", str(folder), "--format", "torchscript"]) == 0 and (folder / "model.pt").is_file()
    assert "error" not in capsys.readouterr().err


def test_a_resumed_init_run_does_not_need_its_source_again(vit_run, tiny_folder, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(vit_run, source)
    run = dataclasses.replace(small_run(tiny_folder, tmp_path, epochs=1), init=str(source))
    train_quietly(run, tmp_path / "part")
    shutil.rmtree(source)
    resumed = train_quietly(dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=2)),
                            tmp_path / "part", resume=True)
    shutil.copytree(vit_run, source)
    full = train_quietly(dataclasses.replace(run, train=dataclasses.replace(run.train, epochs=2)), tmp_path / "full")
    assert resumed["test_loss"] == full["test_loss"] and resumed["step"] == full["step"]


def test_from_pretrained_takes_a_hub_id_from_the_cache(hf_classifier, tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    reference, folder = hf_classifier
    hub_cache(tmp_path, "someorg/tiny-vit", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HOME sets at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    x = torch.randn(2, 3, 16, 16)
    model = ViTForClassification.from_pretrained("someorg/tiny-vit")
    torch.testing.assert_close(model(x)[0], reference(pixel_values=x).logits, rtol=0, atol=1e-4)
    with pytest.raises(VitcraftError, match="someorg/absent is neither a local folder nor a Hugging Face hub model"):
        ViTForClassification.from_pretrained("someorg/absent")
    with pytest.raises(FileNotFoundError, match="model folder no/such/folder/here does not exist"):
        ViTForClassification.from_pretrained("no/such/folder/here")
