"""HF transformers references for the rollout tests: what the tiny rollout model
(tiny_models.save_rollout_model) generates and scores, computed in the test process."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import EOS


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers.generate, greedy, one prompt (no padding); stops after EOS like the server."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=EOS)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_greedy_same_length(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Batched transformers.generate for equal-length prompts; rows cut after their first EOS."""
    assert len({len(p) for p in prompts}) == 1
    out = model.generate(torch.tensor(prompts), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=EOS)
    rows = []
    for row in out[:, len(prompts[0]):].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


@torch.no_grad()
def hf_log_softmax(model: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at every position of ``ids``: row k predicts token k + 1."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def make_prompts(count: int, length: int | None = None, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = length or int(torch.randint(3, 12, (1,), generator=g))
        out.append(torch.randint(1, 299, (n,), generator=g).tolist())
    return out


def perturbed_state(path: Path, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The tiny model's weights plus seeded noise: a stand-in for one trainer update."""
    model = load_hf(path)
    g = torch.Generator().manual_seed(seed)
    return {n: (t + scale * torch.randn(t.shape, generator=g)).contiguous() for n, t in model.state_dict().items()}


def model_with_state(path: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load_hf(path)
    model.load_state_dict(state)
    return model
