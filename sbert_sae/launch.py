"""`accelerate launch --cpu --num_processes N -m sbert_sae ...` as the user means it.

accelerate's `--cpu` launcher starts several processes only through mpirun (with
`--mpirun_hostfile`); without one it starts a single process, sets MASTER_ADDR and
MASTER_PORT, and does not pass N on (accelerate 1.x, `simple_launcher`). sbert-sae then
reads N from the launcher's own arguments (its parent process' command line, parsed with
accelerate's parser, or accelerate's config file) and starts the N processes itself with
torchrun on that address and port: CPU processes over gloo, as `--multi_gpu` would on a
machine without GPUs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCH_MARKERS = ("launch", "accelerate.commands.launch")


def started_alone_by_cpu_launcher(env=None) -> bool:
    """True in a process that `accelerate launch --cpu` started on its own (no mpirun)."""
    env = os.environ if env is None else env
    return (
        env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
        and bool(env.get("MASTER_PORT"))
        and not any(env.get(k) for k in _WORLD_SIZE_VARIABLES)
    )


def launcher_arguments(pid: int) -> list[str] | None:
    """The arguments given to `accelerate launch` in process `pid`'s command line, or None
    when that process is not accelerate's launcher (or its command line cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    for i, part in enumerate(argv):
        if part in _LAUNCH_MARKERS and (part != "launch" or (i > 0 and Path(argv[i - 1]).name.startswith("accelerate"))):
            return argv[i + 1 :]
    return None


def requested_processes(launch_args: list[str]) -> tuple[int, int]:
    """(num_processes, num_machines) that `accelerate launch launch_args` asked for, from
    its arguments or else its config file (1 where neither says)."""
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(launch_args)
    except SystemExit:
        return 1, 1
    processes, machines = args.num_processes, args.num_machines
    if processes is None or machines is None:
        try:
            from accelerate.commands.config.config_args import default_config_file, load_config_from_file

            config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
            if config_file:
                config = load_config_from_file(config_file)
                processes = processes if processes is not None else getattr(config, "num_processes", None)
                machines = machines if machines is not None else getattr(config, "num_machines", None)
        except Exception as err:  # noqa: BLE001 - an unreadable config means: as given
            logger.debug("cannot read accelerate's config file: %s", err)
    return int(processes or 1), int(machines or 1)


def relaunch_for_cpu_launcher(argv: list[str]) -> int | None:
    """When `accelerate launch --cpu --num_processes N` (N > 1, one machine) started this
    process alone, run `sbert-sae argv` as N torchrun processes and return their exit code;
    else None (go on in this process)."""
    if not started_alone_by_cpu_launcher():
        return None
    launch_args = launcher_arguments(os.getppid())
    if launch_args is None:
        _warn_one_process()
        return None
    processes, machines = requested_processes(launch_args)
    if processes <= 1:
        return None
    if machines > 1:
        _warn_one_process()  # several machines on CPUs need mpirun's hostfile
        return None
    env = dict(os.environ)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(processes),
        "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env["MASTER_PORT"],
        "-m", "sbert_sae", *argv,
    ]  # fmt: skip
    logger.info("accelerate launch --cpu started one process: starting the %d requested ones (torchrun, gloo)", processes)
    return subprocess.call(command, env=env)


def _warn_one_process() -> None:
    logger.warning(
        "accelerate launch --cpu started this one process only: its --cpu launcher starts several through mpirun "
        "(add --mpirun_hostfile FILE); without MPI use accelerate launch --multi_gpu --num_processes N (torchrun, gloo on CPUs)"
    )
