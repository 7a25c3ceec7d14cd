"""Monte-Carlo tree search over reasoning steps: a pure core that imports neither torch nor
transformers. The model enters only through the callables handed to `search`."""

from treedistill.search.contracts import (
    Candidate,
    LeafRollout,
    NodeRequest,
    SearchSettings,
    SearchStats,
    TreeStats,
)
from treedistill.search.extract import (
    ROOT_CHOICE,
    ChildStats,
    Extraction,
    child_stats,
    extract,
    most_visited,
    pick_tree,
    principal_variation,
)
from treedistill.search.html import tree_to_html
from treedistill.search.mcts import PRIOR_LOGITS, SearchResult, search
from treedistill.search.select import SELECT_RULES, gumbel_action, puct_score, uct_score
from treedistill.search.tree import ROOT, Tree

__all__ = [
    "PRIOR_LOGITS",
    "ROOT",
    "ROOT_CHOICE",
    "SELECT_RULES",
    "Candidate",
    "ChildStats",
    "Extraction",
    "LeafRollout",
    "NodeRequest",
    "SearchSettings",
    "SearchResult",
    "SearchStats",
    "Tree",
    "TreeStats",
    "child_stats",
    "extract",
    "gumbel_action",
    "most_visited",
    "pick_tree",
    "principal_variation",
    "puct_score",
    "search",
    "tree_to_html",
    "uct_score",
]
