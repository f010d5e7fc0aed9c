"""Repository contracts: the README is rendered from nbs/index.ipynb, CI runs the README's test command, nbdev settings."""
import configparser, json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_rendered_from_index_notebook():
    r = subprocess.run([sys.executable, ".ci/readme.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _sh_blocks(text):
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_readme_has_three_commands_and_ci_runs_its_test_command():
    blocks = _sh_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3, blocks
    setup, main_job, test_cmd = blocks
    assert setup.startswith("pip install") and main_job.startswith("papermill nbs/05_limit.ipynb")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"


def test_nbdev_settings_keep_papermill_tags():
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    assert d["lib_name"] == "noisyrepro" and d["allowed_cell_metadata_keys"].strip() == "tags"
    assert "nbdev==2.4.14" in d["dev_requirements"]


def test_each_notebook_exports_at_most_one_module_and_never_its_parameters_cell():
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        exps = [l for c in cells for l in c["source"] if l.startswith("#| default_exp")]
        assert len(exps) <= 1, nb
        for c in cells:
            if "parameters" in c.get("metadata", {}).get("tags", []):
                src = "".join(c["source"])
                assert "#| export" not in src and "#|export" not in src, f"{nb.name}: parameters cell is exported"


def _committed(pattern):
    "Tracked files under outputs/ matching a glob pattern (what a clean clone has)."
    out = subprocess.run(["git", "ls-files", "outputs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out if Path(p).match(pattern)]


def test_committed_outputs_come_from_clean_commits():
    "Every committed provenance.json names a commit with no uncommitted changes (issue 11)."
    provs = _committed("provenance.json")
    assert provs, "no committed provenance.json under outputs/"
    dirty = [str(p.relative_to(ROOT)) for p in provs if json.loads(p.read_text()).get("git_commit", "+dirty").endswith("+dirty")
             or not json.loads(p.read_text()).get("git_commit")]
    assert not dirty, f"rendered from a dirty tree (re-render from a clean commit): {dirty}"


def test_committed_tables_state_their_selection_rule():
    "Every rendered results table says which rule selected the numbers it shows (issue 11)."
    tables = [p for p in _committed("*.md") if p.read_text().startswith("**")]
    assert tables
    missing = [str(p.relative_to(ROOT)) for p in tables if "Selection:" not in p.read_text().splitlines()[0]]
    assert not missing, f"tables without a selection rule in the caption: {missing}"


def test_notebooks_cite_papers_not_files_a_clone_lacks():
    "A clone has no shared/ folder and no IMPLEMENTATION_NOTES.md: notebooks cite the papers and state the code facts themselves (issue 14)."
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        text = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
        for bad in ("IMPLEMENTATION_NOTES", "shared/papers", "shared/data", "shared/reference"):
            assert bad not in text, f"{nb.name} cites {bad}"
