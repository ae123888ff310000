"""Tokenizer interface: SentencePiece training / round trips and a locally built HF tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import arithmetic_texts, save_chat_tokenizer

from sfpo_megatron.data.tokenizer import (
    ChatFormat,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp") / "arith"
    return train_sentencepiece(arithmetic_texts(800, 0), 96, out, user_defined_symbols=["<answer>", "</answer>"])


def test_sentencepiece_round_trip_and_single_digit_tokens(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 20 < tok.vocab_size <= 96
    for text in arithmetic_texts(50, seed=123):  # unseen texts, same alphabet
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # newlines and spaces survive
        pieces = [tok.sp.id_to_piece(i) for i in ids]
        assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces), pieces
        digits = [ch for p in pieces for ch in p if ch.isdigit()]
        assert digits == [ch for ch in text if ch.isdigit()]
    # user-defined symbols are single tokens
    assert [tok.sp.id_to_piece(i) for i in tok.encode("<answer>")] == ["<answer>"]
    # no dummy-prefix space: separately encoded prompt and response concatenate exactly
    prompt, response = "User: Calculate 5 - 7.\nAssistant:", " <answer>-2</answer>"
    assert tok.decode(tok.encode(prompt) + tok.encode(response)) == prompt + response
    # special ids are dropped on decode
    assert tok.decode([tok.bos_id, *tok.encode("1 + 2"), tok.eos_id]) == "1 + 2"


def test_sentencepiece_training_is_deterministic(tmp_path: Path) -> None:
    import sentencepiece as spm

    texts = arithmetic_texts(300, 1)
    a = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(texts, 64, tmp_path / "a" / "m")))
    b = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(texts, 64, tmp_path / "b" / "m")))
    pieces = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]  # noqa: E731
    assert pieces(a) == pieces(b)


def test_sentencepiece_chat_template(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Calculate 3 + 4."}]
    text = tok.render_chat(messages)
    assert text == "System: Be exact.\nUser: Calculate 3 + 4.\nAssistant:"
    assert tok.apply_chat_template(messages) == tok.encode(text)
    assert tok.render_chat(messages[1:], add_generation_prompt=False) == "User: Calculate 3 + 4.\n"

    fmt = ChatFormat(user="<u>{content}</u>", generation_prompt="<a>")
    custom = SentencePieceTokenizer(sp_model, chat_format=fmt)
    assert custom.render_chat([{"role": "user", "content": "x {content} \\frac{1}{2}"}]) == (
        "<u>x {content} \\frac{1}{2}</u><a>"
    )
    with pytest.raises(TokenizerError, match="message 0 has role 'tool'"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def test_hf_tokenizer_from_local_dir(tmp_path: Path) -> None:
    save_chat_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok.pad_id == 0 and tok.bos_id is None
    assert tok.vocab_size == len(tok.hf) > 256
    text = "Calculate 12 + 7 - 3.\nok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("5"), tok.eos_id]) == "5"

    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Calculate 3 + 4."}]
    assert tok.render_chat(messages) == (
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nCalculate 3 + 4.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Same ids as transformers' own tokenizing chat template path.
    reference = tok.hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.apply_chat_template(messages) == list(reference)


def test_hf_tokenizer_without_template(tmp_path: Path) -> None:
    save_chat_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_tokenizer(tmp_path).render_chat([{"role": "user", "content": "hi"}])
    tok = load_tokenizer(tmp_path, chat_template="{{ messages[0]['content'] }}=")
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "hi="


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TokenizerError, match="not a SentencePiece .model file"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size must be at least 8, got 4"):
        train_sentencepiece(["1 + 1"], 4, tmp_path / "m")
