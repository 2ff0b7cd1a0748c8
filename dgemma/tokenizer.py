"""Tokenizer and chat template for DiffusionGemma.

What it does: loads a HF-format tokenizer directory (tokenizer.json plus an optional chat template), encodes and
decodes text, renders chat messages with the checkpoint's Jinja chat template, and gives per-token text pieces
for a live view of a denoising canvas.

Design choices:
- Only the `tokenizers` library and `tokenizer.json` are used: no `transformers`, no `trust_remote_code`, no
  pickle. Special-token ids are looked up by their strings ("<bos>", "<pad>"), never hard-coded.
- `encode` never adds special tokens (add_special_tokens=False). The chat template emits `<bos>` itself, so
  `encode_chat` renders and then encodes the string as is: exactly one BOS (REFERENCE.md §7).
- The chat template is downloaded data, so it is rendered in jinja2's ImmutableSandboxedEnvironment; a template
  that reaches for Python internals fails with a ValueError instead of running. The environment mirrors what
  HF templates expect: trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, a json `tojson` filter and
  `strftime_now`.
- Template lookup order: an explicit `chat_template` argument, then `chat_template.jinja`, then the
  "chat_template" field of tokenizer_config.json (a string, or a list of {name, template} where "default" wins).
- `decode_token_pieces` decodes each id on its own (diffusion fills positions out of order, so there is no
  left context to decode against); a byte-level token holding part of a UTF-8 character shows as U+FFFD.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

DEFAULT_DIR = Path(__file__).parent / "assets" / "default"  # bundled tokenizer of the default tiny model
VALID_ROLES = ("system", "developer", "user", "assistant", "model", "tool")


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
    ):
        self._tok = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_to_id(bos_token)
        self.eos_id = self.token_to_id(eos_token)
        self.pad_id = self.token_to_id("<pad>")
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template is not None else None

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        """Load tokenizer.json (required), tokenizer_config.json and chat_template.jinja (optional) from `path`."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (looked for {tok_file})")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if chat_template is None:
            chat_template = _find_template(path, config)
        return cls(
            HFTokenizer.from_file(str(tok_file)),
            chat_template=chat_template,
            bos_token=_token_str(config.get("bos_token")) or "<bos>",
            eos_token=_token_str(config.get("eos_token")) or "<eos>",
        )

    def token_to_id(self, tok: str) -> int | None:
        return self._tok.token_to_id(tok)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and not text.startswith(self.bos_token):
            if self.bos_id is None:
                raise ValueError(f"add_bos=True but the tokenizer has no {self.bos_token!r} token")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_token_pieces(self, ids) -> list[str]:
        """Text of each id on its own, for a live view; special tokens render as ""."""
        return ["" if i in self.special_ids else self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        **kwargs: Any,
    ) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template.jinja or tokenizer_config.json)")
        _validate_messages(messages)
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                **context,
            )
        except SecurityError as e:
            raise ValueError(f"the chat template tried to access unsafe attributes: {e}") from e
        except TemplateError as e:
            raise ValueError(f"chat template rendering failed: {e}") from e

    def encode_chat(
        self, messages: list[dict], enable_thinking: bool = False, add_generation_prompt: bool = True
    ) -> list[int]:
        """Render the chat and encode it without adding special tokens (the template already emits <bos>)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        return self.encode(text, add_bos=False)


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    # HF templates expect plain json.dumps (jinja's built-in tojson HTML-escapes '<', '>' and '&').
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e


def _find_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the "default" entry is the chat one
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in by_name:
            return by_name["default"]
    raise ValueError(f"tokenizer_config.json in {path}: chat_template must be a string or a list with a 'default'")


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict with "content".
    return value.get("content") if isinstance(value, dict) else value


def _validate_messages(messages: list[dict]) -> None:
    # ValueError, not TypeError, throughout (hence the noqa): bad messages are user input (STYLE.md rule 16).
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, not {type(messages).__name__}")  # noqa: TRY004
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict, not {type(m).__name__}")  # noqa: TRY004
        if m.get("role") not in VALID_ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(VALID_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            kind = type(content).__name__
            raise ValueError(f"message {i} ({m['role']}) needs a string 'content', not {kind}")  # noqa: TRY004
