"""``python -m dreamflow``: ``run`` executes a workflow headless; ``batch`` runs it for many prompts and seeds
(on Ray when installed); ``demo`` runs the offline demo.

    python -m dreamflow run "workflows/DreamFlow quick draft.json" --set DreamFlowNeRFStage.iterations=200
    python -m dreamflow batch prompts.txt --workflow "workflows/DreamFlow quick draft.json" --output out/batch --seeds 2
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
    from .runner.batch import add_batch_arguments, batch_command
    from .runner.cli import add_run_arguments, run_command

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (argparse would claim --help / --prompt)
        return demo(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dreamflow", description="DreamFlow text-to-3D (headless)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a ComfyUI workflow of DreamFlow nodes without ComfyUI"))
    add_batch_arguments(sub.add_parser("batch", help="run a workflow for every prompt of a file and every seed, on "
                                                     "Ray (local or a cluster) or local processes; resumable"))
    sub.add_parser("demo", help="offline end-to-end demo on the shipped toy prior (see `demo --help`)")
    args = parser.parse_args(argv)
    return batch_command(args) if args.command == "batch" else run_command(args)


if __name__ == "__main__":
    sys.exit(main())
