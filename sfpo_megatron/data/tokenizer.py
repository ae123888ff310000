"""One tokenizer interface over HF tokenizers and SentencePiece models.

`load_tokenizer(path)` returns an `HFTokenizer` for a local HF tokenizer directory and a
`SentencePieceTokenizer` for a `.model` file (or a directory holding only a `tokenizer.model`).
Both expose encode / decode, eos / pad / bos ids, the vocab size and `apply_chat_template`.
Nothing is ever downloaded: HF loading uses `local_files_only=True`.

`train_sentencepiece` trains the demo's tiny tokenizer (deterministic, digits split into single
tokens so arithmetic is learnable digit by digit).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

from sfpo_megatron.errors import UserError

Message = dict[str, str]


class TokenizerError(UserError):
    """A tokenizer could not be loaded, trained or used as asked."""


@dataclass(frozen=True)
class ChatFormat:
    """The chat template used for SentencePiece models (they carry none of their own).

    A conversation renders as the concatenation of each message's role pattern with `{content}`
    replaced by the message text, then `generation_prompt` when one is asked for. Defaults:

        System: <system text>
        User: <question>
        Assistant:<the model continues here>

    `{content}` is replaced literally (no str.format), so braces in prompts (LaTeX) are safe.
    """

    system: str = "System: {content}\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        patterns = {"system": self.system, "user": self.user, "assistant": self.assistant}
        parts = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in patterns:
                raise TokenizerError(
                    f"message {i} has role {role!r}; the SentencePiece chat format knows "
                    f"{sorted(patterns)}"
                )
            parts.append(patterns[role].replace("{content}", str(message.get("content", ""))))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


class Tokenizer(ABC):
    """What the data, rollout and training code needs from a tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model's embedding must cover (added tokens included)."""

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """The padding id; the eos id when the tokenizer defines no pad token."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` without special tokens (unless `add_bos`)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages`."""

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation (render then encode, so ids == encode(text))."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


class HFTokenizer(Tokenizer):
    """A local HF tokenizer directory, using the tokenizer's own chat template."""

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None) -> None:
        self.path = str(path)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot load an HF tokenizer from {self.path!r}: {exc}") from exc
        # An explicit template overrides the tokenizer's own (e.g. base models without one).
        self.chat_template = chat_template
        if self.hf.eos_token_id is None:
            raise TokenizerError(f"HF tokenizer at {self.path!r} defines no eos token")

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    @property
    def bos_id(self) -> int | None:
        bos = self.hf.bos_token_id
        return int(bos) if bos is not None else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None and not getattr(self.hf, "chat_template", None):
            raise TokenizerError(
                f"HF tokenizer at {self.path!r} has no chat template; pass chat_template= or "
                "disable chat templating for this dataset"
            )
        return self.hf.apply_chat_template(
            list(messages),
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file with a simple, configurable chat format (`ChatFormat`)."""

    def __init__(self, model_file: str | os.PathLike, chat_format: ChatFormat | None = None) -> None:
        self.path = str(model_file)
        if not Path(self.path).is_file():
            raise TokenizerError(f"SentencePiece model {self.path!r} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load SentencePiece model {self.path!r}: {exc}") from exc
        self.chat_format = chat_format or ChatFormat()
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"SentencePiece model {self.path!r} defines no eos id")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return int(pad) if pad >= 0 else self.eos_id

    @property
    def bos_id(self) -> int | None:
        bos = self.sp.bos_id()
        return int(bos) if bos >= 0 else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.sp.encode(text, add_bos=add_bos and self.bos_id is not None))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # SentencePiece's decode already drops control pieces (bos/eos/pad); unk decodes to its surface.
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.chat_format.render(messages, add_generation_prompt)


def tokenizer_from_args(args) -> "Tokenizer":
    """The tokenizer `rl` / `eval` use: ``--tokenizer-path``, else the one beside ``--model-config``."""
    return load_tokenizer(args.tokenizer_path or args.model_config)


def load_tokenizer(
    path: str | os.PathLike,
    chat_template: str | None = None,
    chat_format: ChatFormat | None = None,
) -> Tokenizer:
    """Load a local tokenizer: a SentencePiece `.model` file, or an HF tokenizer directory.

    A directory with `tokenizer.json` / `tokenizer_config.json` is loaded with HF (its chat
    template, or `chat_template` when given); a directory holding only `tokenizer.model` is read
    as a SentencePiece model with `chat_format`.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix != ".model":
            raise TokenizerError(
                f"tokenizer path {str(p)!r} is a file but not a SentencePiece .model file"
            )
        return SentencePieceTokenizer(p, chat_format)
    if not p.is_dir():
        raise TokenizerError(f"tokenizer path {str(p)!r} does not exist")
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        return HFTokenizer(p, chat_template)
    if (p / "tokenizer.model").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model", chat_format)
    raise TokenizerError(
        f"no tokenizer in {str(p)!r}: expected tokenizer.json, tokenizer_config.json or tokenizer.model"
    )


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    user_defined_symbols: Sequence[str] = (),
    model_type: str = "unigram",
    byte_fallback: bool = False,
) -> Path:

    """Train a SentencePiece model on `texts`; returns the path of `<out_prefix>.model`.

    Deterministic for the same texts and arguments: one trainer thread and every sentence used
    (no sampling). Digits are split into single tokens, text is kept verbatim (identity
    normalisation, whitespace and newlines preserved, no dummy-prefix space) so
    decode(encode(t)) == t for text made of characters seen in training, and a prompt's ids
    followed by a response's ids decode to the prompt text followed by the response text. Ids: pad 0, unk 1, bos 2, eos 3. `vocab_size` is an upper
    bound: a tiny corpus may yield fewer pieces.
    """
    if vocab_size < 8:
        raise TokenizerError(f"vocab_size must be at least 8, got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise TokenizerError("train_sentencepiece needs at least one non-empty text")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=list(user_defined_symbols),
            byte_fallback=byte_fallback,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            hard_vocab_limit=False,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(f"SentencePiece training failed for {str(out_prefix)!r}: {exc}") from exc
    return out_prefix.with_name(out_prefix.name + ".model")
