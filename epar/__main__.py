"""`python -m epar <command>`: profile and sweep (run them under torchrun), demo."""

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"] and importlib.util.find_spec("epar.demo") is not None:
        from .demo import main as demo  # written separately; not part of the profiling CLI

        return demo(argv[1:])
    from .profiling.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
