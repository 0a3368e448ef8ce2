"""tokenizer.json wrapper: encode, decode, streaming detokenization, chat templates rendered as transformers does."""

from __future__ import annotations

import json
from pathlib import Path


# The files that make a model folder's tokenizer: copied along whenever a model is exported or converted.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable bytes stand for themselves, the rest for U+0100 onwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(0x100 + i): b for i, b in enumerate(rest)}}


_BYTE_OF_CHAR = _byte_alphabet()


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token {value!r} must be a string or a dict with a string 'content'")


def _read_chat_template(folder: Path, config: dict) -> str | None:
    # transformers >= 4.43 writes chat_template.jinja next to the config and prefers it when loading
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template in {folder} must be a string or a list of named templates")
    return template


def _compile_template(template: str):
    """A jinja2 template in the environment transformers' apply_chat_template uses, so renderings match exactly."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


def _check_messages(messages) -> list[dict]:
    """Copies of the messages without None-valued keys, after checking role and content.

    An assistant message with tool_calls keeps a None content, as vLLM does: DeepSeek's templates test
    `content is none` to write the calls alone (transformers 5 drops it, and V3's template then fails).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        calls = message.get("tool_calls")
        message = {k: v for k, v in message.items() if v is not None or (k == "content" and calls)}
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] has no string 'role' (got {message.get('role')!r})")
        if calls is not None and not isinstance(calls, list):
            raise ValueError(f"messages[{i}] has 'tool_calls' that is not a list")
        if not isinstance(message.get("content"), (str, list)) and not calls:
            raise ValueError(f"messages[{i}] (role {message['role']!r}) has no 'content' string or list of parts")
        clean.append(message)
    return clean


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json adds: BOS policy, special tokens, chat template."""

    def __init__(self, backend, config: dict | None = None, chat_template: str | None = None):
        config = config or {}
        self._tok = backend
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.bos_token_id = self._special_id(self.bos_token, "bos_token")
        self.eos_token_id = self._special_id(self.eos_token, "eos_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._compiled = None

    def _special_id(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} from tokenizer_config.json is not in tokenizer.json's vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer | None":
        """Load PATH/tokenizer.json (+ tokenizer_config.json); None when the folder has no tokenizer.json."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(folder / "tokenizer.json"))
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError(f"{folder / 'tokenizer_config.json'} must hold a JSON object")
        return cls(backend, config, _read_chat_template(folder, config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; with add_special_tokens, BOS leads exactly once when add_bos_token is set."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # the post-processor, or a chat-templated text that starts with the BOS string, may already have put it there
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; bytes of an unfinished UTF-8 character decode to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        """tokenizer.json's text (the tokenizers name): what a grammar engine builds its token view from."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def token_bytes(self, id: int) -> bytes:
        """A token's own bytes: for a byte-level BPE piece of a multi-byte character, not the U+FFFD it decodes to."""
        text = self.decode([id], skip_special_tokens=False)
        piece = self.id_to_token(id) or ""
        if "\ufffd" in text and piece and all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
        return text.encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for messages, rendered like transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); "
                             "send a plain prompt instead of chat messages")
        messages = _check_messages(messages)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                   "unk_token": self.unk_token}
        variables = {k: v for k, v in special.items() if v is not None}
        variables.update(kwargs)  # as in transformers, explicit kwargs override the special tokens
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        import jinja2

        try:
            if self._compiled is None or self._compiled[0] != self.chat_template:  # chat_template is assignable
                self._compiled = (self.chat_template, _compile_template(self.chat_template))
            return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:  # a template syntax error, or its raise_exception()
            raise ValueError(f"chat template rejected the messages: {e}") from e


class IncrementalDetokenizer:
    """Streams generated text with vLLM's prefix/read offsets: each push decodes a few tokens, not the whole output.

    Not tokenizers' DecodeStream: it has no flush, so a sequence cut mid-character would lose the U+FFFD decode() shows.
    """

    CONTEXT = 5  # prompt tokens decoded before the first output token, so word-boundary spaces come out right

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - self.CONTEXT, 0)  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this are already in self.text
        self.text = ""

    def push(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the text they complete (held back while a UTF-8 character is unfinished)."""
        self.ids.extend(token_ids)
        return self._advance(hold_partial=True)

    def flush(self) -> str:
        """Emit whatever push() held back (U+FFFD included); call once if the sequence ends mid-character."""
        return self._advance(hold_partial=False)

    def _advance(self, hold_partial: bool) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        # U+FFFD at the end means the last token stopped inside a multi-byte character: wait for the rest
        if len(new_text) <= len(prefix_text) or (hold_partial and new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
