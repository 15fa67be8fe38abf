"""cskd: Cumulative Spatial Knowledge Distillation from CNN teachers into fast ViT students."""

__version__ = "0.1.0"
