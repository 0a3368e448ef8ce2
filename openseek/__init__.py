"""openseek: DeepSeek-V2/V3 (MLA + DeepSeekMoE) in PyTorch."""

from .config import ModelConfig, preset
from .engine.engine import LLM, CompletionOutput, RequestOutput
from .engine.sampler import SamplingParams
from .model import Transformer, load_pretrained, save_pretrained

__all__ = ["LLM", "CompletionOutput", "ModelConfig", "RequestOutput", "SamplingParams", "Transformer",
           "load_pretrained", "preset", "save_pretrained"]
__version__ = "0.1.0"
