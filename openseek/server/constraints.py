"""What constrains a request's output: response_format or structured_outputs (OpenAI's and vLLM's fields), or on
chat a tool call that tool_choice "required" / a named function forces; with a reasoning parser, only the text
after the reasoning. Each becomes the engine's StructuredOutputsParams, compiled by llguidance.

A request with both a forced tool call and response_format / structured_outputs is refused: the two would
constrain the same text (vLLM lets the tool call win; a 400 says so instead of dropping one silently).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import StructuredOutputsParams
from ..validation import FieldError
from .tools import NamedToolChoice, Tool, choice_text, forces_a_call, tool_call_grammar


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")  # "schema" would shadow BaseModel.schema
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format, and vLLM's structural_tag type (its structures and triggers)."""
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[dict] | None = None
    triggers: list[str] | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs extra field: exactly one constraint (its other options are accepted, unused)."""
    model_config = ConfigDict(populate_by_name=True)
    json_: dict | str | None = Field(None, alias="json")  # "json" would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None


def requested(rf: ResponseFormat | None, so: StructuredOutputs | None) -> StructuredOutputsParams | None:
    """The constraint response_format or structured_outputs asks for; FieldError naming the request field."""
    if rf is not None and rf.type != "text" and so is not None:
        raise FieldError("structured_outputs", so.model_dump(by_alias=True, exclude_none=True),
                         "set response_format or structured_outputs, not both")
    if so is not None:
        return StructuredOutputsParams(**so.model_dump(by_alias=True, exclude_none=True))
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if rf.type == "structural_tag":
        return StructuredOutputsParams(structural_tag={"structures": rf.structures or [],
                                                       "triggers": rf.triggers or []})
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise FieldError("response_format.json_schema", None, "response_format of type json_schema needs "
                         "json_schema.schema")
    return StructuredOutputsParams(json=rf.json_schema.json_schema)


def for_chat(rf: ResponseFormat | None, so: StructuredOutputs | None, tools: list[Tool] | None,
             tool_choice: str | NamedToolChoice | None, parallel: bool, tool_parser: str | None,
             reasoning_end: str | None) -> StructuredOutputsParams | None:
    """A chat request's constraint: the forced tool call or the requested format, after reasoning_end if set."""
    if forces_a_call(tool_choice):
        if (rf is not None and rf.type != "text") or so is not None:
            raise FieldError("tool_choice", choice_text(tool_choice), "forces a tool call, whose arguments follow "
                             "the tool's parameters: leave out response_format and structured_outputs")
        assert tools and tool_parser, "check_tools lets a forced tool_choice through only with tools and a parser"
        params = StructuredOutputsParams(grammar=tool_call_grammar(tools, tool_choice, tool_parser, parallel))
    else:
        params = requested(rf, so)
    if params is None or reasoning_end is None:
        return params
    return dataclasses.replace(params, reasoning_end=reasoning_end)
