"""Model folders: vitcraft round trip, Hugging Face and timm folders, clear refusals, no unpickling."""

import json
import os
import pickle

import pytest
import safetensors.torch
import torch

from vitcraft import ViTConfig, ViTForClassification, from_pretrained
from vitcraft.hub import load_metadata, save_pretrained

timm_vit = pytest.importorskip("timm.models.vision_transformer")
transformers = pytest.importorskip("transformers")

X = torch.randn(2, 3, 32, 32)


def small_model(**overrides) -> ViTForClassification:
    return ViTForClassification(ViTConfig(num_hidden_layers=2, **overrides)).eval()


def test_vitcraft_folder_round_trip(tmp_path):
    model = small_model(attention_backend="per_head", num_classes=3)
    metadata = {"class_names": ["a", "b", "c"], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    save_pretrained(model, tmp_path, extra_metadata=metadata)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vitcraft-vit" and config["hidden_size"] == 48
    assert config["metadata"] == metadata

    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded(X)[0], model(X)[0], atol=0, rtol=0)
    assert load_metadata(tmp_path) == metadata
    # the fused file also loads into another backend
    torch.testing.assert_close(from_pretrained(tmp_path, attention_backend="sdpa")(X)[0], model(X)[0],
                               atol=1e-5, rtol=0)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="extra_metadata 'mean' is not JSON"):
        save_pretrained(small_model(), tmp_path, extra_metadata={"mean": torch.zeros(3)})


def test_hugging_face_folder_loads(tmp_path):
    config = transformers.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=48, image_size=32, patch_size=8,
                                    id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    reference = transformers.ViTForImageClassification(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    torch.testing.assert_close(from_pretrained(tmp_path)(X)[0], reference(X).logits, atol=1e-4, rtol=0)
    assert load_metadata(tmp_path)["class_names"] == ["cat", "dog"]


@pytest.mark.parametrize("weights_name",
                         ["model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"])
def test_timm_folder_loads(tmp_path, weights_name):
    reference = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3,
                                           num_classes=4).eval()
    torch.nn.init.normal_(reference.head.weight)  # timm zero-inits the head
    state = reference.state_dict()
    if weights_name.endswith(".bin"):
        torch.save(state, tmp_path / weights_name)
    else:
        safetensors.torch.save_file(state, tmp_path / weights_name)
    # timm's hub layout; the head count comes from the architecture name (tiny: 3)
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 4, "num_features": 24,
        "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "label_names": list("abcd")}}))
    torch.testing.assert_close(from_pretrained(tmp_path)(X)[0], reference(X), atol=1e-4, rtol=0)
    assert load_metadata(tmp_path) == {"mean": [0.5] * 3, "std": [0.5] * 3, "class_names": list("abcd")}


def test_folder_written_by_timm_loads(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=4,
                                  global_pool="avg").eval()
    torch.nn.init.normal_(reference.head.weight)  # timm zero-inits the head
    save_for_hf(reference, tmp_path, safe_serialization=True)
    loaded = from_pretrained(tmp_path)
    assert loaded.config.pooling == "mean" and loaded.config.num_attention_heads == 3
    torch.testing.assert_close(loaded(X)[0], reference(X), atol=1e-4, rtol=0)
    assert load_metadata(tmp_path)["mean"] == [0.5, 0.5, 0.5]


def test_timm_folder_with_unknown_architecture_needs_heads(tmp_path):
    save_pretrained(small_model(), tmp_path)  # any weights; the config is what fails
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "my_custom_vit"}))
    with pytest.raises(ValueError, match="pass from_pretrained\\(..., num_attention_heads=N\\)"):
        from_pretrained(tmp_path)


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path)
    save_pretrained(small_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights file"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deit"}))
    with pytest.raises(ValueError, match="config.json has model_type 'deit'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [4, 100, 0.5])
def test_truncated_safetensors_is_refused(tmp_path, keep):
    save_pretrained(small_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file \\(truncated or corrupt"):
        from_pretrained(tmp_path)


def test_weights_of_another_shape_name_the_key_and_shapes(tmp_path):
    save_pretrained(small_model(num_classes=10), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_classes": 7}))
    with pytest.raises(ValueError, match=r"model.safetensors has 'classifier.weight' of shape \(10, 48\), "
                                         r"but this model's is \(7, 48\)"):
        from_pretrained(tmp_path)


class RunsACommand:
    """A pickle payload: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(RunsACommand(control)))
    assert control.exists()  # the payload is live: plain unpickling runs it
    marker = tmp_path / "pwned"
    payload = {"classifier.weight": RunsACommand(marker)}
    weights = tmp_path / "pytorch_model.bin"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, weights)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 48}))
    with pytest.raises(ValueError, match="pytorch_model.bin is not a plain PyTorch weights file"):
        from_pretrained(tmp_path)
    assert not marker.exists()
