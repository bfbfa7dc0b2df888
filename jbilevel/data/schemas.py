"""SFT schemas: map a raw row to (prompt text, response text).

Built-in schemas (logical field -> default column):
  ``qa``        question, response
  ``alpaca``    instruction, input (optional), output        (yahma/alpaca-cleaned)
  ``openorca``  system_prompt (optional), question, response (OpenOrca, BlueOrca/RedOrca)
  ``chat``      messages: [{"role", "content"}, ...], the last one the assistant's response
  ``sharegpt``  conversations: [{"from", "value"}, ...] (ShareGPT, SlimOrca, OpenHermes):
                the chat schema with ``from`` human/user, gpt/assistant or system
  ``completion``       prompt, completion: texts (TRL's prompt-completion), the prompt as is
  ``chat_completion``  prompt, completion: message lists (TRL's conversational
                       prompt-completion), the chat schema's messages split in two
``schema="auto"`` picks one from the first row's keys. ``keys={"response": "answer"}`` renames
columns. Prompts come from a ``str.format`` template over the logical fields, or from a jinja2
chat template (``chat_template="tokenizer"`` uses the tokenizer's own).

How a response ends (``response_end``): ``"eos"`` trains the response text followed by the
tokenizer's eos; ``"template"`` trains what the chat template writes for the assistant's turn
after the generation prompt, up to its first end token (an instruction-tuned Gemma ends its
turns with ``<end_of_turn>``, not with its tokenizer's eos ``<eos>``), as TRL's SFT trainer does
by templating the whole conversation; ``"auto"`` takes ``"template"`` when a chat template
formats the prompts and ends an assistant turn with one of the tokenizer's end tokens
(``stop_ids``), else ``"eos"``.

Which assistant turns of a conversation are trained (``assistant_turns``; chat, sharegpt and
chat_completion):
``"all"`` trains every assistant turn (as TRL's ``assistant_only_loss`` and axolotl do): the
prompt is then :class:`Pieces`, the conversation before the last turn with each earlier
assistant turn as the template writes it (the text after that turn's generation prompt, up to
its end token; where responses end with the eos, up to the end of its content) marked trained;
``"last"`` trains the last one only, the earlier turns being context.
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
RESPONSE_ENDS = ("auto", "eos", "template")
ASSISTANT_TURNS = ("all", "last")
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
    "sharegpt": Schema("sharegpt", ("conversations",), (), None, ""),
    "completion": Schema("completion", ("prompt",), (), "completion", "{prompt}"),
    "chat_completion": Schema("chat_completion", ("prompt",), (), "completion", ""),
}
CONVERSATIONS = ("chat", "sharegpt", "chat_completion")
# ShareGPT's speaker names ("from") -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def detect_schema(row: dict, where: str) -> str:
    """Args: the first row and its location. Returns: the schema name its keys fit."""
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "chat_completion" if isinstance(row["prompt"], list) else "completion"
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


class Pieces(tuple):
    """A prompt in pieces: ``(text, trained)`` pairs whose texts, joined, are the prompt; a
    trained piece is an earlier assistant turn the loss covers (up to its first end token
    where the template's turn ends are trained), the others context."""


class Formatter:
    """Turns rows of one schema into (prompt, response) strings, raising named DataErrors.

    A conversation whose earlier assistant turns are trained (``assistant_turns="all"``) has a
    :class:`Pieces` prompt. ``conversations`` and ``earlier_turns`` count the rows with earlier
    assistant turns and those turns."""

    def __init__(self, schema: str, *, keys=None, prompt_template=None, chat_template=None,
                 chat_template_kwargs=None, tokenizer=None, response_end: str = "eos",
                 assistant_turns: str = "all"):
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
        if schema in CONVERSATIONS and chat_template is None:
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
        if response_end not in RESPONSE_ENDS:
            raise ConfigError(f"data.response_end={response_end!r}; use one of "
                              f"{', '.join(RESPONSE_ENDS)}")
        if response_end == "template" and self.chat_template is None:
            raise ConfigError(
                f"data.response_end=template ends each response as the chat template ends the "
                f"assistant's turn, but no chat template formats schema {schema!r}: set "
                "data.chat_template (e.g. tokenizer), or data.response_end=eos")
        if response_end == "auto":
            response_end = "template" if self._template_ends_turns() else "eos"
        self.response_end = response_end
        if assistant_turns not in ASSISTANT_TURNS:
            raise ConfigError(f"data.assistant_turns={assistant_turns!r}; use one of "
                              f"{', '.join(ASSISTANT_TURNS)}")
        self.assistant_turns = assistant_turns
        self.conversations = self.earlier_turns = 0

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
        if self.schema.name in CONVERSATIONS:
            return self._chat(row, where)
        fields = {f: self._get(row, where, f, required=True) for f in self.schema.required}
        fields.update({f: self._get(row, where, f, required=False) for f in self.schema.optional})
        response = self._get(row, where, self.schema.response, required=True)
        if self.chat_template is not None:
            return self._turn(self._as_messages(fields), response, where)
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
        user = fields.get("question") or fields.get("prompt") or fields.get("instruction", "")
        if fields.get("input", "").strip():
            user = f"{user}\n\n{fields['input']}"
        messages = [{"role": "user", "content": user}]
        if fields.get("system_prompt", "").strip():
            messages.insert(0, {"role": "system", "content": fields["system_prompt"]})
        return messages

    def _render(self, messages: list[dict], *, generation_prompt: bool = True,
                eos_token: bool = False) -> str:
        if self.chat_template == "tokenizer":
            hf = getattr(self.tokenizer, "hf", self.tokenizer)
            return hf.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                          tokenize=False, **self.chat_template_kwargs)
        # the bos is the pipeline's to add (data.add_bos); a template's {{ eos_token }} is the
        # tokenizer's where the template's turn ends are trained, else empty
        eos = getattr(getattr(self.tokenizer, "hf", None), "eos_token", None) or ""
        return self._jinja.render(**{"bos_token": "", "eos_token": eos if eos_token else "",
                                     **self.chat_template_kwargs},
                                  messages=messages, add_generation_prompt=generation_prompt)

    def _turn(self, messages: list[dict], response: str, where: str,
              end: str | None = None) -> tuple[str, str]:
        """(prompt, response) of one conversation: the response text alone (the eos appended
        later), or, ending as the template does (``end="template"``), the text the template
        writes after the generation prompt once the response follows (cut after its end
        token later)."""
        if (end or self.response_end) == "eos":
            return self._render(messages), response
        prompt = self._render(messages, eos_token=True)
        full = self._render([*messages, {"role": "assistant", "content": response}],
                            generation_prompt=False, eos_token=True)
        if not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template writes the conversation before the response "
                f"differently once the response follows (...{full[:len(prompt)][-40:]!r} where "
                f"the prompt has ...{prompt[-40:]!r}), so the response's turn cannot be cut "
                "from it; set data.response_end=eos (the response followed by the tokenizer's "
                "eos)", "template_turn")
        return prompt, full[len(prompt):]

    def _template_ends_turns(self) -> bool:
        """Whether the chat template ends an assistant turn with one of the tokenizer's end
        tokens (``response_end=auto``), tried on a one-question conversation."""
        if self.chat_template is None or not hasattr(self.tokenizer, "stop_ids"):
            return False
        try:
            _, turn = self._turn([{"role": "user", "content": "Hi"}], "Hello", "probe",
                                 end="template")
        except Exception:  # noqa: BLE001 - a template that cannot cut a turn: eos ends them
            return False
        if "Hello" not in turn:
            return False
        tail = turn[turn.rfind("Hello") + len("Hello"):]
        ids = self.tokenizer.encode_batch([tail])[0] if tail else []
        return any(int(i) in self.tokenizer.stop_ids for i in ids)

    def _chat(self, row: dict, where: str) -> tuple[str, str]:
        names, messages = [], []  # each message and where it stands in the row
        for field in self._message_fields():
            col = self.column(field)
            if col not in row:
                raise DataError(
                    f"{where}: missing key {col!r} (available: {', '.join(sorted(row))}); "
                    f"set keys={{{field!r}: '<column>'}}",
                    "missing_key",
                )
            if not isinstance(row[col], list):
                raise DataError(f"{where}: {col!r} must be a list of messages, got "
                                f"{type(row[col]).__name__}", "bad_type")
            names += [f"{col}[{k}]" for k in range(len(row[col]))]
            messages += row[col]
        if len(messages) < 2:
            columns = " + ".join(self.column(f) for f in self._message_fields())
            raise DataError(f"{where}: {columns} must hold at least 2 messages", "bad_type")
        role, content = ("from", "value") if self.schema.name == "sharegpt" else ("role",
                                                                                  "content")
        for name, m in zip(names, messages, strict=True):
            if not isinstance(m, dict) or not isinstance(m.get(role), str) or not isinstance(
                m.get(content), str
            ):
                raise DataError(f"{where}: {name} must be {{{role!r}: str, {content!r}: str}}",
                                "bad_type")
        if self.schema.name == "sharegpt":
            messages = [{"role": self._speaker(m["from"], f"{where}: {name}"),
                         "content": m["value"]} for name, m in zip(names, messages, strict=True)]
        last = messages[-1]
        if last["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's response "
                f"(got role {last['role']!r})",
                "bad_type",
            )
        if not last["content"].strip():
            raise DataError(f"{where}: {names[-1]} (the response) is empty", "empty_response")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        text, response = self._turn(prompt, last["content"], where)
        earlier = [k for k, m in enumerate(prompt) if m["role"] == "assistant"]
        if earlier:
            self.conversations += 1
            self.earlier_turns += len(earlier)
        if earlier and self.assistant_turns == "all":
            return self._pieces(prompt, earlier, text, where, names), response
        return text, response

    def _message_fields(self) -> tuple[str, ...]:
        """The fields holding a conversation's messages, in order (chat_completion: two)."""
        return self.schema.required + ((self.schema.response,) if self.schema.response else ())

    @staticmethod
    def _speaker(name: str, where: str) -> str:
        """A ShareGPT speaker's chat role; one it does not know is refused by name."""
        if name.lower() not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}: 'from' is {name!r}, not one of {', '.join(SHAREGPT_ROLES)}; convert "
                "the rows to the chat schema (messages with roles user/assistant/system), or "
                "set data.on_bad_row=skip", "bad_type")
        return SHAREGPT_ROLES[name.lower()]

    def _pieces(self, messages: list[dict], earlier: list[int], prompt: str, where: str,
                names: list[str]) -> Pieces:
        """``prompt`` (the rendered ``messages``) cut into context and the earlier assistant
        turns ``earlier``: turn k is what the template writes after the generation prompt that
        follows ``messages[:k]``, found where ``messages[:k + 1]`` ends in the prompt; where
        responses end with the eos (``response_end="eos"``), only up to the end of its content
        (the template's text after it, e.g. a newline, stays context)."""
        eos = self.response_end == "template"
        pieces, at = [], 0
        for k in earlier:
            try:
                before = self._render(messages[:k], eos_token=eos)
                through = self._render(messages[: k + 1], generation_prompt=False, eos_token=eos)
                ok = prompt.startswith(through) and through.startswith(before) and len(before) >= at
                detail = "" if ok else f"it ends ...{through[-50:]!r} there"
            except Exception as e:  # noqa: BLE001 - e.g. a template refusing an assistant first
                detail = f"rendering the history up to it fails: {type(e).__name__}: {e}"
            if detail:
                raise DataError(
                    f"{where}: the chat template writes assistant turn {names[k]} "
                    f"differently as history than as the conversation's latest turn ({detail}), "
                    "so the turn cannot be cut out and trained; set data.assistant_turns=last "
                    "(earlier turns are then context, only the last one trained)",
                    "template_turn")
            turn = through[len(before):]
            if not eos:  # the response ends with the eos, not the template's turn end: the
                # content alone trains, or the two ends would be taught after an answer
                content = messages[k]["content"].strip()
                turn = turn[: turn.find(content) + len(content)] if content in turn else turn
            pieces += [(prompt[at:len(before)], False), (turn, True)]
            at = len(before) + len(turn)
        pieces.append((prompt[at:], False))
        return Pieces((text, trained) for text, trained in pieces if text)
