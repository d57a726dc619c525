"""MkDocs hooks: the site's home page is the repository's README, with its ``docs/`` links
made relative to the site (one text for GitHub and the site, never two to keep in step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    readme = Path(config["docs_dir"]).parent / "README.md"
    return readme.read_text().replace("](docs/", "](")
