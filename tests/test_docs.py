"""The documentation: README.md is a short front page, the rest lives in docs/*.md, and every
relative link between them (and to the code and pictures) leads somewhere that exists."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 300

FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title" after the target
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)


def without_code(markdown, inline=True):
    """The text without code blocks (a `# comment` in a bash block is not a heading) and, when
    `inline`, without code spans (a link written in code is not a link)."""
    text = FENCED_BLOCK.sub("", markdown)
    return INLINE_CODE.sub("", text) if inline else text


def github_anchor(heading):
    """The anchor GitHub gives a heading: the text as shown (a link's text, not its address),
    lower case, punctuation other than hyphens removed, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    with open(path, encoding="utf-8") as f:
        headings = HEADING.findall(without_code(f.read(), inline=False))
    seen, found = {}, set()
    for anchor in map(github_anchor, headings):
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        found.add(anchor if n == 0 else f"{anchor}-{n}")
    return found


def broken_links(path):
    """Each relative link of a Markdown file that leads nowhere, as 'file: target (why)'."""
    with open(path, encoding="utf-8") as f:
        text = without_code(f.read())
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{os.path.relpath(path, ROOT)}: {target}"
        if not os.path.exists(linked):
            problems.append(f"{where} (no such file)")
        elif anchor and (not linked.endswith(".md") or anchor not in anchors(linked)):
            problems.append(f"{where} (no heading with anchor #{anchor})")
    return problems


def test_every_relative_link_and_image_leads_to_an_existing_file_and_heading():
    problems = [problem for path in [README, *DOCS] for problem in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "[back](../README.md)\n\n# A page\n\n## Speed and scale (`torchrun`)\n\n"
        "```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Front\n\n"
        "[fine](docs/a.md#speed-and-scale-torchrun) [fine too](#front) ![fine](docs/a.md)\n"
        "[missing file](docs/b.md) ![missing picture](docs/b.jpg)\n"
        "[missing heading](docs/a.md#speed) [heading in code](docs/a.md#not-a-heading)\n"
        "[missing here](#back) [web](https://example.org/x.md) `[in code](docs/c.md)`\n")
    assert [p.split(": ", 1)[1] for p in broken_links(str(page))] == [
        "docs/b.md (no such file)",
        "docs/b.jpg (no such file)",
        "docs/a.md#speed (no heading with anchor #speed)",
        "docs/a.md#not-a-heading (no heading with anchor #not-a-heading)",
        "#back (no heading with anchor #back)",
    ]


def test_anchors_follow_githubs_rules():
    assert github_anchor("Several GPUs, several machines (`torchrun`)") == \
        "several-gpus-several-machines-torchrun"
    assert github_anchor("VOC 2012: the evaluation-server submission") == \
        "voc-2012-the-evaluation-server-submission"
    assert github_anchor("New labels (zero-shot)") == "new-labels-zero-shot"
    assert github_anchor("`--model`: DSDL or the baseline") == "--model-dsdl-or-the-baseline"


def test_the_readme_is_a_front_page_of_at_most_300_lines():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f"README.md has {len(lines)} lines; move details into docs/ (at most {README_MAX_LINES})"


def test_the_readme_keeps_the_three_commands_a_newcomer_needs():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for command in ["python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt",
                    "python main_voc2007.py data/voc2007",
                    "python -m pytest -q -n auto tests"]:
        assert f"```bash\n{command}\n```" in text, f"README.md lost the command: {command}"


def test_the_readme_maps_every_doc():
    with open(README, encoding="utf-8") as f:
        links = set(LINK.findall(without_code(f.read())))
    missing = [os.path.relpath(doc, ROOT) for doc in DOCS
               if os.path.relpath(doc, ROOT) not in links]
    assert DOCS and not missing, f"README.md does not link to {missing}"


def test_every_doc_starts_with_a_link_back_to_the_readme_and_a_title():
    for doc in DOCS:
        with open(doc, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        name = os.path.relpath(doc, ROOT)
        assert "](../README.md)" in lines[0], f"{name} does not start with a link back to README.md"
        assert lines[1].startswith("# "), f"{name}: the line after the link is not the title (# ...)"
