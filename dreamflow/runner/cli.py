"""``python -m dreamflow run WORKFLOW.json [--set NODE.INPUT=VALUE ...] [--output DIR]``.

Runs a UI- or API-format ComfyUI workflow of DreamFlow nodes without ComfyUI: convert, apply the
``--set`` edits, validate everything, then execute with terminal progress bars. Exit codes: 0 done,
2 a user error (one line, no traceback), 130 interrupted (Ctrl-C), 1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Dict, List, Optional

from .. import hosting
from ..errors import DreamFlowError, DreamFlowInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="workflow .json (UI format from Save, or API format from Export (API))")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="change an input before running; NODE is a node id, title or type "
                        "(every match), e.g. --set DreamFlowNeRFStage.iterations=10 (repeatable)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: $DREAMFLOW_OUTPUT or ./output)")
    p.add_argument("--input", metavar="DIR", help="input folder for DreamFlowLoadState (default: $DREAMFLOW_INPUT or ./input)")
    p.add_argument("--nodes", dest="custom_nodes", action="append", default=[], metavar="DIR",
                   help="also load this custom-node folder (as ComfyUI loads custom_nodes/*), e.g. "
                        "examples/dreamflow_example_stage (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="convert and validate only; print the API prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend choices and engine details")


@contextmanager
def _env(**values: Optional[str]):
    """Set environment variables for the run (the engine reads the folders from them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = os.path.abspath(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare(path: str, sets: List[str], log=print, custom_nodes=()) -> tuple:
    """Load, convert, edit and validate a workflow: ``(prompt, ui_workflow, defs)`` ready to run."""
    from .convert import as_api, load_workflow_file
    from .defs import node_defs
    from .validate import apply_sets, validate_prompt

    data = load_workflow_file(path)
    defs = node_defs(custom_nodes=custom_nodes)
    try:
        prompt, ui = as_api(data, defs)
        for line in apply_sets(prompt, sets, defs):
            log(f"set {line}")
        return validate_prompt(prompt, defs), ui, defs
    except (TypeError, KeyError, AttributeError, IndexError, ValueError, RecursionError) as e:
        if isinstance(e, DreamFlowError):
            raise
        # the explicit checks (convert.check_api_prompt / check_ui_workflow) name most cases; this is the net
        raise DreamFlowError(f"workflow file '{path}' is malformed ({type(e).__name__}: {str(e)[:80]}); re-save it "
                             f"from ComfyUI with Save or Export (API)") from None


def saved_files(ui: Dict[str, dict], output_dir: str) -> List[str]:
    """Paths named by output nodes' ``ui`` dicts ("3d"/"images" file records, "text" strings)."""
    files = []
    for entry in ui.values():
        for key in ("3d", "images"):
            for rec in entry.get(key) or []:
                if isinstance(rec, dict) and "filename" in rec:
                    files.append(os.path.join(output_dir, rec.get("subfolder", ""), rec["filename"]))
        files += [os.path.join(output_dir, str(t)) for t in entry.get("text") or []]  # relative to the output
    return files


def quiet_progress_bars() -> None:
    """When the output is not a terminal (a log file, CI), the libraries' tqdm bars (weights loading) would write
    carriage returns into one long line: turn them off. Stages print plain lines there
    (``hosting.plain_progress``)."""
    if hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            import importlib

            importlib.import_module(module).disable_progress_bar()
        except Exception:
            pass


def run_command(args: argparse.Namespace) -> int:
    """The ``run`` subcommand; returns the process exit code."""
    from .execute import run_prompt

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    quiet_progress_bars()
    try:
        with _env(DREAMFLOW_OUTPUT=args.output, DREAMFLOW_INPUT=args.input):
            prompt, ui, defs = prepare(args.workflow, args.sets, custom_nodes=getattr(args, "custom_nodes", ()))
            if args.dry_run:
                print(json.dumps(prompt, indent=1))
                return 0
            with hosting.sigint_as_interrupt():
                result = run_prompt(prompt, defs, workflow=ui)
            for f in saved_files(result.ui, hosting.output_directory()):
                print(f"saved {f}")
    except DreamFlowInterrupted as e:
        print(f"dreamflow: interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DreamFlowError as e:
        print(f"dreamflow: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
