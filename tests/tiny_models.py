"""Tiny random HF models and tokenizers, built locally from configs (never downloaded).

One factory for every test and script: ``tiny_config`` / ``tiny_model`` / ``save_tiny_model``
take the family and the config fields a test needs, so each keeps exactly its own model; the
presets below are the models several tests share.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FAMILIES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig",
            "qwen3_moe": "Qwen3MoeConfig"}
# Every tiny model: hidden 64, 2 layers, 4 attention heads, 2 KV heads (fields override these).
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
# The trainer tests' vocabulary: synthetic token ids 0..255, BOS 0, EOS 1.
TRAINER_VOCAB = dict(vocab_size=256, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)


def tiny_config(family: str = "qwen2", **fields):
    """An HF config of ``family`` (qwen2, qwen3, llama): SIZES, then ``fields``; a field neither
    names keeps the family's default."""
    import transformers

    return getattr(transformers, FAMILIES[family])(**{**SIZES, **fields})


def tiny_model(family: str = "qwen2", seed: int = 0, perturb: float = 0.0, **fields):
    """A random model of ``tiny_config(family, **fields)``, initialised after
    ``torch.manual_seed(seed)``; ``perturb`` > 0 adds ``perturb * N(0, 1)`` to every parameter so
    norms and biases are not all ones / zeros."""
    import transformers

    config = tiny_config(family, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model


def save_tiny_model(path: Path, family: str = "qwen2", seed: int = 0, perturb: float = 0.0,
                    dtype: torch.dtype = torch.float32, **fields) -> Path:
    """``tiny_model(...)`` in ``dtype``, saved with save_pretrained (config.json + safetensors)."""
    tiny_model(family, seed, perturb, **fields).to(dtype).save_pretrained(path)
    return Path(path)


def write_tiny_config(path: Path, family: str = "qwen2", **fields) -> Path:
    """Only ``path/config.json``: a trainer-test model (TRAINER_VOCAB) that starts from random
    weights."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_config(family, **{**TRAINER_VOCAB, **fields}).save_pretrained(path)
    return path


# ---- presets -------------------------------------------------------------------------------


def save_sfpo_model(path: Path, family: str = "llama", seed: int = 0, **fields) -> Path:
    """The SFPO / VCPO update tests' model: TRAINER_VOCAB, tied embeddings, perturbed. Llama by
    default, which has no qkv bias: no exactly-zero-gradient parameters, whose Adam updates
    amplify rounding noise."""
    return save_tiny_model(path, family, seed, perturb=0.05, **{
        **TRAINER_VOCAB, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, **fields})


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0}
CONVERSION = dict(vocab_size=100, intermediate_size=96, max_position_embeddings=256)
# The conversion tests' models (name → family, fields on top of CONVERSION).
CONVERSION_MODELS = {
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    "llama_gqa": ("llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama_1kv": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=5e5)),
}


# The MoE tests' Qwen3-MoE: 8 experts, top-2, experts of width 32 (on top of CONVERSION).
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
           head_dim=16, tie_word_embeddings=False, router_aux_loss_coef=0.01)


def save_moe_model(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **fields) -> Path:
    """A tiny random Qwen3-MoE (MOE on CONVERSION, perturbed); ``fields`` override, e.g.
    ``mlp_only_layers=[0]`` for a dense first layer."""
    return save_tiny_model(path, "qwen3_moe", seed, perturb=0.05, dtype=dtype,
                           **{**CONVERSION, **MOE, **fields})


def save_conversion_models(root: Path, names=tuple(CONVERSION_MODELS),
                           dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """The named conversion models (seed 0, perturbed), each saved as ``root/<name>``."""
    dirs = {}
    for name in names:
        family, fields = CONVERSION_MODELS[name]
        dirs[name] = save_tiny_model(root / name, family, perturb=0.05, dtype=dtype,
                                     **CONVERSION, **fields)
    return dirs


# ---- tokenizers ----------------------------------------------------------------------------


def save_bpe_tokenizer(path: Path, texts: list[str], vocab_size: int,
                       special_tokens: tuple[str, ...] = (), **fast_kwargs) -> Path:
    """A byte-level BPE trained here on ``texts``, saved as a PreTrainedTokenizerFast
    (``fast_kwargs``: its eos_token, pad_token, chat_template, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs).save_pretrained(str(path))
    return Path(path)


def arithmetic_texts(n: int, seed: int) -> list[str]:
    """``n`` seeded "User: Calculate a + b - c. / Assistant: <answer>…</answer>" texts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b, c = rng.randint(-999, 999), rng.randint(0, 9999), rng.randint(0, 99)
        texts.append(
            f"User: Calculate {a} + {b} - {c}.\nAssistant: <answer>{a + b - c}</answer>"
        )
    return texts


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_chat_tokenizer(path: Path, chat_template: str | None = CHATML) -> Path:
    """A byte-level BPE (320 ids) trained on arithmetic texts, with <pad> (0), <|im_start|> and
    <|im_end|> (the EOS) and a ChatML chat template."""
    return save_bpe_tokenizer(path, arithmetic_texts(200, 2), 320, ("<pad>", "<|im_start|>", "<|im_end|>"),
                              eos_token="<|im_end|>", pad_token="<pad>", chat_template=chat_template)


def save_word_tokenizer(path: Path, words: list[str], pre_tokenizer: str = "Whitespace",
                        **fast_kwargs) -> Path:
    """A word-level tokenizer: ``words[i]`` is id i, anything else "<unk>" (one of the words);
    split by the named ``tokenizers.pre_tokenizers`` class; saved as a PreTrainedTokenizerFast
    (``fast_kwargs``: its unk_token, eos_token, pad_token, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = getattr(pre_tokenizers, pre_tokenizer)()
    PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs).save_pretrained(str(path))
    return Path(path)


# ---- the rollout model: weights and tokenizer in one directory -----------------------------

ROLLOUT_VOCAB = 320  # tokenizer: 300 BPE tokens + "<|endoftext|>" (id 300)
EOS = 300
ROLLOUT_CORPUS = ["the quick brown fox jumps over the lazy dog " * 3,
                  "one two three four five six seven eight nine ten"] * 10


def save_rollout_model(path: Path, seed: int = 0) -> Path:
    """The rollout / RL tests' model: a random Qwen2 (untied, initializer_range 0.2) and a BPE
    tokenizer trained on a toy corpus, saved together. EOS 300 is honoured by both the rollout
    server and HF generate."""
    model = tiny_model("qwen2", seed, vocab_size=ROLLOUT_VOCAB, max_position_embeddings=512,
                       tie_word_embeddings=False, initializer_range=0.2, eos_token_id=EOS)
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    return save_bpe_tokenizer(path, ROLLOUT_CORPUS, 300)


def save_moe_rollout_model(path: Path, seed: int = 0) -> Path:
    """save_rollout_model's vocabulary and tokenizer on a tiny random Qwen3-MoE (MOE). The
    tokenizer is declared a Qwen2Tokenizer, as Qwen3-MoE's are, which adds "<|endoftext|>"."""
    model = tiny_model("qwen3_moe", seed, **{**MOE, "vocab_size": ROLLOUT_VOCAB,
                                            "max_position_embeddings": 512,
                                            "initializer_range": 0.2, "eos_token_id": EOS})
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    save_bpe_tokenizer(path, ROLLOUT_CORPUS, 300)
    config = Path(path) / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "tokenizer_class": "Qwen2Tokenizer"}))
    return Path(path)


# ---- the tool-use model: a bigram chain that calls a tool --------------------------------------

# The multi-turn tests' call format over the rollout tokenizer's one-token words: a call is
# " quick<expression> fox", a tool's output comes back as " jumps<output> over".
TOOL_CALL = (" quick", " fox")
TOOL_TEMPLATE = " jumps{output} over"
# After token a the model's most likely next token is TOOL_CHAIN[a] (EOS for any other token):
# from " lazy" it writes " quick1+2 fox" (a calculator call), after a tool's output it calls
# again, and " dog" is answered with EOS at once.
TOOL_CHAIN = {" lazy": " quick", " quick": "1", "1": "+", "+": "2", "2": " fox", " over": " quick"}


def tool_model_logits(path: Path, gap: float = 6.0, seed: int = 0) -> torch.Tensor:
    """[V, V]: row a is the next-token logits of the tool model in ``path`` after token a,
    whatever came before: ``gap`` on the chain's next token (EOS off the chain), seeded noise in
    [-1, 1] elsewhere."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    ids = {w: tok.encode(w).ids for w in list(TOOL_CHAIN) + list(TOOL_CHAIN.values())}
    assert all(len(i) == 1 for i in ids.values()), ids
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(ROLLOUT_VOCAB, ROLLOUT_VOCAB, generator=g) * 2 - 1
    logits[:, EOS] = gap
    for a, b in TOOL_CHAIN.items():
        logits[ids[a][0], EOS] = 0.0
        logits[ids[a][0], ids[b][0]] = gap
    return logits


def save_tool_model(path: Path, gap: float = 6.0, seed: int = 0) -> Path:
    """A Qwen2 (hidden size = vocabulary, 320) whose attention and MLP outputs are zero (o_proj,
    down_proj = 0), so the residual stream is the token's one-hot embedding and the LM head maps
    it to ``tool_model_logits(gap, seed)``: an exact bigram model. Saved with the rollout model's
    BPE tokenizer (EOS 300)."""
    path = Path(path)
    save_bpe_tokenizer(path, ROLLOUT_CORPUS, 300)
    v = ROLLOUT_VOCAB
    model = tiny_model("qwen2", seed, vocab_size=v, hidden_size=v, intermediate_size=64,
                       max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-12,
                       eos_token_id=EOS)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        # The final norm turns the one-hot e_a into sqrt(v) * e_a.
        model.lm_head.weight.copy_(tool_model_logits(path, gap, seed).T / v ** 0.5)
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path)
    return path


def edited_copy(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the one-file HF checkpoint ``src`` at ``dst`` with ``edit`` applied to its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
