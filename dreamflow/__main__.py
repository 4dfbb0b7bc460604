"""``python -m dreamflow``: ``run`` executes a workflow headless; ``demo`` runs the offline demo.

    python -m dreamflow run workflows/dreamflow_draft.json --set DreamFlowNeRFStage.iterations=200
    python -m dreamflow demo --prompt "a red cube"
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from .runner.cli import add_run_arguments, run_command

    parser = argparse.ArgumentParser(prog="python -m dreamflow", description="DreamFlow text-to-3D (headless)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="run a ComfyUI workflow of DreamFlow nodes without ComfyUI"))
    demo = sub.add_parser("demo", help="offline end-to-end demo on the shipped toy prior", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_command(args)
    # The demo module is written separately; this hook only forwards its arguments.
    if importlib.util.find_spec("dreamflow.demo") is None:
        print("dreamflow: error: the demo is not part of this version (no dreamflow/demo.py); "
              "use `python -m dreamflow run workflows/<file>.json` instead", file=sys.stderr)
        return 2
    from . import demo as demo_module

    return int(demo_module.main(args.demo_args) or 0)


if __name__ == "__main__":
    sys.exit(main())
