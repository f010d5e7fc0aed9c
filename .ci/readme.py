"""Render nbs/index.ipynb as README.md (markdown cells verbatim, code cells as python blocks). `--check` fails if they differ."""
import json, sys
from pathlib import Path

def render(nb_path="nbs/index.ipynb") -> str:
    cells = json.loads(Path(nb_path).read_text())["cells"]
    parts = []
    for c in cells:
        src = "".join(c["source"]).strip()
        if not src or src.startswith("#| hide"): continue
        parts.append(src if c["cell_type"] == "markdown" else f"```python\n{src}\n```")
    return "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    text = render(root / "nbs" / "index.ipynb")
    if "--check" in sys.argv:
        sys.exit(0 if (root / "README.md").read_text() == text else "README.md is out of date: run python .ci/readme.py")
    (root / "README.md").write_text(text)
