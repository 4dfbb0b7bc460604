"""The README's generated sections (defaults, node reference) match the code."""

import os

from dreamflow import docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_defaults_and_node_reference_are_current():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert docs.render_readme(text) == text, "README is stale: run `python -m dreamflow.docs --write README.md`"


def test_every_config_field_is_documented():
    for cls in docs._config_classes():
        import dataclasses

        missing = [f.name for f in dataclasses.fields(cls) if not docs.field_docs(cls).get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_readme_names_both_setup_commands_and_ci_calls_make_test():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "make demo" in text and "make test" in text
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "make test" in f.read()


#: A measured figure in text: a card, a number with a unit of time or memory, an R-precision value.
FIGURE = r"H100|H200|A100|\b\d[\d.,]*\s?(ms|s|min|minutes|GiB|GB|MB)\b|R-precision \d"


def test_generated_sections_carry_no_measured_figures():
    """Docstrings and tooltips say what and why; measured figures (timings, memory, cards) live in bench/RESULTS.md
    with their date, card and commit, and the README's generated tables must not copy them."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    figure = re.compile(FIGURE)
    for begin, end in ((docs.BEGIN, docs.END), (docs.NODES_BEGIN, docs.NODES_END)):
        section = text[text.index(begin):text.index(end)]
        found = [m.group(0) for m in figure.finditer(section)]
        assert not found, f"measured figures in the generated README section {begin}: {found[:5]}"


#: Figures in docstrings and comments that are not measurements: sizes by arithmetic, limits and budgets we chose,
#: and examples of a format. (file, the matched text) -> why it may stay.
NOT_MEASURED = {
    ("dreamflow/io.py", "70 MB"): "a default NeRF state's tensors: 16 levels x 2^19 entries x 2 features x 4 bytes",
    ("dreamflow/hosting.py", "31 s"): "an example of the progress line's format",
    ("dreamflow/export/uv.py", "5 s"): "the worker's kill timeout (a setting)",
    ("dreamflow/export/uv.py", "0.8 GB"): "8192^2 x 3 x 4 bytes",
    ("dreamflow/toy/demo_settings.py", "5 min"): "the demo's time budget (a target)",
    ("dreamflow/toy/prior.py", "20 MB"): "the toy prior's size budget (a target)",
    ("dreamflow/denoisers/denoiser.py", "0.25 GB"): "SD 1.5's text encoder weights in float16",
    ("dreamflow/denoisers/denoiser.py", "1.6 GB"): "the refiner's text encoder and VAE weights in float16",
    ("dreamflow/denoisers/denoiser.py", "170 MB"): "the VAE's weights in float16",
    ("dreamflow/denoisers/denoiser.py", "40 GiB"): "VAE_CHECKPOINTING_BELOW_GIB (a setting)",
    ("dreamflow/denoisers/denoiser.py", "20 GB"): "issue 6's memory budget (a target)",
    ("dreamflow/denoisers/denoiser.py", "12 GB"): "a card size (the low_vram preset's target)",
    ("dreamflow/denoisers/memory.py", "12 GB"): "a card size (the low_vram preset's target)",
}


def _docs_and_comments(path):
    """(line, text) of every docstring (modules, classes, functions, attributes) and comment of a Python file."""
    import ast
    import io
    import tokenize

    with open(path, encoding="utf-8") as f:
        src = f.read()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for before, stmt in zip([None, *body], body):
            is_doc = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
            first = before is None and isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            if is_doc and (first or isinstance(before, (ast.Assign, ast.AnnAssign))):
                yield stmt.lineno, stmt.value.value
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_docstrings_and_comments_carry_no_measured_figures():
    """Issue 18: numbers measured on some machine (timings, memory, speed-ups, cards, R-precision) live in
    bench/RESULTS.md, dated, with card and commit; the code's docstrings and comments point there."""
    import re

    figure = re.compile(FIGURE + r"|\b\d[\d.]*x (faster|slower|less|more)\b")
    found = []
    for top in ("dreamflow", "nodes"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(f for f in files if f.endswith(".py")):
                rel = os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
                for line, text in _docs_and_comments(os.path.join(ROOT, rel)):
                    found += [f"{rel}:{line}: {m.group(0)!r}" for m in figure.finditer(text)
                              if (rel, m.group(0)) not in NOT_MEASURED]
    assert not found, f"measured figures outside bench/RESULTS.md: {found}"
