"""Text <-> token ids: prompt encoding (with the chat template on request) and incremental,
UTF-8-safe detokenization for streaming."""

from __future__ import annotations

from jaxinfer.validate import as_text


def encode_prompt(tokenizer, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of `text`; with `chat`, wrapped as one user turn by the model's chat template."""
    as_text("prompt", text)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids instead of text")
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat was asked for but this model's tokenizer has no chat template")
    return apply_chat_template(tokenizer, [{"role": "user", "content": text}])


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant's
    turn. What the template refuses (a system turn where it allows none, roles out of order: its
    `raise_exception`) is a ValueError with the template's message."""
    from jinja2 import TemplateError  # transformers renders templates with jinja2

    _check_texts("messages", messages)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except TemplateError as e:
        raise ValueError(f"the model's chat template refused these messages: {e}") from None
    except TypeError as e:  # messages of a shape it cannot read (tool_calls: 5, say)
        raise ValueError(
            f"the model's chat template failed on these messages: {type(e).__name__}: {e}"
        ) from None
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _check_texts(name: str, value) -> None:
    """Every string in `value` (nested dicts and lists) is valid Unicode (ValueError naming it):
    a lone surrogate would fail in the tokenizer as a TypeError."""
    if isinstance(value, str):
        as_text(name, value, allow_empty=True)
    elif isinstance(value, dict):
        for key, v in value.items():
            _check_texts(f"{name}.{key}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_texts(f"{name}[{i}]", v)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Text is decoded from a short window of recent tokens, so a token's text can depend on its
    left neighbours (SentencePiece spaces, byte-level merges) without re-decoding everything.
    The window starts on the prompt's last tokens (`prompt_ids`): decoded alone, a first output
    token such as SentencePiece's "▁Paris" would lose its leading space.
    """

    CONTEXT = 5  # prompt tokens the first window starts with
    # Tokens held back while their text ends in U+FFFD before it is let out as it is: a UTF-8
    # character takes at most 4 bytes, so only invalid bytes (or a U+FFFD the model wrote,
    # followed by more) stay unfinished that long; the bound keeps each push's decode short.
    MAX_HELD = 16

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids=()):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = [int(t) for t in list(prompt_ids)[-self.CONTEXT :]]
        self.prefix_offset = 0  # window start: decoded but already emitted context
        self.read_offset = len(self.ids)  # tokens whose text has been emitted (or the prompt's)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text that became final (possibly '')."""
        self.ids.append(int(token_id))
        prefix, full = self._window()
        held = len(self.ids) - self.read_offset
        if (full.endswith("\ufffd") and held < self.MAX_HELD) or len(full) <= len(prefix):
            return ""  # an incomplete multi-byte character: wait for the next token
        return self._let_out(prefix, full)

    def flush(self) -> str:
        """The text held back at the end, once no token follows: what came before a character
        whose bytes never all came (the space of a last token " " + half an emoji, say). The
        half character itself is left out (trailing U+FFFD), as vLLM leaves it out."""
        return self._let_out(*self._window()).rstrip("\ufffd")

    def _window(self) -> tuple[str, str]:
        """(the text already let out, all the text) of the window."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return prefix, self._decode(self.ids[self.prefix_offset :])

    def _let_out(self, prefix: str, full: str) -> str:
        """Moves the window past the tokens held back; their text."""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""
