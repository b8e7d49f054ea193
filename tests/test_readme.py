"""README.md and results/README.md: the first screen's table gives each method script's true size
and method lines, every markdown table renders, the README stays a five-minute read (at most 400
lines, no paragraph twice) and links both papers, both official repositories and 3DIEBench, and
every link into the repository points at a file and heading that exist."""
import re

from conftest import REPO

README = REPO / "README.md"
DOCS = (README, REPO / "results" / "README.md")
SCRIPTS = ("sie.py", "baselines.py", "ser.py")
MAX_LINES = 400

METHOD_BANNER = re.compile(r"# =+ the method =+$")
FLAGS_BANNER = re.compile(r"# =+ flags =+$")
HARNESS_BANNER = re.compile(r"# =+ harness\b")

LINKS = {
    "the SIE paper": "https://arxiv.org/abs/2302.10283",
    "the SER paper": "https://arxiv.org/abs/2603.06693",
    "the official SIE repository": "https://github.com/facebookresearch/SIE",
    "the official SER repository": "https://github.com/aitrics-chris/SER",
    "3DIEBench (its data README in the SIE repository)":
        "https://github.com/facebookresearch/SIE/tree/main/data",
}


def prose_lines(path):
    """(line number, line) of a markdown file outside its fenced code blocks."""
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            yield number, line


def cells(row):
    """A table row's cells, split as GitHub does: on every '|' not escaped by a backslash (a '|'
    inside `code` splits too), without the outer pipes."""
    parts = re.split(r"(?<!\\)\|", row.strip())
    if row.strip().startswith("|"):
        parts = parts[1:]
    if row.strip().endswith("|") and not row.strip().endswith("\\|"):
        parts = parts[:-1]
    return [part.strip() for part in parts]


DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def tables(path):
    """[(line number of the header, header, delimiter, rows)] of every table in the file."""
    lines = list(prose_lines(path))
    found, i = [], 0
    while i + 1 < len(lines):
        (number, header), (next_number, delimiter) = lines[i], lines[i + 1]
        if "|" in header and next_number == number + 1 and DELIMITER.match(delimiter):
            rows, j = [], i + 2
            while j < len(lines) and lines[j][0] == lines[j - 1][0] + 1 and "|" in lines[j][1]:
                rows.append(lines[j])
                j += 1
            found.append((number, header, delimiter, rows))
            i = j
        else:
            i += 1
    return found


def method_range(script):
    """(lines in the file, first and last line of its method): from the `the method` banner to
    the line before the `flags` banner (before the `harness` banner while a script has none)."""
    lines = (REPO / script).read_text().splitlines()

    def banner(pattern):
        return next((n for n, line in enumerate(lines, 1) if pattern.match(line)), None)

    start, end = banner(METHOD_BANNER), banner(FLAGS_BANNER) or banner(HARNESS_BANNER)
    assert start and end and start < end, f"{script}: no '# ==== the method ====' banner " \
                                          "followed by a flags or harness banner"
    return len(lines), start, end - 1


def test_the_script_table_states_each_scripts_size_and_method_lines():
    rows = {cells(row)[0]: (number, row) for _, _, _, table_rows in tables(README)
            for number, row in table_rows}
    stale = []
    for script in SCRIPTS:
        size, start, end = method_range(script)
        name = f"[`{script}`]({script})"
        want = [str(size), f"[{start}-{end}]({script}#L{start}-L{end})"]
        number, row = rows.get(name, (None, None))
        have = cells(row) if row else [name, "", "", "(what the script is)"]
        if have[1:3] != want:
            expected = "| " + " | ".join([name, *want, *have[3:]]) + " |"
            stale.append(f"README.md line {number or '(missing)'}:\n  {row}\nshould read\n"
                         f"  {expected}")
    assert not stale, "the script table is out of date:\n" + "\n".join(stale)


def test_every_table_has_one_cell_count():
    """Header, delimiter and every row have the same number of cells; a line starting with '|'
    outside a table (a table without its delimiter row) does not render either."""
    for path in DOCS:
        in_table = set()
        for number, header, delimiter, rows in tables(path):
            width = len(cells(header))
            assert len(cells(delimiter)) == width, (
                f"{path.name} line {number}: {width} header cells, {len(cells(delimiter))} in "
                f"the delimiter row")
            for row_number, row in rows:
                assert len(cells(row)) == width, (
                    f"{path.name} line {row_number}: {len(cells(row))} cells, the header has "
                    f"{width}")
            in_table.update(range(number, number + 2 + len(rows)))
        stray = [n for n, line in prose_lines(path)
                 if line.startswith("|") and n not in in_table]
        assert not stray, f"{path.name} lines {stray}: table rows outside a table"


def test_readme_is_at_most_400_lines():
    count = len(README.read_text().splitlines())
    assert count <= MAX_LINES, f"README.md has {count} lines, more than {MAX_LINES}"


def paragraphs(path):
    """(first line number, text with its whitespace collapsed) of each prose paragraph."""
    found, current = [], []
    for number, line in [*prose_lines(path), (None, "")]:
        if line.strip():
            current.append((number, line))
            continue
        text = " ".join(" ".join(line.split()) for _, line in current)
        text = re.sub(r"<[^>]+>", "", text).strip()           # HTML tags: markup, not text
        if len(text) >= 40:                      # not a short label such as a <summary>
            found.append((current[0][0], text))
        current = []
    return found


def first_sentence(text):
    return re.split(r"(?<=[.:!?])\s", text, maxsplit=1)[0]


def test_no_paragraph_appears_twice():
    """Not word for word, not reworded: two paragraphs that open with the same sentence, or
    that are 75 % the same text, are one paragraph told twice."""
    import difflib
    found = paragraphs(README)
    twice = []
    for i, (line_a, a) in enumerate(found):
        for line_b, b in found[i + 1:]:
            same_start = len(first_sentence(a)) >= 30 and first_sentence(a) == first_sentence(b)
            similar = difflib.SequenceMatcher(None, a, b)
            if a == b or same_start or (similar.real_quick_ratio() >= 0.75
                                        and similar.quick_ratio() >= 0.75
                                        and similar.ratio() >= 0.75):
                twice.append(f"lines {line_a} and {line_b}: {a[:60]}...")
    assert not twice, "README.md tells a paragraph twice:\n" + "\n".join(twice)


def test_readme_links_the_papers_the_official_code_and_3diebench():
    text = README.read_text()
    missing = [f"{what}: {url}" for what, url in LINKS.items() if f"]({url})" not in text]
    assert not missing, "README.md does not link " + "; ".join(missing)


def anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_repository_exist():
    """A relative link names a file or folder that exists and, after '#', one of its headings
    (the study moved to results/README.md: its links must follow)."""
    broken = []
    for path in DOCS:
        for number, line in prose_lines(path):
            for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", line):
                target = target[0] or target[1]
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, fragment = target.partition("#")
                file = path.parent / file if file else path
                if not file.exists():
                    broken.append(f"{path.name} line {number}: {target} (no such file)")
                elif re.fullmatch(r"L\d+(-L\d+)?", fragment):
                    continue
                elif fragment and file.suffix == ".md":
                    headings = [anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(),
                                                              flags=re.M)]
                    if fragment not in headings:
                        broken.append(f"{path.name} line {number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_reading_guides_name_code_that_exists():
    """Every `name` in the last column of a paper -> code table ('where in `X.py`') is defined in
    that script (`eval.name`: in eval.py), so the guide follows the code when it moves."""
    missing = []
    for _, header, _, rows in tables(README):
        script = re.search(r"where in `(\w+\.py)`", header)
        if not script:
            continue
        for number, row in rows:
            for name in re.findall(r"`([A-Za-z_][\w.]*)`", cells(row)[-1]):
                file = "eval.py" if name.startswith("eval.") else script.group(1)
                word = name.split(".")[-1]
                if not re.search(rf"\b{re.escape(word)}\b", (REPO / file).read_text()):
                    missing.append(f"README.md line {number}: `{name}` is not in {file}")
    assert not missing, "\n".join(missing)
