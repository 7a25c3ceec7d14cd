"""The tree page: self-contained, well-formed, every node shown with its statistics, text escaped,
the principal variation highlighted."""

import math
from html.parser import HTMLParser

from treedistill.search import Candidate, SearchSettings, extract, search, tree_to_html

EOS, STEP_END = 98, 99
WORDS = {0: "<step>a", 1: "b & c", 2: "d", EOS: "</answer>", STEP_END: "</step>"}


def decode(tokens):
    return "".join(WORDS.get(t, f"[{t}]") for t in tokens)


def searched_tree():
    def expand(reqs):
        return [[Candidate((d, EOS if r.depth == 2 else STEP_END), -float(d), r.depth == 2)
                 for d in range(3)] for r in reqs]

    def value(reqs):
        return [math.cos(sum(r.completion)) for r in reqs]

    return search([(7, 8)], expand, value, value, SearchSettings(simulations=20, parallel=2)).trees[0]


class Checker(HTMLParser):
    """Collects tags and checks <details> nesting."""

    def __init__(self):
        super().__init__()
        self.depth, self.tags, self.pv_open = 0, [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "details":
            self.depth += 1
            if attrs.get("class") == "pv" and "open" in attrs:
                self.pv_open += 1

    def handle_endtag(self, tag):
        if tag == "details":
            self.depth -= 1
            assert self.depth >= 0


def test_tree_page_is_self_contained_and_complete(tmp_path):
    tree = searched_tree()
    page = tree_to_html(tree, decode, "a <title>")
    (tmp_path / "tree.html").write_text(page, encoding="utf-8")
    low = page.lower()
    assert "<script" not in low and "<link" not in low and "src=" not in low and "http" not in low
    checker = Checker()
    checker.feed(page)
    assert checker.depth == 0 and "summary" in checker.tags
    # every node once with its statistics
    assert page.count("N=") == len(tree)
    # model text is escaped, never markup
    assert "&lt;step&gt;a" in page and "b &amp; c" in page and "<step>" not in page
    assert "<title>a &lt;title&gt;</title>" in page
    # the principal variation is open and highlighted down to its leaf
    pv = extract(tree).nodes
    assert checker.pv_open == len(pv) - 1 and page.count('class="leaf pv"') == 1
    assert "terminal reward=" in page


def test_custom_principal_variation_is_highlighted():
    tree = searched_tree()
    other = tree.children[0][-1]  # a root child off the default path
    page = tree_to_html(tree, decode, "t", pv=[0, other])
    assert page.count('<details class="pv" open>') + page.count('class="leaf pv"') == 2
