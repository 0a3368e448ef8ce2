"""OpenAI's tool objects (the request's tools and tool_choice, an assistant's tool calls), the grammar that forces
a call under tool_choice "required" or a named function, and the check of a finished output against that choice."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from .parsers import TOOL_PARSERS, ToolCall

# compact JSON arguments, as in the engine's json constraint: free whitespace lets a model that writes code pad forever
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: parameters left out


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallItem(BaseModel):
    """A tool call of an assistant message in the history."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


def choice_text(choice: str | NamedToolChoice) -> str:
    return repr(choice) if isinstance(choice, str) else f"{{function: {choice.function.name!r}}}"


def forces_a_call(choice: str | NamedToolChoice | None) -> bool:
    return choice == "required" or isinstance(choice, NamedToolChoice)


def tool_call_grammar(tools: list[Tool], choice: str | NamedToolChoice, parser: str, parallel: bool = True) -> str:
    """llguidance Lark for the whole output under a forced tool_choice, in the tool-call parser's format.

    A named function: exactly one call of it. "required": one or more calls (one when parallel is false), each of
    any of the tools, as vLLM's "required" allows a list. A call's arguments are `%json` of the function's
    parameters, so they validate against them. The tags are text literals: llguidance tokenizes each lexeme, so a
    tokenizer that spells a tag in several tokens is forced through them one by one (one that marks a tag special
    would have it spelled in plain tokens too: llguidance keeps special tokens for `<name>` references).
    """
    fmt = TOOL_PARSERS[parser]
    allowed = [t for t in tools if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
    rules = []
    for i, tool in enumerate(allowed):
        before, after = fmt.call_parts(tool.function.name)
        schema = {"x-guidance": COMPACT_JSON, **(tool.function.parameters or NO_PARAMETERS)}
        rules.append(f"call_{i}: {_lit(before)} %json {json.dumps(schema, ensure_ascii=False)} {_lit(after)}")
    more = f"({_lit(fmt.between)} call)*" if fmt.between else "call*"
    calls = f"call {more}" if parallel and not isinstance(choice, NamedToolChoice) else "call"
    start = f"start: {_lit(fmt.calls_begin)} {calls} {_lit(fmt.calls_end)}"
    return "\n".join([start, "call: " + " | ".join(f"call_{i}" for i in range(len(allowed))), *rules])


def _lit(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def unmet_tool_choice(choice: str | NamedToolChoice, tools: list[Tool], calls: list[ToolCall]) -> str | None:
    """What is wrong with calls under tool_choice "required" / a named function, or None: a call must exist, name
    the function asked for (or a known one), and carry a JSON object that validates against its parameters."""
    schemas = {t.function.name: t.function.parameters for t in tools}
    if not calls:
        return "the model called no tool"
    for call in calls:
        if isinstance(choice, NamedToolChoice) and call.name != choice.function.name:
            return f"the model called {call.name!r}, not {choice.function.name!r}"
        if call.name not in schemas:
            return f"the model called {call.name!r}, which is not in tools"
        try:
            args = json.loads(call.arguments)
        except json.JSONDecodeError as e:
            return f"the arguments of {call.name!r} are not JSON: {e}"
        if schemas[call.name] is not None and (error := _schema_error(args, schemas[call.name])):
            return f"the arguments of {call.name!r} do not validate: {error}"
    return None


def _schema_error(value, schema: dict) -> str | None:
    try:
        import jsonschema
    except ImportError:  # optional: without it only the JSON is checked
        return None if isinstance(value, dict) else "not a JSON object"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        return e.message
    except jsonschema.SchemaError as e:
        return f"the tool's parameters are not a valid JSON Schema: {e.message}"
    return None
