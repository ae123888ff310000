"""The tiny end-to-end SFPO-vs-GRPO demo (`make demo`, `python -m sfpo_megatron.demo`).

* `task`: the reasoning-gym task, tokenizer, SFT corpus and exact-match reward;
* `pipeline`: the phases (SFT warm start, HF export, GRPO and SFPO runs) as real subprocesses;
* `report`: validation curves → comparison table and plot (shared with benchmarks/sfpo_vs_grpo.py).
"""
