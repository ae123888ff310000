"""A trainer's helper processes under a SIGTERM sent to its whole process group.

Starts two spawn-context multiprocessing managers (the kind of helper megatron's checkpoint save
keeps), one inside ``PreemptionHandler.deferred()`` and one not, and a RewardRunner (one worker). Prints ``ready``, waits for the signal, then prints one JSON line: the worker's pid
before and after, whether each manager still answers, and the runner's error count. Exits 143.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time

from sfpo_megatron.components.preemption import EXIT_CODE, PreemptionHandler
from sfpo_megatron.data.rewards import RewardRunner


def answers(queue) -> bool:
    try:
        queue.put(1)
        return queue.get(timeout=5) == 1
    except Exception:  # noqa: BLE001 - a dead manager fails in many ways
        return False


def main() -> int:
    handler = PreemptionHandler().install()
    # First multiprocessing use of the process: deferred() must also cope with starting the
    # resource tracker (which unblocks SIGTERM in its caller).
    with handler.deferred():
        shielded = multiprocessing.get_context("spawn").Manager()
    runner = RewardRunner("rl_test_rewards:worker_pid", num_workers=1, timeout_s=30)
    before = runner.score(["x"], ["x"])[0]
    bare = multiprocessing.get_context("spawn").Manager()
    shielded_queue, bare_queue = shielded.Queue(), bare.Queue()
    print("ready", flush=True)
    while not handler.should_stop():
        time.sleep(0.01)
    time.sleep(0.5)  # the helpers have had the signal as long as the trainer
    after = runner.score(["x"], ["x"])[0]
    print(json.dumps({"worker_before": before, "worker_after": after, "errors": runner.errors,
                      "shielded_manager": answers(shielded_queue), "bare_manager": answers(bare_queue)}),
          flush=True)
    runner.close()
    shielded.shutdown()
    return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
