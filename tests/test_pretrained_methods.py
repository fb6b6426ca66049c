"""ViTForClassification.save_pretrained / from_pretrained: the hub layout as methods, like any hub model."""

import json
import os

import pytest
import torch

import vitcraft
from vitcraft import ViTConfig, ViTForClassification
from vitcraft.variants.deit import DeiTForClassification

X = torch.randn(3, 3, 32, 32)


def test_round_trip_through_the_methods(tmp_path):
    model = ViTForClassification(ViTConfig(num_hidden_layers=2, num_classes=4)).eval()
    assert model.save_pretrained(tmp_path / "vit", extra_metadata={"class_names": list("abcd")}) == tmp_path / "vit"
    assert sorted(os.listdir(tmp_path / "vit")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["metadata"] == {"class_names": list("abcd")}
    loaded = ViTForClassification.from_pretrained(tmp_path / "vit")
    assert type(loaded) is ViTForClassification and loaded.config == model.config and not loaded.training
    torch.testing.assert_close(loaded(X)[0], model(X)[0], atol=0, rtol=0)
    per_head = vitcraft.from_pretrained(tmp_path / "vit", attention_backend="per_head")  # the package-level name
    torch.testing.assert_close(per_head(X)[0], model(X)[0], atol=1e-5, rtol=0)


def test_hugging_face_folder_loads_through_the_classmethod(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=48, image_size=32, patch_size=8, num_labels=5)
    reference = transformers.ViTForImageClassification(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    torch.testing.assert_close(ViTForClassification.from_pretrained(tmp_path)(X)[0], reference(X).logits,
                               atol=1e-4, rtol=0)


def test_subclasses_are_refused_both_ways(tmp_path):
    ViTForClassification(ViTConfig(num_hidden_layers=1)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="holds a ViTForClassification, not a DeiTForClassification"):
        DeiTForClassification.from_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="save_pretrained writes ViTForClassification models, not a "
                                         "DeiTForClassification"):
        DeiTForClassification(ViTConfig(num_hidden_layers=1)).save_pretrained(tmp_path / "deit")
    assert not (tmp_path / "deit").exists()
