"""Check a launch before a long run: every process joins, and the processes can talk to each other.

    accelerate launch --config_file accelerate_configs/multi_node.yaml --machine_rank 0 --main_process_ip HOST \\
        -m vlm_recipes.launch_check

Takes seconds and loads no model or data. Each process prints one line (rank, machine, host, device); then one
all-reduce sums the ranks, and the main process prints the launch and whether the sum is right. A machine that cannot
reach the main process's address fails here, not after the model has loaded everywhere else.
"""

import os
import socket
import sys

from accelerate import PartialState

from vlm_recipes.cli import command_parser
from vlm_recipes.training.distributed import machine_count


def build_parser():
    return command_parser("vlm-recipes launch-check", __doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2])


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)  # no options: `--help` prints help instead of running the check
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPUs, as training uses them there
    rank, processes = state.process_index, state.num_processes
    machines = machine_count(processes)
    print(
        f"process {rank} of {processes}: machine {os.environ.get('GROUP_RANK', 0)}, host {socket.gethostname()}, "
        f"device {state.device}",
        flush=True,
    )
    total = torch.tensor([float(rank)], device=state.device)
    if processes > 1:
        torch.distributed.all_reduce(total)
    expected = processes * (processes - 1) / 2
    state.wait_for_everyone()
    if state.is_main_process:
        verdict = "ok" if total.item() == expected else f"WRONG: {total.item()} instead of {expected}"
        print(
            f"Launch: {processes} process(es) on {machines} machine(s), backend {state.backend or 'none'}; "
            f"all-reduce of the ranks: {verdict}",
            flush=True,
        )
    state.destroy_process_group()
    if total.item() != expected:
        sys.exit(1)


if __name__ == "__main__":
    main()
