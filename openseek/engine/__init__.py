"""The inference engine: `LLMEngine` (steps over a loaded model), `LLM` (the offline facade), their records.

A server or a script imports these names from here, never from the submodules.
"""

from .config import EngineConfig
from .engine import EngineStats, LLMEngine, Prompt, QueueFull
from .llm import LLM
from .output_processor import CompletionOutput, RequestOutput, StepOutput
from .sampler import SamplingParams
from .structured import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "EngineStats", "LLMEngine", "Prompt", "QueueFull",
           "RequestOutput", "SamplingParams", "StepOutput", "StructuredOutputsParams"]
