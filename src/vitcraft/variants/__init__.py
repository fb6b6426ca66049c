"""Architecture variants beyond the plain ViT, each a model class with its own typed config.

* ``swin``: Swin Transformer, window attention with shifted windows on a
  pyramid of token grids (``SwinConfig``, ``SwinForClassification``);
* ``cct``: Compact Convolutional Transformer, a convolutional tokenizer and
  sequence pooling around vitcraft's encoder (``CCTConfig``, ``CCTForClassification``);
* ``deit``: DeiT, the ViT with a distillation token and head beside [CLS]
  (``DeiTForClassification``, a ``ViTConfig`` model; losses in ``vitcraft.distill``);
* ``cnn``: the CNN teachers, a CIFAR ResNet-18 and a small fast CNN
  (``CNNConfig``, ``ConvNetForClassification``; ``model(x)`` gives ``(logits, None)``).

All take images and return ``(logits, attentions or None)`` like the ViT, so
the training loop, checkpoints and the CLI use them through the registry's
presets (``vitcraft list-models``). Swin, CCT and the CNNs have no [CLS]
token (``model.has_cls_token`` is False).
"""

from vitcraft.variants.cct import CCTConfig, CCTForClassification
from vitcraft.variants.cnn import CNNConfig, ConvNetForClassification
from vitcraft.variants.deit import DeiTForClassification
from vitcraft.variants.swin import SwinConfig, SwinForClassification

__all__ = ["CCTConfig", "CCTForClassification", "CNNConfig", "ConvNetForClassification", "DeiTForClassification",
           "SwinConfig", "SwinForClassification"]
