from receiver.config_doc import render

from .harness import REPO


def test_readme_reference_matches_the_code() -> None:
    readme = (REPO / "README.md").read_text()
    assert render() in readme, "README's configuration reference is stale: python -m receiver.config_doc"
    assert "make test" in readme and "make run" in readme
