"""A warm-started tiny policy for the RL improvement test (built here, never downloaded).

A reasoning-gym arithmetic task (one-digit a + b / a - b), a SentencePiece tokenizer trained on its
texts, a tiny random Qwen2 (hidden 64, 2 layers) and a short supervised warm start in plain
PyTorch on correct answers from a disjoint reasoning-gym seed, stopped early so the policy
answers some questions right and leaves room for RL. Saved as an HF directory
(config.json + safetensors) with ``tokenizer.model`` beside it.

The stopping point is an accuracy, not a step count: how fast this tiny model learns differs
between machines and library builds (the same 1000 steps gave a quarter of the answers right on
one machine and three quarters on another), so SFT runs in chunks until its temperature-1 samples
on a calibration split (disjoint from the RL prompts and the validation split) reach TARGET.

    python tests/warm_start.py OUT_DIR [TARGET] [--report]   (--report: sampled accuracy)

The RL improvement test imports it for the task's data specs.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from urllib.parse import quote

import torch
from tiny_models import tiny_model

TASK = "basic_arithmetic"
CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+", "-"),
          "allow_parentheses": False, "allow_negation": False}
TRAIN_SEED, VALID_SEED, SFT_SEED, CALIB_SEED = 100, 200_000, 300_000, 400_000
TARGET, CHUNK, MAX_STEPS = 0.2, 50, 2000


def spec(size: int, seed: int) -> str:
    """`--prompt-data` / `--eval-prompt-data` spec of the task."""
    query = [f"size={size}", f"seed={seed}"] + [f"{k}={quote(repr(v), safe='')}" for k, v in CONFIG.items()]
    return f"rg:{TASK}?" + "&".join(query)


def entries(size: int, seed: int) -> list[dict]:
    import reasoning_gym

    return list(reasoning_gym.create_dataset(TASK, size=size, seed=seed, **CONFIG))


def build(out: Path, target: float = TARGET, seed: int = 0) -> tuple[Path, int, float]:
    """SFT until sampled calibration accuracy reaches ``target``; returns (dir, steps, accuracy)."""
    from sfpo_megatron.data.tokenizer import ChatFormat, SentencePieceTokenizer, train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    chat = ChatFormat()
    prompt = lambda q: chat.render([{"role": "user", "content": q}])  # noqa: E731
    sft = entries(2000, SFT_SEED)
    texts = [prompt(e["question"]) + " " + e["answer"] for e in sft]
    sp_path = train_sentencepiece(texts, 40, out / "tokenizer", model_type="bpe")
    tok = SentencePieceTokenizer(sp_path)
    (out / "tokenizer.model").write_bytes(sp_path.read_bytes())
    model = tiny_model("qwen2", seed, vocab_size=tok.vocab_size, max_position_embeddings=64,
                       tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, rms_norm_eps=1e-6)
    rows = []
    for e in sft:
        p, r = tok.encode(prompt(e["question"])), tok.encode(" " + e["answer"]) + [tok.eos_id]
        rows.append((p + r, len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    calib = entries(100, CALIB_SEED)
    steps, accuracy = 0, 0.0
    while steps < MAX_STEPS:
        _sft_chunk(model, opt, rows, rng, tok.pad_id)
        steps += CHUNK
        accuracy = _accuracy(model, tok, calib)
        if accuracy >= target:
            break
    model.generation_config.eos_token_id = tok.eos_id
    model.save_pretrained(out)
    return out, steps, accuracy


def _sft_chunk(model, opt, rows, rng: random.Random, pad_id: int) -> None:
    model.train()
    for _ in range(CHUNK):
        batch = rng.sample(rows, 32)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((32, width), pad_id)
        labels = torch.full((32, width), -100)
        for i, (seq, plen) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, plen:len(seq)] = torch.tensor(seq[plen:])  # loss on the answer and EOS only
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def _accuracy(model, tok, tasks: list[dict], k: int = 4) -> float:
    """Mean exact-match accuracy of temperature-1 samples (k per prompt), seeded."""
    from sfpo_megatron.data.tokenizer import ChatFormat

    chat = ChatFormat()
    torch.manual_seed(0)
    right = total = 0
    for e in tasks:
        ids = torch.tensor([tok.encode(chat.render([{"role": "user", "content": e["question"]}]))] * k)
        gen = model.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6,
                             pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        for row in gen[:, ids.shape[1]:].tolist():
            right += tok.decode(row).strip() == e["answer"]
            total += 1
    return right / total


def sampled_accuracy(out: Path, n_prompts: int = 100) -> float:
    """The saved policy's sampled accuracy on validation prompts (for reports)."""
    from transformers import AutoModelForCausalLM

    from sfpo_megatron.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(out / "tokenizer.model")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    return _accuracy(model, tok, entries(n_prompts, VALID_SEED))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if a != "--report"]
    torch.set_num_threads(1)
    path, steps, accuracy = build(Path(argv[0]), float(argv[1]) if len(argv) > 1 else TARGET)
    print(f"warm start: {steps} SFT steps, calibration accuracy {accuracy:.3f}")
    if "--report" in sys.argv:
        print(f"validation sampled accuracy: {sampled_accuracy(path):.3f}")
