"""Stand-in for the `sfpo-megatron rl|eval` command in the Slurm script tests
(``SFPO_TRAINER="python tests/scripts/slurm_probe.py"``), for paths the real trainer should not take
on purpose, such as a trainer failing while the servers run.

It checks what a job script hands the trainer: the flags must parse with the real
``build_rl_parser()``, and every ``--rollout-urls`` server must answer ``/health`` and a real
``/generate``. It writes ``<--log-dir>/probe-<rank>.json`` (node, rank, parsed flags, generated
tokens); rank 0 then exits with ``$PROBE_EXIT`` (default 0).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import requests

from sfpo_megatron.arguments import build_rl_parser


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("rl", "eval"):
        print(f"usage: slurm_probe.py rl|eval [flags], got {argv[:1]}", file=sys.stderr)
        return 2
    args = build_rl_parser().parse_args(argv[1:])
    generations = []
    for url in args.rollout_urls:
        health = requests.get(url + "/health", timeout=30).status_code
        body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0}}
        out = requests.post(url + "/generate", json=body, timeout=120)
        out.raise_for_status()
        data = out.json()
        data = data[0] if isinstance(data, list) else data
        generations.append({"url": url, "health": health,
                            "output_ids": data.get("output_ids"), "meta": data.get("meta_info")})
    report = {
        "command": argv[0],
        "node": os.environ.get("SLURMD_NODENAME"),
        "host": socket.gethostname(),
        "rank": int(os.environ.get("SLURM_PROCID", "0")),
        "world": int(os.environ.get("SLURM_NTASKS", "1")),
        "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")],
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        "generations": generations,
    }
    out_dir = Path(args.log_dir or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"probe-{report['rank']}.json").write_text(json.dumps(report, indent=1))
    if report["rank"] != 0:
        return 0
    # Rank 0 alone fails, once every rank has reported (srun's --kill-on-bad-exit would cut the
    # others short otherwise).
    deadline = time.monotonic() + 120
    while len(list(out_dir.glob("probe-*.json"))) < report["world"] and time.monotonic() < deadline:
        time.sleep(0.2)
    return int(os.environ.get("PROBE_EXIT", "0"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
