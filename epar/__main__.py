"""`python -m epar <command>`, run under torchrun (e.g. `.venv/bin/torchrun --nproc-per-node 2 -m epar profile`):

profile  where the time of an MoE layer goes, per phase and rank (epar.profiling)
sweep    all_to_all_single bandwidth over message sizes, and a fitted latency + bandwidth

`python -m epar --help` and `python -m epar <command> --help` list the options. The demo
is a script, not a command: `bash scripts/demo.sh`.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from .profiling.cli import main as cli

    return cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
