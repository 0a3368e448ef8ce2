from .transformer import Transformer
from .weights import load_pretrained, save_pretrained

__all__ = ["Transformer", "load_pretrained", "save_pretrained"]
