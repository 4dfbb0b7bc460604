"""Run the Khronos glTF validator (npm ``gltf-validator``, installed into ``<repo>/.tools`` by ``make``).

``validate_glb(path)`` returns the validator's report dict (``report["issues"]["numErrors"]`` etc.).
A missing node or package raises :class:`ValidatorUnavailable` (a test failure, never a skip): ``make
test`` installs the package, so its absence means the set-up is broken.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_MODULES = os.path.join(REPO, ".tools", "node_modules")
SCRIPT = os.path.join(REPO, "tests", "js", "validate.mjs")
VERSION = "2.0.0-dev.3.10"
INSTALL = "make .tools/node_modules/gltf-validator/package.json  (runs: npm install --prefix .tools gltf-validator@" + VERSION + ")"

#: glTF validator severities (report ``issues.messages[i].severity``).
ERROR, WARNING, INFO, HINT = 0, 1, 2, 3


class ValidatorUnavailable(RuntimeError):
    """node or the gltf-validator package is missing."""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise ValidatorUnavailable(f"node (Node.js) is not on PATH; install Node.js >= 16 and npm, then run {INSTALL}")
    if not os.path.isfile(os.path.join(NODE_MODULES, "gltf-validator", "package.json")):
        raise ValidatorUnavailable(f"gltf-validator is not installed in {NODE_MODULES}; run {INSTALL}")
    return node


def validate_glbs(paths: Sequence[str]) -> Dict[str, dict]:
    """Validate several files in one node process; returns ``{path: report}``."""
    node = _node()
    env = dict(os.environ, NODE_PATH=NODE_MODULES)
    proc = subprocess.run([node, SCRIPT, *paths], capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode == 2:
        raise ValidatorUnavailable(f"{proc.stderr.strip()}; run {INSTALL}")
    if proc.returncode != 0:
        raise AssertionError(f"glTF validator failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def validate_glb(path: str) -> dict:
    """Validate one GLB/glTF file; returns the validator's report dict."""
    return validate_glbs([path])[path]


def messages(report: dict, severity: int) -> List[str]:
    """``"CODE at POINTER: message"`` lines of one severity."""
    return [f"{m['code']} at {m.get('pointer', '?')}: {m['message']}"
            for m in report["issues"]["messages"] if m["severity"] == severity]


def assert_valid(paths: Sequence[str]) -> Dict[str, dict]:
    """Assert zero validator errors for every file; warnings are allowed but listed (pytest warning summary)."""
    reports = validate_glbs(list(paths))
    for path, report in reports.items():
        assert report["validatorVersion"] == VERSION, report["validatorVersion"]
        errors = messages(report, ERROR)
        assert report["issues"]["numErrors"] == 0 and not errors, f"{path}: glTF validator errors: {errors}"
        for w in messages(report, WARNING):
            warnings.warn(f"glTF validator warning in {os.path.basename(path)}: {w}")
    return reports
