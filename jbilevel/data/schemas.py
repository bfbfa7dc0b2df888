"""SFT schemas: map a raw row to (prompt text, response text).

Built-in schemas (logical field -> default column):
  ``qa``        question, response
  ``alpaca``    instruction, input (optional), output        (yahma/alpaca-cleaned)
  ``openorca``  system_prompt (optional), question, response (OpenOrca, BlueOrca/RedOrca)
  ``chat``      messages: [{"role", "content"}, ...], the last one the assistant's response
``schema="auto"`` picks one from the first row's keys. ``keys={"response": "answer"}`` renames
columns. Prompts come from a ``str.format`` template over the logical fields, or from a jinja2
chat template (``chat_template="tokenizer"`` uses the tokenizer's own).
"""

from __future__ import annotations

import dataclasses

from jbilevel.config import ConfigError
from jbilevel.data.report import DataError

QA_TEMPLATE = "Question: {question}\nAnswer: "
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ORCA_TEMPLATE = "{system_prompt}\n\nQuestion: {question}\nAnswer: "
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Schema:
    """One SFT row layout.

    Attributes:
      name: schema name.
      required: logical prompt fields that must be non-empty strings.
      optional: logical prompt fields that may be missing or empty.
      response: logical response field (None for chat).
      template: ``str.format`` prompt template over the logical fields.
      template_short: template used when every optional field is empty (None: ``template``).
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    response: str | None
    template: str
    template_short: str | None = None


SCHEMAS = {
    "qa": Schema("qa", ("question",), (), "response", QA_TEMPLATE),
    "alpaca": Schema(
        "alpaca", ("instruction",), ("input",), "output", ALPACA_TEMPLATE, ALPACA_NO_INPUT_TEMPLATE
    ),
    "openorca": Schema(
        "openorca", ("question",), ("system_prompt",), "response", ORCA_TEMPLATE, QA_TEMPLATE
    ),
    "chat": Schema("chat", ("messages",), (), None, ""),
}


def detect_schema(row: dict, where: str) -> str:
    """Args: the first row and its location. Returns: the schema name its keys fit."""
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"system_prompt", "question", "response"} <= keys:
        return "openorca"
    if {"question", "response"} <= keys:
        return "qa"
    raise DataError(
        f"{where}: cannot detect the schema from keys ({', '.join(sorted(keys))}); "
        f"set schema= one of {', '.join(SCHEMAS)} and keys={{logical: column}}",
        "unknown_schema",
    )


class Formatter:
    """Turns rows of one schema into (prompt, response) strings, raising named DataErrors."""

    def __init__(self, schema: str, *, keys=None, prompt_template=None, chat_template=None,
                 chat_template_kwargs=None, tokenizer=None):
        if schema not in SCHEMAS:
            raise ConfigError(f"unknown schema {schema!r} (data.schema); use one of auto, "
                              f"{', '.join(SCHEMAS)}")
        self.schema = SCHEMAS[schema]
        self.keys = dict(keys or {})
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tokenizer = tokenizer
        self._jinja = None
        if schema == "chat" and chat_template is None:
            self.chat_template = DEFAULT_CHAT_TEMPLATE
        if self.chat_template not in (None, "tokenizer"):
            import jinja2

            env = jinja2.Environment(keep_trailing_newline=True)
            self._jinja = env.from_string(self.chat_template)
        if self.chat_template_kwargs and self.chat_template is None:
            raise ConfigError(
                f"data.chat_template_kwargs={self.chat_template_kwargs} but no chat template "
                f"formats schema {schema!r}: set data.chat_template (e.g. tokenizer), or drop "
                "the kwargs")

    def column(self, field: str) -> str:
        return self.keys.get(field, field)

    def _get(self, row: dict, where: str, field: str, *, required: bool) -> str:
        col = self.column(field)
        if col not in row:
            if not required:
                return ""
            raise DataError(
                f"{where}: missing key {col!r} (available: {', '.join(sorted(row))}); "
                f"set keys={{{field!r}: '<column>'}}",
                "missing_key",
            )
        value = row[col]
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {col!r} must be a string, got {type(value).__name__} "
                f"({str(value)[:40]!r}); convert it or map another column with keys=",
                "bad_type",
            )
        if required and not value.strip():
            reason = "empty_response" if field == self.schema.response else "empty_prompt"
            raise DataError(f"{where}: field {col!r} is empty; fill it in or delete the row",
                            reason)
        return value

    def __call__(self, row: dict, where: str) -> tuple[str, str]:
        """Args: a raw row and its location. Returns: (prompt text, response text)."""
        if self.schema.name == "chat":
            return self._chat(row, where)
        fields = {f: self._get(row, where, f, required=True) for f in self.schema.required}
        fields.update({f: self._get(row, where, f, required=False) for f in self.schema.optional})
        response = self._get(row, where, self.schema.response, required=True)
        if self.chat_template is not None:
            return self._render(self._as_messages(fields)), response
        template = self.prompt_template
        if template is None:
            short = self.schema.template_short
            empty = all(not fields[f].strip() for f in self.schema.optional)
            template = short if (short and empty) else self.schema.template
        try:
            return template.format(**fields), response
        except KeyError as e:
            raise ConfigError(
                f"prompt_template (data.prompt_template) uses field {e} but schema "
                f"{self.schema.name!r} has {', '.join(fields)}; use those names in the template"
            ) from None

    def _as_messages(self, fields: dict) -> list[dict]:
        user = fields.get("question") or fields.get("instruction", "")
        if fields.get("input", "").strip():
            user = f"{user}\n\n{fields['input']}"
        messages = [{"role": "user", "content": user}]
        if fields.get("system_prompt", "").strip():
            messages.insert(0, {"role": "system", "content": fields["system_prompt"]})
        return messages

    def _render(self, messages: list[dict]) -> str:
        if self.chat_template == "tokenizer":
            hf = getattr(self.tokenizer, "hf", self.tokenizer)
            return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                          **self.chat_template_kwargs)
        return self._jinja.render(**{"bos_token": "", "eos_token": "",
                                     **self.chat_template_kwargs},
                                  messages=messages, add_generation_prompt=True)

    def _chat(self, row: dict, where: str) -> tuple[str, str]:
        col = self.column("messages")
        if col not in row:
            raise DataError(
                f"{where}: missing key {col!r} (available: {', '.join(sorted(row))}); "
                "set keys={'messages': '<column>'}",
                "missing_key",
            )
        messages = row[col]
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{where}: {col!r} must be a list of at least 2 messages", "bad_type")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str
            ):
                raise DataError(
                    f"{where}: {col}[{k}] must be {{'role': str, 'content': str}}", "bad_type"
                )
        last = messages[-1]
        if last["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's response "
                f"(got role {last['role']!r})",
                "bad_type",
            )
        if not last["content"].strip():
            raise DataError(f"{where}: {col}[-1] (the response) is empty", "empty_response")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return self._render(prompt), last["content"]
