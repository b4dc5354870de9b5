"""The README's Python example runs as written, and every link in the README and docs/ leads somewhere."""

import re

import pytest
import torch

from conftest import ROOT


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend")
    monkeypatch.chdir(tmp_path)
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)[1]
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (our own README)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(torch.Size([16, 1, 28, 28]))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown page's headings."""
    return {re.sub(r"[^a-z0-9 \-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}  # fmt: skip


PAGES = ["README.md", "benchmarks/README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_every_link_leads_somewhere(page):
    path = ROOT / page
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: {target}"
        if anchor:
            assert anchor in anchors(linked.read_text()), f"{page}: {target}"
