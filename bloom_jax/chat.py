"""Chat templates: the Jinja template that turns a conversation into the prompt an instruction-tuned checkpoint
was trained on, as transformers renders it (a sandboxed environment, `messages`, `add_generation_prompt`, the
tokenizer's special tokens, `raise_exception`).

BLOOM's and bloomz's tokenizer configs carry no template; `--chat-template` gives one (a file or the text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bloom_jax import storage
from bloom_jax.errors import BloomJaxError, one_line


class ChatTemplate:
    """A compiled chat template and the special tokens it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise BloomJaxError(f"{origin}: not a valid Jinja template: {one_line(e)}") from None
        self.source, self.special_tokens, self.origin = source, special_tokens or {}, origin

    @classmethod
    def load(cls, given: str | os.PathLike | None, tokenizer_config: bytes | None,
             setting: str = "--chat-template") -> ChatTemplate | None:
        """`given` (a file, a URL, or the template's text when it is no file), else the `chat_template` of a
        `tokenizer_config.json` (its text; None: there is none); None when neither has one. `setting` names where
        `given` came from in errors."""
        config = {}
        if tokenizer_config is not None:
            try:
                config = json.loads(tokenizer_config)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BloomJaxError("tokenizer_config.json is not valid JSON") from None
        special = {name: token.get("content") if isinstance(token, dict) else token
                   for name in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if isinstance(token := config.get(name), (str, dict))}
        if given is not None:
            if storage.is_remote(given):
                data = storage.read_bytes(given)
                if data is None:
                    raise BloomJaxError(f"{setting}: no such file: {given}")
                return cls(data.decode(), special, str(given))
            path = Path(given)
            if path.is_file():
                return cls(path.read_text(), special, str(path))
            if "{" not in str(given):
                raise BloomJaxError(f"{setting}: {given} is neither a file nor a Jinja template")
            return cls(str(given), special, setting)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template, special, "tokenizer_config.json") if isinstance(template, str) else None

    def render(self, messages: list[dict]) -> str:
        """The prompt of a conversation, ending where the assistant's reply starts. A template's own error (a
        conversation it refuses) is a `ValueError` with its message."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {one_line(e)}") from None


__all__ = ["ChatTemplate"]
