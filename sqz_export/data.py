"""Calibration and evaluation text.

Sources:
  * ``wikipedia`` (default, offline): the English Wikipedia dump sample shipped in the gensim 4.4.0
    wheel, fetched with ``pip download --no-deps`` (the wheel is never installed or imported), wiki
    markup stripped, cached as plain text.
  * ``news`` (offline): the Lee background corpus from the same wheel, 300 news articles of the
    Australian Broadcasting Corporation (Lee, Pincombe & Welsh, 2005), one per line: a second English
    text of another domain and style, to check that quality gains measured on Wikipedia carry over.
  * ``wikitext2`` / ``c4``: through the ``datasets`` package when online (calibration from the train
    split, evaluation from the test/validation split, as GPTQ and SqueezeLLM do).
  * a local ``.txt`` or ``.jsonl`` (field ``text``) file.

For single-stream sources (wikipedia, local files) calibration comes from the start of the token
stream and evaluation from its end; the two never overlap, and that is checked.
"""

from __future__ import annotations

import bz2
import dataclasses
import html
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import torch

from sqz_export import atomic
from sqz_export.defaults import DEFAULT_DATASET
from sqz_export.errors import UserError

logger = logging.getLogger(__name__)

GENSIM_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
OFFLINE_DATASETS = (DEFAULT_DATASET, "news")
ONLINE_DATASETS = ("wikitext2", "c4")


def cache_dir() -> Path:
    root = Path(os.environ.get("SQZ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sqz-export")
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------------------------------------
# Wikipedia sample
# ---------------------------------------------------------------------------------------------

_NESTED_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.IGNORECASE)
_LINK = re.compile(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki source: templates, tables, refs, files and markup removed, links kept as text."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    previous = None
    while previous != text:  # templates nest: peel the innermost ones until none are left
        previous = text
        text = _NESTED_TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = html.unescape(text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST_MARK.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if not line.startswith(("{", "|", "!")))
    return _BLANKS.sub("\n\n", text).strip()


def wiki_articles(xml_bytes: bytes) -> list[str]:
    """Main-namespace, non-redirect articles of a MediaWiki XML export, markup stripped, in file order."""
    root = ET.fromstring(xml_bytes)
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{namespace}page"):
        if page.findtext(f"{namespace}ns") != "0" or page.find(f"{namespace}redirect") is not None:
            continue
        source = page.findtext(f"{namespace}revision/{namespace}text") or ""
        body = strip_wiki_markup(source)
        if len(body) > 200:
            title = page.findtext(f"{namespace}title") or ""
            articles.append(f"{title}\n\n{body}")
    return articles


def _gensim_wheel_member(member: str, cache_name: str, override_env: str) -> bytes:
    """One file of the gensim wheel (pip download, no install); cached, or read from ``$override_env``."""
    target = cache_dir() / cache_name
    override = os.environ.get(override_env)
    if override:
        return Path(override).read_bytes()
    if target.is_file():
        return target.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching %s: pip download --no-deps %s", member.rsplit("/", 1)[-1], GENSIM_WHEEL)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, GENSIM_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UserError(
                f"could not download {GENSIM_WHEEL} for the offline text {member.rsplit('/', 1)[-1]} (pip said: "
                f"{result.stderr.strip()[-300:]}); set {override_env} to a local copy of it or pass --dataset FILE.txt"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(member)
    atomic.write_bytes(target, data)
    return data


def wikipedia_text() -> str:
    """The stripped Wikipedia sample as one string (articles separated by blank lines); cached."""
    cached = cache_dir() / "enwiki-sample.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = "\n\n".join(wiki_articles(bz2.decompress(_gensim_wheel_member(WIKI_MEMBER, "enwiki-sample.xml.bz2", "SQZ_WIKI_BZ2"))))
    atomic.write_text(cached, text)
    return text


def news_text() -> str:
    """The Lee background corpus (300 ABC news articles) with articles separated by blank lines."""
    raw = _gensim_wheel_member(NEWS_MEMBER, "lee_background.cor", "SQZ_NEWS_TEXT").decode("utf-8")
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenWindows:
    """Non-overlapping windows of one token stream, with where they came from (recorded in checkpoints)."""

    tokens: torch.Tensor  # int64 [num_windows, seq_len]
    dataset: str
    split: str
    first_token: int
    """Offset of the first window's first token in the source stream."""
    stream_tokens: int
    """Length of the whole source stream."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def describe(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_windows": int(self.tokens.shape[0]),
            "seq_len": int(self.tokens.shape[1]),
            "num_tokens": self.num_tokens,
            "first_token": self.first_token,
            "stream_tokens": self.stream_tokens,
        }


def _decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; a UserError naming the line and byte where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "expected a UTF-8 .txt file or .jsonl file with one JSON object per line"
        ) from exc


def _local_text(path: Path) -> str:
    if path.is_dir():
        raise UserError(f"dataset {path} is a folder; expected a .txt or .jsonl file")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"dataset file {path} must end in .txt or .jsonl")
    text = _decode_utf8(path.read_bytes(), str(path))
    if "\x00" in text:
        raise UserError(f"{path}: holds NUL bytes, so it is binary data, not text; expected a UTF-8 .txt or .jsonl file")
    if path.suffix == ".txt":
        return text
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _online_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"--dataset {name} needs the 'datasets' package (pip install 'sqz-export[datasets]') and internet; the offline default is 'wikipedia'") from exc
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test")
            return "\n\n".join(rows["text"])
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "calibration" else "en/c4-validation.00000-of-00008.json.gz"
        rows = datasets.load_dataset("allenai/c4", data_files={"data": shard}, split="data")
        return "\n\n".join(rows.select(range(min(len(rows), 20000)))["text"])
    except Exception as exc:  # datasets raises many types when offline
        raise UserError(f"could not load dataset {name!r} ({type(exc).__name__}: {exc}); offline, use --dataset wikipedia or a local file") from exc


def _tokenize(tokenizer: object, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: torch.Tensor, start: int, num_windows: int, seq_len: int) -> torch.Tensor:
    return stream[start : start + num_windows * seq_len].view(num_windows, seq_len)


def load_windows(
    tokenizer: object,
    dataset: str = DEFAULT_DATASET,
    *,
    calibration: tuple[int, int] | None = None,
    evaluation: tuple[int, int] | None = None,
) -> dict[str, TokenWindows]:
    """Token windows for calibration and/or evaluation.

    Args:
        tokenizer: a Hugging Face tokenizer.
        dataset: ``wikipedia``, ``wikitext2``, ``c4``, or a path to a .txt/.jsonl file.
        calibration: (num_windows, seq_len) taken from the start of the stream (train split online).
        evaluation: (num_windows, seq_len) taken from the end of the stream (test split online).

    Returns:
        ``{"calibration": ..., "evaluation": ...}`` for the parts asked for.

    Raises:
        UserError: the source is unknown, too short for the request, or the two parts would overlap.
    """
    parts = {name: shape for name, shape in (("calibration", calibration), ("evaluation", evaluation)) if shape}
    for name, (num, seq) in parts.items():
        if num <= 0 or seq <= 1:
            raise UserError(f"{name} needs at least 1 window of at least 2 tokens, got {num} x {seq}")
    result: dict[str, TokenWindows] = {}
    if dataset in ONLINE_DATASETS:
        for name, (num, seq) in parts.items():
            stream = _tokenize(tokenizer, _online_text(dataset, name))
            if stream.numel() < num * seq:
                raise UserError(f"{dataset} {name} split has {stream.numel()} tokens, {num} x {seq} = {num * seq} requested")
            start = 0 if name == "calibration" else stream.numel() - num * seq
            result[name] = TokenWindows(_windows(stream, start, num, seq), dataset, name, start, int(stream.numel()))
        return result

    if dataset == DEFAULT_DATASET:
        text = wikipedia_text()
    elif dataset == "news":
        text = news_text()
    elif Path(dataset).suffix in (".txt", ".jsonl") or Path(dataset).exists():
        text = _local_text(Path(dataset))
    else:
        raise UserError(f"unknown dataset {dataset!r}; expected 'wikipedia', 'news', 'wikitext2', 'c4', or a .txt/.jsonl file")
    stream = _tokenize(tokenizer, text)
    total = int(stream.numel())
    calib_end = parts["calibration"][0] * parts["calibration"][1] if "calibration" in parts else 0
    eval_len = parts["evaluation"][0] * parts["evaluation"][1] if "evaluation" in parts else 0
    if calib_end + eval_len > total:
        asked = " + ".join(f"{name} {num} windows x {seq} tokens" for name, (num, seq) in parts.items())
        raise UserError(
            f"dataset {dataset} has {total} tokens but {calib_end + eval_len} are needed ({asked}; "
            "calibration from the start and evaluation from the end, never overlapping); use a longer text, "
            "or fewer or shorter windows (--calib-windows, --eval-windows, --seq-len)"
        )
    if "calibration" in parts:
        num, seq = parts["calibration"]
        result["calibration"] = TokenWindows(_windows(stream, 0, num, seq), dataset, "start", 0, total)
    if "evaluation" in parts:
        num, seq = parts["evaluation"]
        result["evaluation"] = TokenWindows(_windows(stream, total - eval_len, num, seq), dataset, "end", total - eval_len, total)
    return result
