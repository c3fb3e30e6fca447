"""Text sources and token windows: markup stripping, non-overlap, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import SAMPLE_TEXT, make_tiny_tokenizer

from sqz_export.data import load_windows, strip_wiki_markup, wiki_articles
from sqz_export.errors import UserError


def test_strip_wiki_markup_keeps_prose_and_link_text() -> None:
    source = (
        "{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy]] and [[Movement (x)|movement]].<ref>cite</ref>\n"
        "== History ==\n[[File:A.jpg|thumb|caption [[link]]]]\n* item one\n{| class=wikitable\n| cell\n|}\n"
        "See [http://example.org the site] &amp; more.<!-- hidden -->"
    )
    text = strip_wiki_markup(source)
    assert "Anarchism is a political philosophy and movement." in text
    assert "History" in text and "item one" in text and "the site & more." in text
    for junk in ("{{", "[[", "<ref", "cite", "File:", "cell", "hidden", "'''"):
        assert junk not in text


def test_wiki_articles_skips_redirects_and_other_namespaces() -> None:
    body = "Real prose. " * 30
    xml = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>A</title><ns>0</ns><revision><text>{body}</text></revision></page>
      <page><title>B</title><ns>0</ns><redirect title="A"/><revision><text>#REDIRECT [[A]] {body}</text></revision></page>
      <page><title>Talk:A</title><ns>1</ns><revision><text>{body}</text></revision></page>
    </mediawiki>"""
    articles = wiki_articles(xml.encode())
    assert len(articles) == 1 and articles[0].startswith("A\n\nReal prose.")


def test_calibration_from_start_and_evaluation_from_end_never_overlap(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT)
    tokenizer = make_tiny_tokenizer()
    windows = load_windows(tokenizer, str(path), calibration=(4, 64), evaluation=(3, 64))
    calibration, evaluation = windows["calibration"], windows["evaluation"]
    assert calibration.tokens.shape == (4, 64) and evaluation.tokens.shape == (3, 64)
    assert calibration.first_token == 0
    assert evaluation.first_token + evaluation.num_tokens == evaluation.stream_tokens
    assert calibration.num_tokens <= evaluation.first_token
    stream = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    assert evaluation.tokens.flatten().tolist() == stream[-3 * 64 :]


def test_requests_larger_than_the_text_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT)
    with pytest.raises(UserError, match=r"text.txt has 7760 tokens but 12800 are needed \(calibration 100 windows x 64 tokens \+ evaluation 100 windows x 64 tokens"):
        load_windows(make_tiny_tokenizer(), str(path), calibration=(100, 64), evaluation=(100, 64))


def test_jsonl_needs_a_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "wrong"}\n')
    with pytest.raises(UserError, match=r"data.jsonl:2: expected an object with a string field 'text'"):
        load_windows(make_tiny_tokenizer(), str(path), calibration=(1, 2))


def test_unknown_dataset_names_the_choices() -> None:
    with pytest.raises(UserError, match="unknown dataset 'nonsense'; expected 'wikipedia', 'news', 'wikitext2', 'c4', or a .txt/.jsonl file"):
        load_windows(make_tiny_tokenizer(), "nonsense", calibration=(1, 8))
