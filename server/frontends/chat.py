"""Chat conversations to prompt token ids, through the model's own chat template.

The template comes from the tokenizer files (``chat_template`` in
``tokenizer_config.json`` or ``chat_template.jinja``), or from the file given
with ``--chat-template``, which wins. It is rendered with transformers'
sandboxed Jinja environment, with the template's own tool and system
handling: ``tools`` are passed through, assistant ``tool_calls`` carry their
arguments as objects (what GLM-4 and Llama-3 templates expect) and
``role: tool`` messages keep their ``tool_call_id``.

A conversation the template can't render (it raises, e.g. "roles must
alternate") is the client's error: 400 naming the messages field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from autoglm_server.errors import InvalidRequestError


class ChatTokenizer(Protocol):
    """What rendering needs from a Hugging Face tokenizer."""

    chat_template: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def template_messages(messages: Sequence[Any], field: str = "messages") -> list[dict[str, Any]]:
    """OpenAI chat messages (``ChatMessage`` models) -> the dicts chat templates read."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            if role != "assistant":
                raise InvalidRequestError(f"{field}[{i}].tool_calls", "only assistant messages")
            calls = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise InvalidRequestError(
                        f"{field}[{i}].tool_calls[{j}].function.arguments",
                        "must be a JSON object",
                    ) from None
                if not isinstance(arguments, dict):
                    raise InvalidRequestError(
                        f"{field}[{i}].tool_calls[{j}].function.arguments",
                        "must be a JSON object",
                    )
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            item["tool_calls"] = calls
        if role == "tool":
            if message.tool_call_id is None:
                raise InvalidRequestError(f"{field}[{i}].tool_call_id", "is required for tool")
            item["tool_call_id"] = message.tool_call_id
        elif message.tool_call_id is not None:
            raise InvalidRequestError(f"{field}[{i}].tool_call_id", "only for role tool")
        out.append(item)
    return out


class ChatRenderer:
    """Renders conversations for one tokenizer (and an optional override template)."""

    def __init__(self, tokenizer: ChatTokenizer, template: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.template: str | None = template or _template_text(tokenizer)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        field: str = "messages",
    ) -> list[int]:
        """Prompt token ids for ``messages`` with the assistant's turn opened."""
        if not self.template:
            raise InvalidRequestError(
                field,
                "this model has no chat template; start the server with --chat-template FILE",
            )
        if not messages:
            raise InvalidRequestError(field, "must not be empty")
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # jinja2.TemplateError, raise_exception(), a bad key ...
            detail = str(exc).strip() or type(exc).__name__
            raise InvalidRequestError(
                field, f"the chat template cannot render this conversation: {detail}"
            ) from None
        if not isinstance(text, str):
            raise InvalidRequestError(field, "the chat template did not render text")
        # The template writes its own special tokens (BOS included); don't add them twice.
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False)]


def _template_text(tokenizer: ChatTokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def read_template(path: str) -> str:
    """The text of a ``--chat-template`` file; ValueError naming the flag when unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"chat_template: cannot read {path}: {exc}") from None
    if not text.strip():
        raise ValueError(f"chat_template: {path} is empty")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template: {path} line {exc.lineno}: {exc.message}") from None
    return text
