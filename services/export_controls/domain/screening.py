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
    # Multi-word legal forms ("private limited", "s a", "gmbh and co kg"), written as they read
    # after normalisation, dropped from the end of a name like the one-word suffixes above.
    legal_phrases: list[str] = []
    # Legal forms of scripts written without spaces (Han, Hangul: "股份有限公司", "주식회사"), dropped
    # as a prefix or suffix of the name whether or not a space separates them.
    cjk_legal_forms: list[str] = []
    # Below the threshold but at or above this score, a match is a near miss a human must look at
    # (a SCREENING_REVIEW anomaly) rather than a silent clear.
    review_threshold: Annotated[float, Field(ge=0, le=100)] = 100
    # A name that contains every word of a listed name or alias ("Huawei Technologies Korea",
    # "Huawei Cloud Korea" for alias "Huawei") scores 100: similarity scorers under-rate such
    # subsidiary-style names, and they are exactly the ones a screener must not miss.
    entry_containment: bool = True


class ScreeningEntry(_Data):
    id: str
    name: str
    aliases: list[str] = []
    # None: the list gives no country code (an imported CSL record without an address country).
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    list: str
    real: bool = False
    reason: str
    addresses: list[str] = []
    # When the party was listed and delisted (end_date: no longer listed from that day on);
    # None = date unknown, screened as listed (the cautious reading).
    start_date: date | None = None
    end_date: date | None = None
    federal_register_notice: str | None = None

    def listed_on(self, on: date) -> bool:
        return (self.start_date is None or self.start_date <= on) and (self.end_date is None or on < self.end_date)


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
    country: str | None
    reason: str
    real: bool
    start_date: date | None = None
    end_date: date | None = None
    federal_register_notice: str | None = None


class PartyScreening(_Data):
    """Evidence for one party: the best match is kept even below the threshold (near misses)."""

    role: Literal["consignee", "end_user"]
    name: str
    normalised_name: str
    best_score: float
    method: Literal["fuzzy", "contains_listed_name", "address", "none"]
    matched_entry: MatchedEntry | None
    hit: bool
    threshold: float
    scorer: str
    # A near miss (score in [review_threshold, threshold)) or an address match: for a human.
    review: bool = False
    review_threshold: float = 100
    screened_on: date | None = None


def load_screening_list(path: Path = SCREENING_LIST_PATH) -> ScreeningList:
    data, digest = read_yaml(path)
    return ScreeningList.model_validate({**data, "sha256": digest})


_PUNCT = re.compile(r"[^\w\s]+")


def _fold(text: str) -> str:
    """Case and accents folded; NFKD splits "é" and turns "㈜" into "(주)", NFC then recomposes
    Hangul syllables so the stored normalised names stay readable."""
    text = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(ch for ch in text if not unicodedata.combining(ch))).casefold()


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
        # Longest first, so "private limited" goes before "limited" and "股份有限公司" before "有限公司".
        self._phrases = sorted((p.casefold().split() for p in self.list.matching.legal_phrases), key=len, reverse=True)
        self._cjk = sorted((_fold(f) for f in self.list.matching.cjk_legal_forms), key=len, reverse=True)
        self.review_threshold = min(self.list.matching.review_threshold, self.threshold)
        self._containment = self.list.matching.entry_containment
        # Pre-normalise every name and alias once.
        self._index = [
            (entry, candidate, self.normalise(candidate))
            for entry in self.list.entries
            for candidate in (entry.name, *entry.aliases)
        ]
        self._addresses = [(entry, a, self._address_key(a)) for entry in self.list.entries for a in entry.addresses]

    def normalise(self, name: str) -> str:
        text = _PUNCT.sub(" ", _fold(name).replace("&", " and "))
        tokens = [t for t in _SPACE.sub(" ", text).strip().split(" ") if t]
        changed = True
        while changed and len(tokens) > 1:
            # Phrases first: "private limited" must go whole, not "limited" then a stray "private".
            changed = False
            for phrase in self._phrases:
                if len(tokens) > len(phrase) and tokens[-len(phrase) :] == phrase:
                    del tokens[-len(phrase) :]
                    changed = True
                    break
            if not changed and tokens[-1] in self._suffixes:
                tokens.pop()
                changed = True
        return " ".join(self._strip_cjk(tokens))

    def _strip_cjk(self, tokens: list[str]) -> list[str]:
        # "(주)삼성전자" arrives as ["주", "삼성전자"]; "삼성전자주식회사" and "华为技术有限公司" as one token.
        if len(tokens) > 1 and tokens[0] in ("주", "株"):
            tokens = tokens[1:]
        for i in (0, -1):
            if not tokens:
                break
            for form in self._cjk:
                tok = tokens[i]
                if len(tokens) > 1 and tok == form:
                    tokens = tokens[1:] if i == 0 else tokens[:-1]
                    break
                if len(tok) > len(form) and (tok.startswith(form) if i == 0 else tok.endswith(form)):
                    tokens[i] = tok[len(form) :] if i == 0 else tok[: -len(form)]
                    break
        return tokens

    def _address_key(self, address: str) -> str:
        return _SPACE.sub(" ", _PUNCT.sub(" ", _fold(address))).strip()

    def _score(
        self, query: str, query_tokens: set[str], candidate: str
    ) -> tuple[float, Literal["fuzzy", "contains_listed_name"]]:
        if self._containment and candidate and set(candidate.split(" ")) <= query_tokens:
            return 100.0, "contains_listed_name"
        return float(self._scorer(query, candidate)), "fuzzy"

    def screen(
        self,
        name: str,
        role: Literal["consignee", "end_user"],
        on: date | None = None,
        address: str | None = None,
    ) -> PartyScreening:
        """Screen one party against the entries listed on `on` (every entry when None): a party
        listed after that date, or delisted on or before it, is not screened against."""
        query = self.normalise(name)
        tokens = set(query.split(" "))
        best: tuple[float, Literal["fuzzy", "contains_listed_name", "address"], ScreeningEntry, str] | None = None
        for entry, candidate, normalised in self._index:
            if on is not None and not entry.listed_on(on):
                continue
            score, method = self._score(query, tokens, normalised)
            if best is None or score > best[0]:
                best = (score, method, entry, candidate)
        address_review = False
        if address and (best is None or round(best[0], 2) < self.threshold):
            # A party at a listed party's address is not thereby that party: a match on the address
            # alone goes to a human (review), never to a hit.
            key = self._address_key(address)
            for entry, listed, listed_key in self._addresses:
                if on is not None and not entry.listed_on(on):
                    continue
                if float(fuzz.token_sort_ratio(key, listed_key)) >= self.threshold:
                    best = (float(fuzz.token_sort_ratio(key, listed_key)), "address", entry, listed)
                    address_review = True
                    break
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
                review_threshold=self.review_threshold,
                screened_on=on,
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
                start_date=entry.start_date,
                end_date=entry.end_date,
                federal_register_notice=entry.federal_register_notice,
            ),
            hit=not address_review and score >= self.threshold,
            threshold=self.threshold,
            scorer=self.scorer_name,
            review=address_review or self.review_threshold <= score < self.threshold,
            review_threshold=self.review_threshold,
            screened_on=on,
        )


@cache
def default_screening_list() -> ScreeningList:
    return load_screening_list()


@cache
def default_screener() -> Screener:
    return Screener(default_screening_list())
