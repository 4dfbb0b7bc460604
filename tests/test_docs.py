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


def test_generated_sections_carry_no_measured_figures():
    """Docstrings and tooltips say what and why; measured figures (timings, memory, cards) live in bench/RESULTS.md
    with their date, card and commit, and the README's generated tables must not copy them."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    figure = re.compile(r"H100|H200|A100|\b\d[\d.,]*\s?(ms|s|min|minutes|GiB|GB|MB)\b|R-precision \d")
    for begin, end in ((docs.BEGIN, docs.END), (docs.NODES_BEGIN, docs.NODES_END)):
        section = text[text.index(begin):text.index(end)]
        found = [m.group(0) for m in figure.finditer(section)]
        assert not found, f"measured figures in the generated README section {begin}: {found[:5]}"
