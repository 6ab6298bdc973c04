"""String pieces several tasks' metrics share: whitespace, SQuAD's answer normalisation, edit distance.

Each metric module says which of these its reference applies, and in what order; nothing here is a metric by itself.
"""

import re
import string


def collapse_whitespace(text: str) -> str:
    """Single spaces between words, none around them (`split()` semantics: tabs and newlines count as spaces)."""
    return " ".join(text.split())


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's `normalize_answer`: lower case, ASCII punctuation removed, articles removed, single spaces
    (in that order, as the official evaluation script applies them)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return collapse_whitespace(_SQUAD_ARTICLES.sub(" ", text))


def levenshtein(first: str, second: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char in enumerate(first, start=1):
        current = [i]
        for j, other in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]
