"""Headless runner: execute ComfyUI workflows (UI or API format) of DreamFlow nodes without ComfyUI.

    python -m dreamflow run "workflows/DreamFlow quick draft.json" --set DreamFlowNeRFStage.iterations=10

Pieces, one job each: ``defs`` (node definitions, loading the node pack), ``convert`` (UI -> API as
ComfyUI's frontend does), ``validate`` (checks and ``--set`` edits), ``execute`` (dependency order,
progress, interrupts), ``cli`` (the command), ``build`` (writes the example workflows in workflows/).
"""

from .convert import as_api, load_workflow_file, ui_to_api
from .defs import NodeDef, load_node_pack, node_defs
from .execute import RunResult, run_prompt, topological_order
from .validate import apply_sets, validate_prompt

__all__ = ["as_api", "load_workflow_file", "ui_to_api", "NodeDef", "load_node_pack", "node_defs", "RunResult",
           "run_prompt", "topological_order", "apply_sets", "validate_prompt"]
