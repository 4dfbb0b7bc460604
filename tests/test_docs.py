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
