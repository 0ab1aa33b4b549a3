"""``composer -n N CONFIG ...``: hand off to ``torch.distributed.run`` (the elastic agent).

Launcher flags before the config are torchrun's (``--nnodes``, ``--node-rank``, ``--master-addr``,
``--master-port``, ``--rdzv-*``, ``--max-restarts``, ...); ``-n N`` is ``--nproc-per-node N``. Every
worker runs ``python -m <worker module> CONFIG [overrides]`` (the CLI names itself). If a worker dies, the agent stops the
others and the launch fails with that worker's traceback.
"""

from __future__ import annotations

import sys

#: torchrun options that take a value (``-n`` is Cadenza's short form of ``--nproc-per-node``)
VALUE_FLAGS = {
    "-n": "--nproc-per-node",
    "--nproc-per-node": "--nproc-per-node",
    "--nproc_per_node": "--nproc-per-node",
    "--nnodes": "--nnodes",
    "--node-rank": "--node-rank",
    "--node_rank": "--node-rank",
    "--master-addr": "--master-addr",
    "--master_addr": "--master-addr",
    "--master-port": "--master-port",
    "--master_port": "--master-port",
    "--rdzv-backend": "--rdzv-backend",
    "--rdzv_backend": "--rdzv-backend",
    "--rdzv-endpoint": "--rdzv-endpoint",
    "--rdzv_endpoint": "--rdzv-endpoint",
    "--rdzv-id": "--rdzv-id",
    "--rdzv_id": "--rdzv-id",
    "--rdzv-conf": "--rdzv-conf",
    "--max-restarts": "--max-restarts",
    "--max_restarts": "--max-restarts",
    "--monitor-interval": "--monitor-interval",
    "--log-dir": "--log-dir",
}
SWITCH_FLAGS = {"--standalone": "--standalone"}


def split_launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Leading torchrun flags (translated) and the rest (``CONFIG [overrides]``)."""
    launcher: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        flag, _, inline = rest.pop(0).partition("=")
        if flag in SWITCH_FLAGS:
            launcher.append(SWITCH_FLAGS[flag])
        elif flag in VALUE_FLAGS:
            value = inline or (rest.pop(0) if rest else "")
            if not value:
                raise SystemExit(f"composer: {flag} needs a value")
            launcher += [VALUE_FLAGS[flag], value]
        else:
            raise SystemExit(f"composer: unknown launcher option {flag}; see `composer --help`")
    return launcher, rest


def launch(launcher: list[str], rest: list[str], worker: str) -> int:
    """Run ``torch.distributed.run`` with ``launcher`` flags over ``python -m worker rest``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "--nnodes" not in launcher and "--rdzv-endpoint" not in launcher and "--master-port" not in launcher:
        launcher = ["--standalone", *[a for a in launcher if a != "--standalone"]]  # one node: a free port
    args = get_args_parser().parse_args([*launcher, "-m", worker])
    # The worker's arguments are set apart from torchrun's parser: it would read e.g. OpenCLIP's --logs as an
    # abbreviation of its own --logs-specs and stop.
    args.training_script_args = list(rest)
    try:
        run(args)
    except ChildFailedError as error:
        sys.stderr.write(f"composer: training failed\n{error}\n")
        return 1
    return 0
