"""torchrun runs this in place of an example script to kill one worker with SIGKILL on
the group's first start only, so ``--max-restarts`` has something to restart from:

    TPC_KILL=RANK:step:N   before rank RANK's N-th optimizer step (steps 1..N-1 done)
    TPC_KILL=RANK:save:N   inside rank RANK's N-th checkpoint save, before it writes

then runs the script given as the first argument with the rest of the arguments. Not a
test module (pytest collects test_*.py only)."""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(where: str, n: int) -> None:
    calls = [0]

    def bump() -> None:
        calls[0] += 1
        if calls[0] == n:
            print(f"elastic_fault: killing rank {os.environ['RANK']} at {where} {n}", flush=True)
            _die()

    if where == "step":
        from torch.optim.optimizer import register_optimizer_step_pre_hook
        register_optimizer_step_pre_hook(lambda *_: bump())
    elif where == "save":
        from torch.distributed.checkpoint import FileSystemWriter
        write = FileSystemWriter.write_data

        def write_data(self, plan, planner):
            bump()
            return write(self, plan, planner)

        FileSystemWriter.write_data = write_data
    else:
        raise SystemExit(f"TPC_KILL: unknown place {where!r} (step or save)")


def main() -> None:
    spec = os.environ.get("TPC_KILL")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        rank, where, n = spec.split(":")
        if int(os.environ["RANK"]) == int(rank):
            _arm(where, int(n))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
