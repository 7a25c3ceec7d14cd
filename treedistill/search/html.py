"""A searched tree as one self-contained HTML page: nested <details> (no script, no network).

Each node shows its step text, N, Q, P and, when terminal, its reward; children are listed by
visits; the principal variation is highlighted and open, everything else starts collapsed.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from treedistill.search.extract import principal_variation
from treedistill.search.tree import ROOT, Tree

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
pre { white-space: pre-wrap; background: #f4f4f4; padding: .6em; border-radius: 4px; }
details { margin-left: 1.2em; border-left: 1px solid #ccc; padding-left: .4em; }
summary, .leaf { cursor: pointer; padding: 1px 0; margin-left: 1.2em; }
.step { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #f7f7f7; }
.num { color: #555; font-size: 90%; margin-left: .6em; }
.pv > summary, .leaf.pv { background: #fff3c4; font-weight: 600; }
.term { color: #0a6; } .term.bad { color: #b22; }
.unvisited { color: #999; }
"""


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _label(tree: Tree, node: int, decode: Callable[[tuple[int, ...]], str]) -> str:
    text = "(prompt)" if node == ROOT else decode(tree.tokens[node])
    parts = [f'<span class="step">{html.escape(text)}</span>',
             f'<span class="num">N={tree.visits[node]} Q={_fmt(tree.q(node))} P={tree.prior[node]:.3f}'
             + (f" x{tree.count[node]}" if tree.count[node] > 1 else "") + "</span>"]
    if tree.terminal[node]:
        r = tree.value[node]
        bad = " bad" if r is not None and r <= 0 else ""
        parts.append(f'<span class="term{bad}">terminal reward={_fmt(r)}</span>')
    elif not tree.expanded[node] and tree.value[node] is not None:
        parts.append(f'<span class="num">leaf value={_fmt(tree.value[node])}</span>')
    return " ".join(parts)


def tree_to_html(
    tree: Tree,
    decode: Callable[[tuple[int, ...]], str],
    title: str = "search tree",
    *,
    pv: Sequence[int] | None = None,
) -> str:
    """The page for `tree`; `decode` turns a step's token ids into text; `pv` (node ids from the
    root) is highlighted, by default the most-visited path."""
    if pv is None:
        pv = principal_variation(tree)
    on_pv = set(pv)
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(tree)} nodes, {tree.visits[ROOT]} root visits, root Q {_fmt(tree.q(ROOT))}; "
        "highlighted: the principal variation.</p>",
        f"<pre>{html.escape(decode(tree.prompt))}</pre>",
    ]
    # Iterative depth-first walk: ("open", node) writes a node, ("close", _) ends its <details>.
    stack: list[tuple[str, int]] = [("open", ROOT)]
    while stack:
        kind, node = stack.pop()
        if kind == "close":
            out.append("</details>")
            continue
        cls = ' class="pv"' if node in on_pv else ""
        children = sorted(tree.children[node], key=lambda c: (-tree.visits[c], c))
        if not children:
            leaf_cls = "leaf pv" if node in on_pv else ("leaf unvisited" if tree.visits[node] == 0 else "leaf")
            out.append(f'<div class="{leaf_cls}">{_label(tree, node, decode)}</div>')
            continue
        is_open = " open" if node in on_pv else ""
        out.append(f"<details{cls}{is_open}><summary>{_label(tree, node, decode)}</summary>")
        stack.append(("close", node))
        stack.extend(("open", c) for c in reversed(children))
    out.append("</body></html>")
    return "\n".join(out)
