"""Prompt data, tokenizers and rewards for RL (see docs/ARCHITECTURE.md)."""

from sfpo_megatron.data.prompts import (
    DatasetError,
    MalformedRowError,
    PromptDataset,
    PromptItem,
    PromptSampler,
    load_eval_datasets,
    load_prompt_dataset,
    parse_eval_specs,
    parse_rg_spec,
    reasoning_gym_dataset,
)
from sfpo_megatron.data.rewards import (
    RewardFunctionError,
    RewardRunner,
    auto_reward,
    extract_final_answer,
    math_verify_reward,
    reasoning_gym_reward,
    resolve_reward_fn,
)
from sfpo_megatron.data.tokenizer import (
    ChatFormat,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ChatFormat",
    "DatasetError",
    "HFTokenizer",
    "MalformedRowError",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "RewardFunctionError",
    "RewardRunner",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "auto_reward",
    "extract_final_answer",
    "load_eval_datasets",
    "load_prompt_dataset",
    "load_tokenizer",
    "math_verify_reward",
    "parse_eval_specs",
    "parse_rg_spec",
    "reasoning_gym_dataset",
    "reasoning_gym_reward",
    "resolve_reward_fn",
    "train_sentencepiece",
]
