"""openseek: DeepSeek-V2/V3 (MLA + DeepSeekMoE) in PyTorch.

Shape letters in comments follow docs/shapes.md; "reference §N" cites docs/deepseek-v2-reference.md.
"""

from pathlib import Path

from .config import ModelConfig, preset
from .engine import LLM, CompletionOutput, EngineConfig, LLMEngine, RequestOutput, SamplingParams, StructuredOutputsParams
from .model import Transformer, load_pretrained, save_pretrained

# The small MLA + DeepSeekMoE chat model that ships with the package (`openseek train --preset demo`, then
# demo-sft): the default of `openseek serve`, `chat` and `generate`. Stored in bfloat16.
BUNDLED_MODEL = Path(__file__).parent / "bundled"

__all__ = ["BUNDLED_MODEL", "LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "ModelConfig", "RequestOutput",
           "SamplingParams", "StructuredOutputsParams", "Transformer", "load_pretrained", "preset", "save_pretrained"]
__version__ = "0.1.0"
