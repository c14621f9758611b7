"""Chat and instruction records -> text pieces, each marked with whether it gets loss.

A sample is rendered into pieces whose concatenation is exactly what the template renders for the whole
conversation; the supervised pieces are found by rendering prefixes of the conversation, never by searching
marker strings (most templates have no generation markers):

    prompt_k = render(messages[:k], add_generation_prompt=True)      # ... up to the assistant header of turn k
    upto_k   = render(messages[:k+1])                                # ... through the assistant turn k
    supervised piece of turn k = upto_k[len(prompt_k):]               # its content and what closes it (EOS / end-of-turn)

Each rendering must extend the previous one (a prefix-stable template); one that does not is refused, naming the
turn. Pieces are tokenized one by one and concatenated, so a piece boundary is a token boundary and the loss mask
is exact: generation tokenizes `prompt_k` the same way. prompt_completion records are two pieces,
prompt (no loss) and completion + EOS (loss), with no template. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from distclm.errors import UserError, first_line

FORMATS = ("text", "chat", "prompt_completion")

# The documented default (ChatML-style) for tokenizers without a template of their own. A turn is
# "<|im_start|>ROLE\nCONTENT" closed by the tokenizer's EOS, which every tokenizer has, so generation stops
# at it and the turn's end is one token whatever the vocabulary.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# prompt_completion at generation: the prompt as it is (a user turn's content), nothing around it.
PLAIN_TEMPLATE = "{%- for message in messages %}{{- message['content'] }}{%- endfor %}"


def template_sha256(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest() if template is not None else None


def resolve_template(spec: str, own: str | None) -> tuple[str, str]:
    """--data.chat_template (auto | default | a Jinja file) and the tokenizer's own template -> (template, origin)."""
    if spec == "auto":
        return (own, "tokenizer") if own else (DEFAULT_TEMPLATE, "default")
    if spec == "default":
        return DEFAULT_TEMPLATE, "default"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--data.chat_template={spec}: no such file (auto, default, or a Jinja template file)")
    try:
        return path.read_text(encoding="utf-8"), f"file {path.name}"
    except UnicodeDecodeError as exc:
        raise UserError(f"--data.chat_template={spec}: not UTF-8 text (byte {exc.start}); a Jinja template file "
                        f"is text") from None


def template_label(d, origin: str) -> str:
    """The template named as the user chose it, for an error line: the file's flag, or the tokenizer's own."""
    if origin == "tokenizer":
        return f"the tokenizer's chat template (--data.tokenizer={d.tokenizer})"
    return "the default chat template" if origin == "default" else f"--data.chat_template={d.chat_template}"


def own_template(hf) -> str | None:
    """A transformers tokenizer's own chat template (a string), when it has one."""
    return normalise_template(getattr(hf, "chat_template", None))


def normalise_template(t) -> str | None:
    """A tokenizer config's chat_template (a string, or several named ones) -> the default one's text, or None."""
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


class TemplateFailed(ValueError):
    """The chat template itself failed (syntax, or an error while rendering): the caller names which template."""


# What a template can raise while rendering, besides jinja2's own TemplateError (syntax, undefined, security,
# raise_exception): Python's errors from the expressions it evaluates (`1/0`, `'a' + 1`, an `{% include %}` with no
# loader, `'x'.index('y')`, a recursive macro). Caught at the one place templates run (compile_template, render).
RENDER_ERRORS = (ArithmeticError, TypeError, ValueError, LookupError, RecursionError)


@lru_cache(maxsize=8)
def compile_template(template: str):
    """Jinja as transformers renders chat templates (sandboxed, trim_blocks, lstrip_blocks, loop controls)."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: "1970-01-01"  # fixed: the same input gives the same bytes
    try:
        return env.from_string(template), dict(env.globals)
    except TemplateSyntaxError as exc:  # an undefined filter or test too (TemplateAssertionError)
        raise TemplateFailed(f"not a valid Jinja template: line {exc.lineno}: {_first_line(exc)}") from None
    except TemplateError as exc:
        raise TemplateFailed(f"not a valid Jinja template: {_first_line(exc)}") from None


def _first_line(exc) -> str:
    """Jinja's own message (a syntax error's without the source it quotes), its first line."""
    return first_line(exc) if getattr(exc, "message", None) is None else first_line(Exception(exc.message))


def _tojson(value, indent=None, **_):
    return json.dumps(value, indent=indent, ensure_ascii=False)


def render(template: str, messages: list[dict], add_generation_prompt: bool, specials: dict) -> str:
    """The template applied to `messages`; TemplateFailed (one line: the error's type and first line) when the
    template does not compile or fails on them."""
    from jinja2 import TemplateError

    compiled, names = compile_template(template)
    # A shared context over one dict of the globals and the variables: Template.render would merge the globals
    # into a fresh context on every call, most of the cost of rendering a short conversation.
    variables = {**names, "messages": messages, "add_generation_prompt": add_generation_prompt, **specials}
    try:
        return "".join(compiled.root_render_func(compiled.new_context(variables, shared=True)))
    except TemplateError as exc:
        raise TemplateFailed(f"the template failed: {_first_line(exc)}") from None
    except RENDER_ERRORS as exc:
        raise TemplateFailed(f"the template failed: {type(exc).__name__}: {_first_line(exc)}") from None


def chat_pieces(messages, template: str, specials: dict, train_on: str) -> list[tuple[str, bool]]:
    """A conversation -> [(text, supervised)], concatenating to render(messages). See the module docstring."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("expected a list of {role, content} messages")
    messages = [{**m, "content": content_text(m.get("content"), k)} for k, m in enumerate(messages)]
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(template, messages[:k], True, specials)
            _extend(pieces, done, prompt, False, k)
            done = prompt
        elif k + 1 < len(messages) and messages[k + 1]["role"] == "assistant":
            continue  # the next turn's prompt renders this message too, in the same unsupervised piece
        upto = render(template, messages[:k + 1], False, specials)
        _extend(pieces, done, upto, message["role"] == "assistant", k)
        done = upto
    if train_on == "all":
        return [(text, True) for text, _ in pieces]
    return pieces


def content_text(content, k: int) -> str:
    """A message's content as the text the template sees: a string as it is, null as "", and a list of text parts
    (`[{"type": "text", "text": ...}]`, the OpenAI / transformers multimodal shape) as its texts concatenated,
    which is what the templates that take parts render (`{% for part in message['content'] %}{% if part['type'] ==
    'text' %}{{ part['text'] }}`: no separator between parts). A part that is not text (an image, audio) or content
    of another type is refused: this is a text model's data, and its repr is not the text."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"message {k}: content is {_kind(content)}; expected a string or a list of text parts "
                         f"[{{\"type\": \"text\", \"text\": ...}}]")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") not in (None, "text"):
            raise ValueError(f"message {k}: content part {j} is of type {json.dumps(part['type'])}: only text parts "
                             f"can be trained on here; drop the record or its non-text parts")
        else:
            raise ValueError(f"message {k}: content part {j} is {_kind(part)}; expected "
                             f"{{\"type\": \"text\", \"text\": \"...\"}}")
    return "".join(texts)


def _kind(value) -> str:
    """A JSON value named for an error line: its JSON type and a short view of it."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    text = json.dumps(value, ensure_ascii=False)
    return f"{names.get(type(value), type(value).__name__)} ({text[:40] + '...' if len(text) > 40 else text})"


def _extend(pieces: list, done: str, longer: str, supervised: bool, turn: int) -> None:
    if not longer.startswith(done):
        raise ValueError(f"the chat template is not prefix-stable at message {turn}: rendering the conversation up "
                         f"to it changes what it rendered before, so the answer spans cannot be found")
    if len(longer) > len(done):
        if pieces and pieces[-1][1] == supervised:  # one piece per run of the same kind: one tokenization
            pieces[-1] = (pieces[-1][0] + longer[len(done):], supervised)
        else:
            pieces.append((longer[len(done):], supervised))


def completion_pieces(prompt, completion, eos_text: str, train_on: str) -> list[tuple[str, bool]]:
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("prompt and completion must be strings (a conversation goes in a messages list with "
                         "--data.format=chat)")
    return [(prompt, train_on == "all"), (completion + eos_text, True)]


def detect_format(record: dict, d) -> str:
    """The format of a record: chat (a message list at messages_field), prompt_completion, else text."""
    if isinstance(record, dict):
        if isinstance(record.get(d.messages_field), list):
            return "chat"
        if d.prompt_field in record and d.completion_field in record:
            return "prompt_completion"
    return "text"


def end_of_turn(template: str, specials: dict, encode) -> tuple[str, int | None]:
    """What closes an assistant turn: the text after the content of a probe answer, and its first token id
    (None when the template closes a turn with nothing)."""
    probe = "\x00answer\x00"
    pieces = chat_pieces([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}],
                         template, specials, "assistant")
    answer = next((text for text, sup in pieces if sup), "")
    tail = answer.split(probe, 1)[1] if probe in answer else ""
    ids = encode(tail) if tail else []
    return tail, (int(ids[0]) if len(ids) else None)
