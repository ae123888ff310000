"""A trainer that announces a bucket to a CPU rollout server and never broadcasts it, then forms
the group again under the same name and broadcasts for real. Prints one JSON line.

    python broken_broadcast.py SERVER_URL PARAM_NAME
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import time

import requests
import torch
import torch.distributed as dist

from sfpo_megatron.distributed.weight_update_group import (
    destroy_weight_update_group,
    init_weight_update_group,
)


def form(url: str, name: str) -> dist.ProcessGroup:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": name, "backend": "gloo"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        joined = pool.submit(requests.post, url + "/init_weights_update_group", json=body, timeout=60)
        pg = init_weight_update_group("127.0.0.1", port, 0, 2, name, "gloo", 30)
        answer = joined.result().json()
    assert answer["success"], answer
    return pg


def main() -> None:
    url, param = sys.argv[1], sys.argv[2]
    value = torch.full([64], 0.25)  # PARAM_NAME is a 64-element vector (a norm weight)
    pg = form(url, "g")
    start = time.monotonic()
    broken = requests.post(url + "/update_weights_from_distributed", timeout=120, json={
        "names": [param], "dtypes": ["float32"], "shapes": [[64]], "group_name": "g"})
    waited = time.monotonic() - start
    destroy_weight_update_group(pg)
    pg = form(url, "g")  # the same name: the server has left the broken group
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        posted = pool.submit(requests.post, url + "/update_weights_from_distributed", timeout=60, json={
            "names": [param], "dtypes": ["float32"], "shapes": [[64]], "group_name": "g", "weight_version": "v2"})
        dist.broadcast(value, src=0, group=pg)
        fixed = posted.result().json()
    destroy_weight_update_group(pg)
    after = requests.post(url + "/get_weights_by_name", json={"name": param}, timeout=30).json()
    print(json.dumps({"broken_status": broken.status_code, "broken": broken.json(), "waited": waited,
                      "fixed": fixed, "after": after}))


if __name__ == "__main__":
    main()
