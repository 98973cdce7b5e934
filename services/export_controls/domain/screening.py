"""Restricted-party screening of consignee and end user against a dated list snapshot."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import date
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz import fuzz

from ._data import DATA_DIR, read_yaml

SCREENING_LIST_PATH = DATA_DIR / "screening_list.yaml"

Scorer = Literal["token_sort_ratio", "token_set_ratio", "WRatio", "ratio"]
_SCORERS: dict[str, Callable[..., float]] = {
    "token_sort_ratio": fuzz.token_sort_ratio,
    "token_set_ratio": fuzz.token_set_ratio,
    "WRatio": fuzz.WRatio,
    "ratio": fuzz.ratio,
}


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MatchingConfig(_Data):
    scorer: Scorer
    threshold: Annotated[float, Field(ge=0, le=100)]
    legal_suffixes: list[str]
    # A name that contains every word of a listed name or alias ("Huawei Technologies Korea",
    # "Huawei Cloud Korea" for alias "Huawei") scores 100: similarity scorers under-rate such
    # subsidiary-style names, and they are exactly the ones a screener must not miss.
    entry_containment: bool = True


class ScreeningEntry(_Data):
    id: str
    name: str
    aliases: list[str] = []
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
    list: str
    real: bool = False
    reason: str


class ScreeningList(_Data):
    snapshot_date: date
    source: str
    matching: MatchingConfig
    entries: list[ScreeningEntry]
    sha256: str = ""


class MatchedEntry(_Data):
    id: str
    name: str
    matched_name: str  # the name or alias that scored best
    list: str
    country: str
    reason: str
    real: bool


class PartyScreening(_Data):
    """Evidence for one party: the best match is kept even below the threshold (near misses)."""

    role: Literal["consignee", "end_user"]
    name: str
    normalised_name: str
    best_score: float
    method: Literal["fuzzy", "contains_listed_name", "none"]
    matched_entry: MatchedEntry | None
    hit: bool
    threshold: float
    scorer: str


def load_screening_list(path: Path = SCREENING_LIST_PATH) -> ScreeningList:
    data, digest = read_yaml(path)
    return ScreeningList.model_validate({**data, "sha256": digest})


_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


class Screener:
    """Fuzzy name matcher over one list snapshot.

    Normalisation folds case and accents, turns punctuation into spaces ("Co.,Ltd." and
    "Co Ltd" compare equal) and drops *trailing* legal-form words only, so "Huawei
    Technologies Co., Ltd." and "HUAWEI TECHNOLOGIES LIMITED" both become "huawei
    technologies", while a word like "Co" inside a name is kept.
    """

    def __init__(self, screening_list: ScreeningList | None = None, *, threshold: float | None = None) -> None:
        self.list = screening_list or default_screening_list()
        self.threshold = self.list.matching.threshold if threshold is None else threshold
        self.scorer_name = self.list.matching.scorer
        self._scorer = _SCORERS[self.scorer_name]
        self._suffixes = frozenset(s.casefold() for s in self.list.matching.legal_suffixes)
        self._containment = self.list.matching.entry_containment
        # Pre-normalise every name and alias once.
        self._index = [
            (entry, candidate, self.normalise(candidate))
            for entry in self.list.entries
            for candidate in (entry.name, *entry.aliases)
        ]

    def normalise(self, name: str) -> str:
        text = unicodedata.normalize("NFKD", name)
        text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
        text = _PUNCT.sub(" ", text.replace("&", " and "))
        tokens = _SPACE.sub(" ", text).strip().split(" ")
        while len(tokens) > 1 and tokens[-1] in self._suffixes:
            tokens.pop()
        return " ".join(t for t in tokens if t)

    def _score(
        self, query: str, query_tokens: set[str], candidate: str
    ) -> tuple[float, Literal["fuzzy", "contains_listed_name"]]:
        if self._containment and candidate and set(candidate.split(" ")) <= query_tokens:
            return 100.0, "contains_listed_name"
        return float(self._scorer(query, candidate)), "fuzzy"

    def screen(self, name: str, role: Literal["consignee", "end_user"]) -> PartyScreening:
        query = self.normalise(name)
        tokens = set(query.split(" "))
        best: tuple[float, Literal["fuzzy", "contains_listed_name"], ScreeningEntry, str] | None = None
        for entry, candidate, normalised in self._index:
            score, method = self._score(query, tokens, normalised)
            if best is None or score > best[0]:
                best = (score, method, entry, candidate)
        if best is None:
            return PartyScreening(
                role=role,
                name=name,
                normalised_name=query,
                best_score=0.0,
                method="none",
                matched_entry=None,
                hit=False,
                threshold=self.threshold,
                scorer=self.scorer_name,
            )
        score, method, entry, candidate = best
        # Round before comparing so the recorded score and the hit flag can never disagree.
        score = round(score, 2)
        return PartyScreening(
            role=role,
            name=name,
            normalised_name=query,
            best_score=score,
            method=method,
            matched_entry=MatchedEntry(
                id=entry.id,
                name=entry.name,
                matched_name=candidate,
                list=entry.list,
                country=entry.country,
                reason=entry.reason,
                real=entry.real,
            ),
            hit=score >= self.threshold,
            threshold=self.threshold,
            scorer=self.scorer_name,
        )


@cache
def default_screening_list() -> ScreeningList:
    return load_screening_list()


@cache
def default_screener() -> Screener:
    return Screener(default_screening_list())
