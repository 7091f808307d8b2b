"""The docs hold together: the README fits on a few screens and keeps its first lines, every
relative link and `#anchor` resolves, the configuration reference is what the config generates,
and the paths and config keys the pages name exist."""

import dataclasses
import importlib.util
import re
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
REFERENCE = DOCS / "configuration.md"
HAND_WRITTEN = [page for page in PAGES if page != REFERENCE]


@pytest.fixture(scope="module")
def generator():
    """scripts/config_reference.py, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_reference"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("config_reference", None)


def _prose(text: str) -> str:
    """The markdown outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return re.sub(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text in lower case, every
    character but letters, marks, digits, connector punctuation (`_`), spaces and hyphens dropped,
    each space a hyphen. Written apart from the generator's, so that each checks the other."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    return "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN"
                   or unicodedata.category(c) == "Pc").replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", _prose(page.read_text()), re.M):
        base = _slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
    return anchors


def _links(page: Path) -> list[str]:
    """The targets of the page's links and images, code spans left out."""
    text = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def test_the_slugs_are_githubs():
    # anchors the README used on GitHub before it was split
    assert _slug("The guard against reward hacking: `reward.heldout`") == "the-guard-against-reward-hacking-rewardheldout"
    assert _slug("Text encoders and memory: `model.prompt_cache_size`, `model.offload_text_encoders`, "
                 "`train.gradient_checkpointing`") == ("text-encoders-and-memory-modelprompt_cache_size-"
                                                      "modeloffload_text_encoders-traingradient_checkpointing")
    assert _slug("Model families: SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1") == "model-families-sd-1x2x-sdxl-sd3sd35-flux1"


def test_the_configuration_reference_is_current(generator):
    assert REFERENCE.is_file(), generator.STALE
    assert generator.render() == REFERENCE.read_text(), generator.STALE


def test_the_check_flag_says_when_the_reference_is_stale(generator, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generator, "OUTPUT", tmp_path / "configuration.md")
    stale = "docs/configuration.md is stale: run python scripts/config_reference.py\n"
    assert generator.main(["--check"]) == 1 and capsys.readouterr().err == stale  # missing
    (tmp_path / "configuration.md").write_text(generator.render() + "\nedited by hand\n")
    assert generator.main(["--check"]) == 1 and capsys.readouterr().err == stale
    assert generator.main([]) == 0 and generator.main(["--check"]) == 0


def test_the_reference_has_every_field_with_its_comment(generator):
    documented = generator.keys()
    for section in generator.sections():
        for f in dataclasses.fields(section.cls):
            key = f"{section.key}.{f.name}" if section.key else f.name
            assert key in documented, f"{key} is missing from docs/configuration.md"
    # what a reader looks for: a key, its type, its default, the comment above it
    text = REFERENCE.read_text()
    assert "| `sample.batch_size` | int | `8` | images per sampler task" in text
    assert "| `cluster.reward.num_cpus` | float or \"auto\" | `0.0` |" in text  # the parent's default, not the class's
    assert "| `run_name` | str or null | `null` | default: a timestamp |" in text  # a comment after the field


def test_the_generator_follows_any_nesting(generator, tmp_path, monkeypatch):
    """Fields may move into nested dataclasses (e.g. a family's step settings): each is found
    with its own comment, at any depth, in a list or behind an optional."""
    (tmp_path / "nested_config_example.py").write_text('''\
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Ddim:
    """DDIM's step."""

    # the DDIM eta: 0 is deterministic
    eta: float = 1.0


@dataclass
class Term:
    name: str
    # how much it counts
    weight: float = 1.0


@dataclass
class Sample:
    # steps of the sampler

    num_steps: int = 10  # not the comment above: a blank line parts them
    # the step's settings
    ddim: Ddim = field(default_factory=Ddim)
    extra: Ddim | None = None


@dataclass
class Root:
    # the sampling
    sample: Sample = field(default_factory=lambda: Sample(ddim=Ddim(eta=0.5)))
    terms: list[Term] = field(default_factory=list)
    # a | pipe and a * star
    kind: Literal["a", "b"] | int = "a"
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    from nested_config_example import Root

    sections = generator.sections(Root)
    assert [s.key for s in sections] == ["", "sample", "sample.ddim", "sample.extra", "terms[]"]
    rows = {row.key: row for s in sections for row in s.rows}
    assert rows["sample.ddim.eta"].text == "the DDIM eta: 0 is deterministic"
    assert rows["sample.ddim.eta"].default == "`0.5`"  # the default Root gives it
    assert rows["sample.extra.eta"].default == "`1.0`"  # the class's, under a null parent
    assert rows["sample.num_steps"].text == "not the comment above: a blank line parts them"
    assert rows["terms[].name"].default == "required" and rows["terms[].weight"].text == "how much it counts"
    assert rows["kind"].type == '"a" or "b" or int'
    assert "sample.ddim" not in rows and rows["sample.extra"].default == "`null`"
    assert sections[2].intro == "the step's settings DDIM's step." and sections[3].intro == "DDIM's step."
    text = generator.render(Root)
    assert "| `kind` | \"a\" or \"b\" or int | `\"a\"` | a \\| pipe and a \\* star |" in text
    sys.modules.pop("nested_config_example", None)


def test_the_readme_fits_on_a_few_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the rest to docs/"


def test_the_readme_starts_with_the_two_commands():
    """CI and people start here: the title, then `make train` and `make test` in a bash block."""
    text = README.read_text()
    assert text.startswith("# ddpo-ray\n")
    first_block = re.search(r"```(\w*)\n(.*?)```", text, re.S)
    assert first_block.group(1) == "bash"
    commands = [line.split("#")[0].strip() for line in first_block.group(2).splitlines()]
    assert commands == ["make train", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading with that anchor in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_page_has_one_title(page):
    titles = re.findall(r"^# ", _prose(page.read_text()), re.M)
    assert page.read_text().startswith("# ") and len(titles) == 1, f"{page.relative_to(ROOT)}: one `# title`, first"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in _links(README)}
    orphans = [page.relative_to(ROOT).as_posix() for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"README.md links to none of {orphans}: add them to its table of docs"


# the folders of the repository that pages name files in
FOLDERS = r"(?:ddpo|actors|learner|rewards|cluster|configs|bench|scripts|tests|docs|requirements|\.ci)"


def _code(page: Path) -> list[str]:
    text = page.read_text()
    return re.findall(r"`([^`\n]+)`", _prose(text)) + re.findall(r"^[ \t]*```\w*\n(.*?)^[ \t]*```", text, re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_files_a_page_names_exist(page):
    """`bench/frontier.py`, `configs/digits.yaml`, `docs/flow_gpu_h200_*.json`: a file that moved
    leaves the page that names it pointing at nothing."""
    missing = set()
    for code in _code(page):
        for name in re.findall(rf"(?<![\w./-]){FOLDERS}/[\w./*-]*[\w*/]", code):
            if "*" in name:
                if not list(ROOT.glob(name)):
                    missing.add(name)
            elif not (ROOT / name).exists():
                missing.add(name)
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {sorted(missing)}"


SECTIONS = r"(?:model|lora|prompts|sample|train|advantage|reward|cluster)"


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_config_keys_a_page_names_exist(page, generator):
    """`sample.sde_window`, `--set train.learning_rate=...`: each is a key of docs/configuration.md
    (a key below a mapping, as `reward.params.x`, counts as its mapping's), or a key that moved
    this release and is still read (`ddpo.config.MOVED_KEYS`)."""
    from ddpo.config import MOVED_KEYS

    keys = {*generator.keys(), *MOVED_KEYS}
    open_ended = {row.key for section in generator.sections() for row in section.rows if row.type.startswith("mapping")}
    unknown = set()
    for code in _code(page):
        for key in re.findall(rf"(?<![\w./<-]){SECTIONS}\.[A-Za-z_][\w.]*", code):
            key = key.rstrip(".")
            if key.rsplit(".", 1)[-1] in {"py", "yaml", "json", "jsonl", "md", "png", "txt"}:
                continue
            if key not in keys and not any(key.startswith(prefix + ".") for prefix in open_ended):
                unknown.add(key)
    assert not unknown, (f"{page.relative_to(ROOT)} names config keys that ddpo/config.py does not have: "
                         f"{sorted(unknown)} (every key is in docs/configuration.md)")
