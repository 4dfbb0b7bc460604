"""``python -m dreamflow``: ``run`` executes a workflow headless; ``demo`` runs the offline demo.

    python -m dreamflow run "workflows/DreamFlow quick draft.json" --set DreamFlowNeRFStage.iterations=200
    python -m dreamflow demo --prompt "a red torus"
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def demo(argv: List[str]) -> int:
    """Forward ``argv`` to :func:`dreamflow.demo.main`."""
    from . import demo as demo_module

    return int(demo_module.main(argv) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    from .runner.cli import add_run_arguments, run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse would claim --help / --prompt)
        return demo(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dreamflow", description="DreamFlow text-to-3D (headless)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a ComfyUI workflow of DreamFlow nodes without ComfyUI"))
    sub.add_parser("demo", help="offline end-to-end demo on the shipped toy prior (see `demo --help`)")
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
