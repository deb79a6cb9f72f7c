"""The docs stay navigable and true: every shell block is run by a test as typed or says why not, every
relative link lands, every page is on the README's map, and the configuration reference and JSON Schema are
what params.yaml's pydantic models accept today. Static checks, well under a second: the tests that run
the blocks are the slow ones that already exist (tests/doc_blocks.py says how a block is tested)."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import jsonschema
import yaml
from doc_blocks import REPO, blocks, doc_block, link_venv, pages, run_shell

from edgeship.config import reference

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _references() -> dict[tuple[str, str], list[str]]:
    """(page, name) of every `doc_block(page, name, ...)` call with literal arguments in tests/, and where."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            page, name = node.args[:2]
            if function == "doc_block" and isinstance(page, ast.Constant) and isinstance(name, ast.Constant):
                found.setdefault((page.value, name.value), []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_fence_names_its_language():
    bare = [f"{b.page}:{b.line}" for page in pages() for b in blocks(page) if not b.language]
    assert not bare, f"fences without a language (```bash, ```yaml, ```text): {bare}"


def test_every_shell_block_is_run_by_a_test_or_says_why_not():
    read = _references()
    unaccounted = []
    for page in pages():
        for block in blocks(page):
            if not block.is_shell or (block.name and (page, block.name) in read):
                continue
            if block.name is None and block.not_run_reason is None:
                unaccounted.append(f"{page}:{block.line}: neither named (<!-- block: NAME --> above the fence, read by "
                                   f"doc_block({page!r}, NAME) in a test) nor marked '# not run here: REASON'")
            elif block.name is not None and block.not_run_reason is None:
                unaccounted.append(f"{page}:{block.line}: block {block.name!r} is read by no test")
            elif block.not_run_reason is not None and len(block.not_run_reason.split()) < 3:
                unaccounted.append(f"{page}:{block.line}: say why it is not run (at least a few words)")
    assert not unaccounted, "\n".join(unaccounted)


def test_every_block_a_test_reads_exists_once():
    named = {}
    for page in pages():
        for block in blocks(page):
            if block.name:
                assert (page, block.name) not in named, f"{page}: two blocks named {block.name!r}"
                assert block.not_run_reason is None, f"{page}:{block.line}: a tested block says it is not run"
                named[(page, block.name)] = block
    dangling = {ref: where for ref, where in _references().items() if ref not in named}
    assert not dangling, f"tests read blocks that no page has: {dangling}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page (duplicates numbered as GitHub numbers them)."""
    seen: dict[str, int] = {}
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        slug = reference.anchor(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()))
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_relative_links_land_on_a_file_and_heading():
    broken = []
    for page in pages():
        source = REPO / page
        text = re.sub(r"(?ms)^```.*?^```", "", source.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                assert "github.com" not in target or "/edgeship/" not in target, f"{page}: link {target} relatively"
                continue
            path, _, fragment = target.partition("#")
            resolved = (source.parent / path).resolve() if path else source
            if not resolved.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
                broken.append(f"{page}: {target} (no such heading in {resolved.name})")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_and_maps_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme) < 10_000, "README.md is the front door: move details to a page under docs/ and link it"
    mapped = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    missing = [page for page in pages() if page.startswith("docs/") and page not in mapped]
    assert not missing, f"pages the README's Documentation map does not list: {missing}"


def test_the_configuration_reference_and_schema_are_what_the_models_accept(tmp_path):
    """The regeneration command of docs/writing-docs.md, as typed, writes what is committed."""
    (tmp_path / "docs").mkdir()
    link_venv(tmp_path)
    run_shell(doc_block("docs/writing-docs.md", "regenerate-reference"), cwd=tmp_path, env=dict(os.environ))
    stale = [str(path) for path in (reference.SCHEMA_FILE, reference.REFERENCE_FILE)
             if (tmp_path / path).read_text() != (REPO / path).read_text()]
    assert not stale, f"{stale} stale: run `.venv/bin/{reference.COMMAND}` and commit"


def test_params_yaml_names_the_schema_and_validates_against_it_where_a_typo_does_not():
    text = (REPO / "params.yaml").read_text()
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={reference.SCHEMA_FILE}"
    schema = json.loads((REPO / reference.SCHEMA_FILE).read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    params = yaml.safe_load(text)
    assert not [error.message for error in validator.iter_errors(params)]
    params["train"]["epoch"] = 3                      # a typo of `epochs`
    params["targets"].append("onnx-int4")             # no such target
    params["rollout"] = {"default": {"abort_criteria": [{"failure_type": "boredom"}]}}
    errors = {"/".join(map(str, error.absolute_path)): error.message for error in validator.iter_errors(params)}
    assert "'epoch' was unexpected" in errors["train"]
    assert "onnx-int4" in errors[f"targets/{len(params['targets']) - 1}"]
    assert "boredom" in errors["rollout/default/abort_criteria/0/failure_type"]


def test_the_generator_rewrites_what_is_stale_and_check_names_it(tmp_path, capsys):
    assert reference.main(["--root", str(tmp_path)]) == 2                 # no docs/: not a repository root
    (tmp_path / "docs").mkdir()
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1      # nothing generated yet
    assert reference.main(["--root", str(tmp_path)]) == 0
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / reference.REFERENCE_FILE).write_text("# Configuration reference\n(an old copy)\n")
    capsys.readouterr()
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    assert f"{reference.REFERENCE_FILE} is stale: run `{reference.COMMAND}`" in capsys.readouterr().err
