"""vitcraft: a readable, fast Vision Transformer library and training tool."""

from vitcraft.config import ViTConfig
from vitcraft.hub import save_pretrained
from vitcraft.model import ViTForClassfication, ViTForClassification, count_parameters
from vitcraft.pretrained import create_model
from vitcraft.registry import list_models

# vitcraft.from_pretrained(folder): a vitcraft, timm or Hugging Face ViT folder as a ViTForClassification
from_pretrained = ViTForClassification.from_pretrained

__all__ = ["ViTConfig", "ViTForClassification", "ViTForClassfication", "count_parameters",
           "create_model", "list_models", "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
