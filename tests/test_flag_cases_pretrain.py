"""`sfpo-megatron pretrain` flags, each parsed by the real parser and run through the real
`pretrain` (tests/scripts/pretrain_flags_worker.py: ~20 short runs of a tiny Llama on mock data in
one process), asserted on what the run did:

* the optimizer flags (``--adam-beta1/2``, ``--adam-eps``, ``--clip-grad``) and the resume flags
  (``--finetune``, ``--no-load-optim``) against a plain-PyTorch reference: the HF model the runs
  start from (converted by tools/convert_hf_to_mcore.py), ``torch.optim.AdamW`` and
  ``clip_grad_norm_`` on the same mock batches, token-mean cross-entropy. The logged losses
  (iteration k scores batch k with the weights after k − 1 steps) match to 1e-5; a reference with
  any one of the flag values back at its default does not, so a swapped field fails;
* ``--recompute-activations`` / ``--overlap-*`` / ``--num-workers``: the same losses bit for bit,
  and the observable switch (layer forwards run again in backward, the DDP config, data-loader
  worker processes alive during the run);
* architecture flags from the checkpoint's global tensor shapes and the model the run built;
* ``--seed``, ``--no-load-rng``, ``--distributed-timeout-minutes``: the initial weights, the
  process's RNG state after the run, the process group's timeout as torch reports it;
* ``--dist-ckpt-optim-sharding``: the optimizer-state layout megatron writes, and a resume from
  either layout is the same run bit for bit (another DP size: tests/test_flag_cases_layouts.py);
* the data flags: the index cache megatron writes to ``--data-cache-path`` names the tokenizer
  that ``--tokenizer-type`` / ``--tokenizer-path`` loaded (its path and EOD id).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from ckpt_reader import read_model_tensors
from launch import PYTHON, SCRIPTS, run
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tiny_models import TRAINER_VOCAB, save_sfpo_model, save_word_tokenizer, write_tiny_config
from torch.distributed.checkpoint import FileSystemReader

from sfpo_megatron.arguments import build_pretrain_parser
from sfpo_megatron.cli import main
from sfpo_megatron.components.pretrain_data import DatasetTokenizer, build_pretrain_datasets

REL = 1e-5
GBS, MBS, SEQ, LR = 4, 2, 32, 3e-3
EOD = TRAINER_VOCAB["eos_token_id"]
DEFAULT_OPT = {"betas": (0.9, 0.999), "eps": 1e-8, "clip": 1.0}
OPT_FLAGS = {"beta1": ("--adam-beta1", 0.5), "beta2": ("--adam-beta2", 0.9),
             "eps": ("--adam-eps", 1e-4), "clip": ("--clip-grad", 0.3)}
OPT = {"betas": (OPT_FLAGS["beta1"][1], OPT_FLAGS["beta2"][1]), "eps": OPT_FLAGS["eps"][1],
       "clip": OPT_FLAGS["clip"][1]}
SEED, OTHER_SEED = 5, 9
TIMEOUT_MIN = 7


def _data_flags(seed: int = SEED, mock: bool = True) -> list[str]:
    return ["--mock-data"] * mock + ["--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size",
            str(GBS), "--split", "100,0,0", "--seed", str(seed), "--lr", str(LR), "--weight-decay", "0"]


def _write_corpus(prefix: Path) -> str:
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(40):
        doc = np.append(rng.integers(2, 200, size=int(rng.integers(5, 40))), EOD)
        builder.add_document(doc.astype(np.uint16), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _sentencepiece_model(path: Path) -> Path:
    import sentencepiece as spm

    texts = [f"{a} plus {b} is {a + b}" for a in range(30) for b in range(5)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(path), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    return path.with_suffix(".model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flag_pretrain")
    hf = save_sfpo_model(root / "hf")
    cfg3 = write_tiny_config(root / "cfg3", "llama", num_hidden_layers=3, tie_word_embeddings=True)
    hf_tok = save_word_tokenizer(root / "hf_tok", ["<unk>", "x", "y", "<eos>"], unk_token="<unk>",
                                 eos_token="<eos>")
    sp_model = _sentencepiece_model(root / "sp")
    corpus = _write_corpus(root / "corpus")
    init, base = root / "init", root / "base"

    def pre(name: str, *flags, seed: int = SEED, model=hf, iters: int | None = None, load=init,
            finetune: bool = True, distopt: bool = True, mock: bool = True) -> list:
        argv = ["--model-config", str(model), "--log-dir", str(root / name / "logs")] + _data_flags(seed, mock)
        # The distributed optimizer (DP = 1: one shard) for --dist-ckpt-optim-sharding and
        # --overlap-param-gather; megatron cannot save its state before a first step (iters 0).
        argv += ["--use-distributed-optimizer"] if distopt else []
        if iters is not None:
            argv += ["--train-iters", str(iters)]
        if load is not None:
            argv += ["--load", str(load)] + (["--finetune"] if finetune else [])
        return [name, argv + [str(f) for f in flags]]

    data = ["--data-path", corpus, "--split", "100,0,0"]
    runs = [
        ["convert", ["--hf-dir", str(hf), "--save", str(init)]],
        pre("base", "--save", base, "--distributed-timeout-minutes", TIMEOUT_MIN, iters=3),
        pre("opt", *[x for f, v in OPT_FLAGS.values() for x in (f, v)], iters=3),
        pre("recompute", "--recompute-activations", "--log-interval", "2", iters=3),
        pre("overlap", "--overlap-grad-reduce", "--overlap-param-gather", "--num-workers", "2", iters=3),
        pre("resume", iters=5, load=base, finetune=False),
        pre("no_optim", "--no-load-optim", iters=5, load=base, finetune=False),
        pre("finetune", iters=2, load=base),
        pre("resume_seed", iters=4, load=base, finetune=False, seed=OTHER_SEED),
        pre("no_rng_seed", "--no-load-rng", iters=4, load=base, finetune=False, seed=OTHER_SEED),
        pre("other_seed", iters=1, seed=OTHER_SEED),
        pre("dp_sharded", "--dist-ckpt-optim-sharding", "dp_reshardable", "--save", root / "dp_ckpt", iters=3),
        pre("dp_resume", "--dist-ckpt-optim-sharding", "dp_reshardable", iters=5, load=root / "dp_ckpt",
            finetune=False),
        pre("bf16", "--bf16", "--save", root / "bf16_ckpt", iters=1),
        pre("arch", "--make-vocab-size-divisible-by", "96", "--save", root / "arch_ckpt", model=cfg3, iters=1,
            load=None),
        pre("init_seed", "--save", root / "init_seed", iters=0, load=None, distopt=False),
        pre("init_seed_again", "--save", root / "init_seed_again", iters=0, load=None, distopt=False),
        pre("init_other_seed", "--save", root / "init_other_seed", iters=0, load=None, seed=OTHER_SEED, distopt=False),
        pre("data_null", *data, "--data-cache-path", root / "cache_null", iters=1, mock=False),
        pre("data_hf", *data, "--data-cache-path", root / "cache_hf", "--tokenizer-type", "hf",
            "--tokenizer-path", hf_tok, iters=1, mock=False),
        pre("data_sp", *data, "--data-cache-path", root / "cache_sp", "--tokenizer-type", "sentencepiece",
            "--tokenizer-path", sp_model, iters=1, mock=False),
    ]
    out = root / "out"
    out.mkdir()
    (root / "runs.json").write_text(json.dumps(runs))
    run([PYTHON, str(SCRIPTS / "pretrain_flags_worker.py"), "--runs", str(root / "runs.json"), "--out", str(out)],
        timeout=600)
    results = {name: torch.load(out / f"{name}.pt", weights_only=False) for name, _ in runs if name != "convert"}
    return {"root": root, "hf": hf, "hf_tok": hf_tok, "sp": sp_model, **results}


# ---- the plain-PyTorch reference -----------------------------------------------------------------


def _batches(hf: Path, n: int, seed: int = SEED) -> list[dict]:
    """The first n global batches of the mock training data as the runs draw them (DP = 1:
    iteration k takes samples (k-1)·GBS ... k·GBS − 1)."""
    args = build_pretrain_parser().parse_args(["--model-config", str(hf), "--train-iters", str(n)]
                                              + _data_flags(seed))
    train, _ = build_pretrain_datasets(args, DatasetTokenizer(vocab_size=TRAINER_VOCAB["vocab_size"], eod=EOD))
    out = []
    for k in range(n):
        samples = [train[i] for i in range(k * GBS, (k + 1) * GBS)]
        out.append({key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                    for key in ("tokens", "labels", "loss_mask", "position_ids")})
    return out


def _loss(model, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["tokens"].long(), position_ids=batch["position_ids"].long()).logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].long().reshape(-1), reduction="none")
    mask = batch["loss_mask"].float().reshape(-1)
    return (ce * mask).sum() / mask.sum()


def reference(hf: Path, iters: int, opt: dict | None = None, reset_at: int | None = None,
              restart_data_at: int | None = None) -> list[tuple[float, float]]:
    """(loss, grad norm before clipping) per iteration of AdamW (weight decay 0, constant lr) with
    ``opt`` overriding DEFAULT_OPT. ``reset_at`` k: a fresh AdamW from iteration k + 1 on (the
    checkpoint's weights without its optimizer state); ``restart_data_at`` k: from iteration k + 1
    the batches start again at the first (a run that counts from 0)."""
    o = {**DEFAULT_OPT, **(opt or {})}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    batches = _batches(hf, iters)

    def adam():
        return torch.optim.AdamW(model.parameters(), lr=LR, betas=o["betas"], eps=o["eps"], weight_decay=0.0)

    optim, out = adam(), []
    for k in range(1, iters + 1):
        if reset_at is not None and k == reset_at + 1:
            optim = adam()
        b = k - 1 if restart_data_at is None or k <= restart_data_at else k - 1 - restart_data_at
        optim.zero_grad()
        loss = _loss(model, batches[b])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"])
        optim.step()
        out.append((loss.item(), norm.item()))
    return out


def _logged(res: dict) -> dict[int, tuple[float, float]]:
    return {m["iteration"]: (m["lm_loss"], m["grad_norm"]) for m in res["lines"]}


def _gap(got: dict[int, tuple], ref: list[tuple], iterations) -> float:
    """Largest relative difference of loss and grad norm over the iterations."""
    return max(abs(g - r) / abs(r) for i in iterations for g, r in zip(got[i], ref[i - 1]))


# ---- optimizer flags -----------------------------------------------------------------------------


@pytest.mark.flags("--adam-beta1", "--adam-beta2", "--adam-eps", "--clip-grad", cmd="pretrain")
def test_optimizer_flags_give_the_reference_adamw(runs):
    assert _gap(_logged(runs["base"]), reference(runs["hf"], 3), (1, 2, 3)) < REL  # the defaults agree
    got = _logged(runs["opt"])
    assert sorted(got) == [1, 2, 3]
    assert _gap(got, reference(runs["hf"], 3, OPT), (1, 2, 3)) < REL
    # Every flag counts: the reference with any one of them at its default is far off.
    for key, default in (("beta1", ("betas", (DEFAULT_OPT["betas"][0], OPT["betas"][1]))),
                         ("beta2", ("betas", (OPT["betas"][0], DEFAULT_OPT["betas"][1]))),
                         ("eps", ("eps", DEFAULT_OPT["eps"])), ("clip", ("clip", DEFAULT_OPT["clip"]))):
        assert _gap(got, reference(runs["hf"], 3, {**OPT, default[0]: default[1]}), (2, 3)) > 100 * REL, key


# ---- resume flags --------------------------------------------------------------------------------


@pytest.mark.flags("--no-load-optim", "--finetune", cmd="pretrain")
def test_resume_flags_give_the_reference_of_their_restart(runs):
    hf = runs["hf"]
    full = reference(hf, 5)
    # A plain resume continues the run: iterations 4 and 5 with the checkpoint's Adam state.
    resumed = _logged(runs["resume"])
    assert sorted(resumed) == [4, 5] and _gap(resumed, full, (4, 5)) < REL
    # --no-load-optim: the checkpoint's weights and iteration count, a fresh AdamW.
    fresh = _logged(runs["no_optim"])
    assert sorted(fresh) == [4, 5]
    assert _gap(fresh, reference(hf, 5, reset_at=3), (4, 5)) < REL
    assert _gap(fresh, full, (5,)) > 100 * REL
    # --finetune: the weights only; iteration 1 again, data from its start, a fresh AdamW.
    ft = _logged(runs["finetune"])
    assert sorted(ft) == [1, 2]
    ref = reference(hf, 5, reset_at=3, restart_data_at=3)
    assert _gap({1: ft[1], 2: ft[2]}, ref[3:], (1, 2)) < REL


@pytest.mark.flags("--no-load-rng", "--seed", cmd="pretrain")
def test_no_load_rng_keeps_the_processes_own_rng(runs):
    """Resumed with another --seed: the checkpoint's RNG state wins unless --no-load-rng, which
    leaves the state the new seed gave (the same as a fresh run with that seed). The torch
    generator also moves during training (each data-loader iterator draws its seed from it), so
    it is compared between runs of the same length only."""
    def same(a: dict, b: dict, keys=("torch", "numpy", "random", "tracker")) -> dict[str, bool]:
        eq = {"torch": torch.equal(a["torch"], b["torch"]), "numpy": np.array_equal(a["numpy"], b["numpy"]),
              "random": a["random"] == b["random"],
              "tracker": all(torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"])}
        return {k: eq[k] for k in keys}

    base, other = runs["base"]["rng"], runs["other_seed"]["rng"]
    assert not any(same(base, other).values())
    assert all(same(runs["no_rng_seed"]["rng"], other).values())
    assert all(same(runs["resume_seed"]["rng"], base, ("numpy", "random", "tracker")).values())
    assert not same(runs["resume_seed"]["rng"], other)["torch"]


def _optimizer_entries(ckpt: Path) -> dict[str, tuple]:
    """The checkpoint's optimizer entries: name → global shape (() for a pickled object)."""
    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {k: tuple(getattr(m, "size", ())) for k, m in meta.items() if k.startswith("optimizer")}


@pytest.mark.flags("--dist-ckpt-optim-sharding", cmd="pretrain")
def test_optim_sharding_picks_megatrons_layout(runs):
    root = runs["root"]
    full = _optimizer_entries(root / "base" / "iter_0000003")
    dp = _optimizer_entries(root / "dp_ckpt" / "iter_0000003")
    meta = {p: json.loads((root / p / "iter_0000003" / "sfpo_meta.json").read_text()) for p in ("base", "dp_ckpt")}
    assert meta["base"]["optim_sharding"] == "fully_reshardable"
    assert meta["dp_ckpt"]["optim_sharding"] == "dp_reshardable"
    # fully_reshardable: param / exp_avg / exp_avg_sq per parameter, in its global shape;
    # dp_reshardable: the DP group's flat bucket buffers.
    fc1 = read_model_tensors(root / "base")["decoder.layers.mlp.linear_fc1.weight"].shape
    assert {full[f"optimizer.state.{s}.decoder.layers.mlp.linear_fc1.weight"] for s in
            ("param", "exp_avg", "exp_avg_sq")} == {tuple(fc1)}
    flat = {k.rsplit(".", 1)[1]: v for k, v in dp.items() if ".bucket_idx_0." in k}
    assert sorted(flat) == ["exp_avg", "exp_avg_sq", "param"] and all(len(v) == 1 for v in flat.values())
    assert not any(k.startswith("optimizer.state.") for k in dp)
    # Resumed from either, the run is the same bit for bit.
    assert _logged(runs["dp_resume"]) == _logged(runs["resume"])


# ---- switches with the same numbers --------------------------------------------------------------


@pytest.mark.flags("--recompute-activations", "--log-interval", cmd="pretrain")
def test_recompute_is_bit_equal_and_log_interval_thins_the_lines(runs):
    base, rec = runs["base"], runs["recompute"]
    # --log-interval 2 over 3 iterations: iteration 1 (always) and 2.
    assert [m["iteration"] for m in rec["lines"]] == [1, 2]
    assert [m["iteration"] for m in base["lines"]] == [1, 2, 3]
    assert _logged(rec) == {i: _logged(base)[i] for i in (1, 2)}
    # Every layer forward of training ran again in the backward.
    assert base["layer_forwards"] == 3 * (GBS // MBS) * 2
    assert rec["layer_forwards"] == 2 * base["layer_forwards"]


@pytest.mark.flags("--overlap-grad-reduce", "--overlap-param-gather", "--num-workers", cmd="pretrain")
def test_overlap_and_workers_change_nothing_but_the_machinery(runs):
    base, ov = runs["base"], runs["overlap"]
    assert base["model"]["overlap_grad_reduce"] is False and base["model"]["overlap_param_gather"] is False
    assert ov["model"]["overlap_grad_reduce"] is True and ov["model"]["overlap_param_gather"] is True
    assert _logged(ov) == _logged(base)
    # Data-loader worker processes: --num-workers of them alive while training, none by default.
    assert ov["max_children"] == 2 and base["max_children"] == 0


@pytest.mark.flags("--distributed-timeout-minutes", cmd="pretrain")
def test_timeout_reaches_the_process_group(runs):
    assert runs["base"]["timeout_s"] == TIMEOUT_MIN * 60
    assert runs["opt"]["timeout_s"] == 30 * 60  # the default


# ---- model flags -------------------------------------------------------------------------------


@pytest.mark.flags("--model-config", "--make-vocab-size-divisible-by", cmd="pretrain")
def test_architecture_flags_shape_the_checkpoint(runs):
    root = runs["root"]
    base = read_model_tensors(root / "base")
    arch = read_model_tensors(root / "arch_ckpt")
    # megatron stacks the layers: the first dimension counts them.
    assert base["decoder.layers.mlp.linear_fc1.weight"].shape[0] == 2
    assert arch["decoder.layers.mlp.linear_fc1.weight"].shape[0] == 3
    # 256 ids padded to a multiple of 128 (the default) or of 96.
    assert base["embedding.word_embeddings.weight"].shape == (256, 64)
    assert arch["embedding.word_embeddings.weight"].shape == (288, 64)
    assert runs["arch"]["model"]["num_layers"] == 3 and runs["arch"]["model"]["embedding_rows"] == 288


@pytest.mark.flags("--bf16", cmd="pretrain")
def test_bf16_model_params_fp32_main_params(runs):
    assert runs["bf16"]["model"]["param_dtypes"] == ["torch.bfloat16"]
    assert runs["base"]["model"]["param_dtypes"] == ["torch.float32"]
    root = runs["root"]
    model = read_model_tensors(root / "bf16_ckpt")
    optim = read_model_tensors(root / "bf16_ckpt", prefix_exclude=("model", "rng_state"))
    assert {t.dtype for t in model.values()} == {torch.bfloat16}
    assert {t.dtype for k, t in optim.items() if "param" in k} == {torch.float32}
    # The main params are 4 bytes per parameter (the optimizer's metrics).
    n = sum(t.numel() for t in model.values())
    assert runs["bf16"]["lines"][0]["optimizer/main_param_bytes"] == 4 * n


@pytest.mark.flags("--seed", cmd="pretrain")
def test_seed_sets_the_initial_weights_and_the_mock_data(runs):
    root = runs["root"]
    a, b, c = (read_model_tensors(root / n) for n in ("init_seed", "init_seed_again", "init_other_seed"))
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])
    # The same starting weights, another seed: other mock samples, another first loss.
    other = reference(runs["hf"], 1)  # seed 5's batch
    assert abs(_logged(runs["other_seed"])[1][0] - other[0][0]) > 100 * REL * other[0][0]


# ---- data flags --------------------------------------------------------------------------------


def _cache_tokenizer(cache: Path) -> dict:
    """The tokenizer that megatron's index cache in ``cache`` describes."""
    files = sorted(cache.glob("*-GPTDataset-train-description.txt"))
    assert len(files) == 1, f"no index cache in {cache}"
    return json.loads(files[0].read_text())["tokenizer"]


@pytest.mark.flags("--data-cache-path", "--tokenizer-type", "--tokenizer-path", cmd="pretrain")
def test_index_cache_names_the_loaded_tokenizer(runs):
    root = runs["root"]
    got = {c: _cache_tokenizer(root / f"cache_{c}") for c in ("null", "hf", "sp")}
    assert (got["null"]["name"], got["null"]["eod"], got["null"]["vocab_size"]) == ("null", EOD, 256)
    assert (got["hf"]["name"], got["hf"]["eod"], got["hf"]["vocab_size"]) == (str(runs["hf_tok"]), 3, 4)
    assert (got["sp"]["name"], got["sp"]["eod"], got["sp"]["vocab_size"]) == (str(runs["sp"]), 2, 40)
    for name in ("data_null", "data_hf", "data_sp"):
        assert [m["iteration"] for m in runs[name]["lines"]] == [1]


TOKENIZER_ERRORS = {
    "type without path": (["--tokenizer-type", "hf"], "--tokenizer-type hf needs --tokenizer-path"),
    "path without type": (["--tokenizer-path", "{hf_tok}"],
                          "--tokenizer-path {hf_tok} needs --tokenizer-type hf or sentencepiece "
                          "(--tokenizer-type null uses the model's vocabulary and EOS)"),
    "wrong kind": (["--tokenizer-type", "sentencepiece", "--tokenizer-path", "{hf_tok}"],
                   "--tokenizer-type sentencepiece, but --tokenizer-path {hf_tok} is an HF tokenizer"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_ERRORS))
def test_tokenizer_flag_errors(runs, case, capsys):
    flags, message = TOKENIZER_ERRORS[case]
    flags = [f.format(hf_tok=runs["hf_tok"]) for f in flags]
    assert main(["pretrain", "--model-config", str(runs["hf"]), "--mock-data"] + flags) == 2
    assert capsys.readouterr().err.strip() == \
        f"sfpo-megatron pretrain: error: {message.format(hf_tok=runs['hf_tok'])}"
