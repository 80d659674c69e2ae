"""Text corpora for calibration and evaluation.

The standard corpus is ``wikipedia``: about a hundred English Wikipedia articles from a MediaWiki
dump shipped in the gensim wheel, stripped of markup (``modelfold.assets.pull`` builds it with
:func:`build_wikipedia_corpus`). Articles are split deterministically: in dump order every fifth
article goes to the evaluation split, the rest to calibration, so the two never overlap.

On disk each split is one UTF-8 file; articles are separated by a blank line, each starts with
its title line, and every following line is one paragraph of prose.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfold.assets import AssetError, asset_path, atomic_output, is_installed
from modelfold.errors import OptionError

if TYPE_CHECKING:
    import torch

SPLITS = ("calibration", "evaluation")
_SPLIT_ALIASES = {
    "calibration": "calibration",
    "calib": "calibration",
    "train": "calibration",
    "evaluation": "evaluation",
    "eval": "evaluation",
}
EVAL_EVERY = 5  # article i goes to evaluation when i % EVAL_EVERY == EVAL_EVERY - 1

# --------------------------------------------------------------------------------------------
# Reading a built corpus
# --------------------------------------------------------------------------------------------


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except (KeyError, TypeError):
        raise OptionError(
            f"split={split!r} is not a corpus split; use 'calibration' (alias 'calib', 'train') "
            "or 'evaluation' (alias 'eval')"
        ) from None


def check_corpus_option(name: str, where: str) -> None:
    """Raise ``OptionError`` unless ``name`` is ``"random"`` or a known corpus (``where``: the
    option, for the message)."""
    if name == "random":
        return
    try:
        asset_path(name, kind="corpus")
    except KeyError:
        raise OptionError(f"{where} must be 'random' or a known corpus ('wikipedia'); got "
                          f"{name!r}") from None


def corpus_dir(name: str = "wikipedia") -> Path:
    """Return the installed directory of corpus ``name``.

    Raises:
        ValueError: ``name`` is not a known corpus.
        AssetError: the corpus has not been pulled yet.
    """
    try:
        path = asset_path(name, kind="corpus")
    except KeyError:
        raise OptionError(f"corpus={name!r} is not a known corpus (known: 'wikipedia')") from None
    if not is_installed(name):
        raise AssetError(f"corpus {name!r} is not installed; run `modelfold assets pull {name}`")
    return path


def corpus_text(name: str = "wikipedia", split: str = "evaluation") -> str:
    """Return the full text of one split of an installed corpus.

    Args:
        name: corpus name (``"wikipedia"``).
        split: ``"calibration"`` (aliases ``"calib"``, ``"train"``) or ``"evaluation"``
            (alias ``"eval"``).
    """
    split = _canonical_split(split)
    return (corpus_dir(name) / f"{split}.txt").read_text(encoding="utf-8")


def corpus_articles(name: str = "wikipedia", split: str = "evaluation") -> list[tuple[str, str]]:
    """Return ``(title, body)`` pairs of one split, in dump order."""
    text = corpus_text(name, split)
    articles = []
    for block in text.split("\n\n"):
        title, _, body = block.strip("\n").partition("\n")
        if title:
            articles.append((title, body))
    return articles


# --------------------------------------------------------------------------------------------
# Tokenized windows
# --------------------------------------------------------------------------------------------


def tokenize_text(tokenizer: Any, text: str) -> torch.LongTensor:
    """Tokenize ``text`` without special tokens into a 1-D LongTensor.

    The text is encoded in one call with ``verbose=False``: splitting it into chunks would change
    the tokens at chunk boundaries (BPE pre-tokenizers merge runs of newlines), and the length
    warning is meaningless for a corpus that is cut into windows afterwards.
    """
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash that changes whenever the tokenizer would map text to different ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps(vocab).encode())
    return digest.hexdigest()[:16]


def corpus_token_ids(
    tokenizer: Any, *, corpus: str = "wikipedia", split: str = "calibration"
) -> torch.LongTensor:
    """Token ids of a whole corpus split, cached on disk per tokenizer and corpus text.

    The cache file lives next to the corpus and is keyed by a hash of the tokenizer's full
    definition (vocabulary, merges, normalizer) and of the split's text, so a different tokenizer
    or a rebuilt corpus never reuses stale ids.
    """
    import numpy as np
    import torch

    split = _canonical_split(split)
    directory = corpus_dir(corpus)
    text_bytes = (directory / f"{split}.txt").read_bytes()
    text_hash = hashlib.sha256(text_bytes).hexdigest()[:12]
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40] or "tokenizer"
    fingerprint = _tokenizer_fingerprint(tokenizer)
    cache = directory / f"tokens-{split}-{slug}-{fingerprint}-{text_hash}.npy"
    if cache.exists():
        return torch.from_numpy(np.load(cache).astype(np.int64))
    ids = tokenize_text(tokenizer, text_bytes.decode("utf-8"))
    # np.save on a path would append ".npy" to the temporary name; give it a file object.
    with atomic_output(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, ids.numpy().astype(np.int32))
    return ids


def calibration_batches(
    tokenizer: Any,
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    corpus: str = "wikipedia",
) -> torch.LongTensor:
    """Random token windows from the calibration split.

    Each row is ``[bos] + seq_len - 1`` consecutive corpus tokens when the tokenizer has a BOS
    token, else ``seq_len`` consecutive tokens. Window starts are drawn uniformly with a
    ``torch.Generator`` seeded by ``seed``, so the same arguments give the same batch.

    Returns:
        LongTensor ``[n_samples, seq_len]``.

    Raises:
        TypeError: ``n_samples``, ``seq_len`` or ``seed`` is not an int.
        ValueError: an option is out of range, or the corpus is shorter than one window.
        AssetError: the corpus has not been pulled.
    """
    import torch

    for option, value in (("n_samples", n_samples), ("seq_len", seq_len), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise OptionError(f"{option} must be an int, got {value!r}")
    if n_samples < 1:
        raise OptionError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < 2:
        raise OptionError(f"seq_len must be >= 2, got {seq_len}")

    ids = corpus_token_ids(tokenizer, corpus=corpus, split="calibration")  # [N]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    if ids.numel() < body:
        raise OptionError(
            f"seq_len={seq_len} is longer than the {corpus!r} calibration split "
            f"({ids.numel()} tokens with this tokenizer)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (n_samples,), generator=generator)  # [S]
    windows = ids[starts[:, None] + torch.arange(body)]  # [S, body]
    if bos is not None:
        windows = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows  # [S, seq_len]


# --------------------------------------------------------------------------------------------
# Building the Wikipedia corpus from a MediaWiki dump
# --------------------------------------------------------------------------------------------

# Sections that hold references and link lists, not prose.
_BOILERPLATE_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "works cited", "primary sources", "secondary sources", "gallery", "links",
}  # fmt: skip
# Tags whose contents are not running text (footnotes, tables, formulas, media).
_DROPPED_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "imagemap", "timeline",
    "score", "graph", "syntaxhighlight", "source", "pre", "hiero", "templatedata", "categorytree",
}  # fmt: skip
_MEDIA_NAMESPACES = {"file", "image", "media", "category"}
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$|^simple$")
_SKIP = "\x00"  # marks a line that is a heading or a list item, dropped after rendering
_PROSE_END = tuple(".!?:\"'”’)")
# Markup mwparserfromhell leaves as text where the wikitext is malformed (an unclosed <ref>).
_LEFTOVER_MARKUP = re.compile(
    r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<ref[^>]*>.*$|\{\{[^{}]*\}\}"
    r"|</?(?:ref|references|span|div|small|big|sup|sub|br|center|blockquote|nowiki|font|abbr|cite"
    r"|poem|u|s|i|b)\b[^<>]*>",
    re.IGNORECASE,
)


def _text_param(template: Any, index: int) -> str:
    """Rendered positional parameter ``index`` (1-based) of a template, or ''."""
    key = str(index)
    return _render(template.get(key).value).strip() if template.has(key) else ""


def _render_template(template: Any) -> str:
    """The prose a few common inline templates display; every other template renders as ''."""
    name = str(template.name).strip().lower().replace("_", " ")
    if name in ("convert", "cvt"):
        first, unit = _text_param(template, 1), _text_param(template, 2)
        if unit in ("-", "–", "to", "and", "or", "by", "x", "×", "to(-)"):
            return f"{first} {unit} {_text_param(template, 3)} {_text_param(template, 4)}".strip()
        return f"{first} {unit}".strip()
    if name == "lang":
        return _text_param(template, 2)
    if name.startswith("lang-") or name in ("nowrap", "nobr", "small", "abbr", "not a typo"):
        return _text_param(template, 1)
    if name in ("circa", "c."):
        return f"c. {_text_param(template, 1)}".strip()
    if name in ("nbsp", "space"):
        return " "
    if name in ("ndash", "snd", "spaced ndash"):
        return " – " if name != "ndash" else "–"
    if name == "mdash":
        return "—"
    return ""


def _render(code: Any) -> str:
    """Render wikicode to plain text, dropping footnotes, tables, media and templates."""
    from mwparserfromhell import nodes

    out = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, nodes.Wikilink):
            title = str(node.title).strip()
            prefix = title.split(":", 1)[0].strip() if ":" in title else ""
            if prefix.lower() in _MEDIA_NAMESPACES or _INTERWIKI.match(prefix):
                continue
            out.append(_render(node.text) if node.text is not None else title.lstrip(":"))
        elif isinstance(node, nodes.ExternalLink):
            if node.brackets and node.title is not None:
                out.append(_render(node.title))
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in ("li", "dt", "dd") and node.wiki_markup:
                out.append(_SKIP)
            elif tag == "br":
                out.append(" ")
            elif tag not in _DROPPED_TAGS and node.contents is not None:
                out.append(_render(node.contents))
        elif isinstance(node, nodes.Heading):
            out.append(_SKIP)
        elif isinstance(node, nodes.Template):
            out.append(_render_template(node))
        # Comment and Argument nodes render as nothing.
    return "".join(out)


def _clean_line(line: str) -> str:
    """Tidy the gaps that dropped templates and footnotes leave inside a sentence."""
    line = _LEFTOVER_MARKUP.sub("", line)
    line = re.sub(r"\s+", " ", line).strip()
    line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "( )", "(; )" left by removed templates
    line = re.sub(r"\(\s*[,;]\s*", "(", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    line = re.sub(r"([,;])\1+", r"\1", line)
    return re.sub(r" {2,}", " ", line).strip()


def _is_prose(line: str) -> bool:
    """A paragraph of running text: several words, mostly letters, ends like a sentence.

    Long lines may end mid-sentence: a displayed formula or a list cut the paragraph there.
    """
    if len(line) < 40 or len(line.split()) < 8:
        return False
    if not line.endswith(_PROSE_END) and len(line) < 150:
        return False
    if line.startswith(("{|", "|", "!", "thumb", "Category:", "File:", "Image:")):
        return False
    if "|}" in line or "{{" in line or "}}" in line or "[[" in line or "<ref" in line:
        return False
    letters = sum(c.isalpha() for c in line)
    return letters >= 0.6 * len(line)


def wikitext_to_prose(wikitext: str) -> list[str]:
    """Strip MediaWiki markup and return the article's paragraphs of prose, in order.

    Drops templates (infoboxes, citations), footnotes, tables, media and category links,
    headings, lists, and the reference/link sections ("References", "See also", ...); keeps
    paragraphs that read as running text.
    """
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for section in code.get_sections(levels=[2]):
        heading = section.filter_headings(recursive=False)[0]
        if heading.title.strip_code().strip().lower() in _BOILERPLATE_SECTIONS:
            try:
                code.remove(section)
            except ValueError:  # already removed with an enclosing node
                pass
    paragraphs = []
    for line in _render(code).split("\n"):
        if _SKIP in line:
            continue
        line = _clean_line(line)
        if _is_prose(line):
            paragraphs.append(line)
    return paragraphs


def iter_mediawiki_articles(source: Any) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` for main-namespace, non-redirect pages of a MediaWiki dump.

    Args:
        source: a binary file object (e.g. ``bz2.open(path)``) with the XML export.
    """
    for _, elem in ET.iterparse(source, events=("end",)):
        if elem.tag.rpartition("}")[2] != "page":
            continue
        fields = {child.tag.rpartition("}")[2]: child for child in elem}
        ns = fields.get("ns")
        text = elem.find("./{*}revision/{*}text")
        if (
            "redirect" not in fields
            and ns is not None
            and (ns.text or "").strip() == "0"
            and text is not None
            and text.text
        ):
            yield fields["title"].text or "", text.text
        elem.clear()


def split_articles(
    articles: list[tuple[str, list[str]]],
) -> dict[str, list[tuple[str, list[str]]]]:
    """Assign articles to splits by position: index % 5 == 4 -> evaluation, else calibration."""
    splits: dict[str, list[tuple[str, list[str]]]] = {"calibration": [], "evaluation": []}
    for index, article in enumerate(articles):
        key = "evaluation" if index % EVAL_EVERY == EVAL_EVERY - 1 else "calibration"
        splits[key].append(article)
    return splits


def format_articles(articles: list[tuple[str, list[str]]]) -> str:
    """Title line then one paragraph per line; articles separated by a blank line."""
    return "\n\n".join("\n".join([title, *paragraphs]) for title, paragraphs in articles) + "\n"


def build_wikipedia_corpus(dump_bz2: Path, out_dir: Path, *, source: str = "") -> dict[str, Any]:
    """Build ``calibration.txt``, ``evaluation.txt`` and ``meta.json`` from a bz2 MediaWiki dump.

    Articles whose markup leaves no prose (lists, disambiguation pages) are left out before the
    split, so every article in either file has at least one paragraph.

    Args:
        dump_bz2: the ``pages-articles`` XML dump, bz2-compressed.
        out_dir: an existing directory to write into.
        source: provenance recorded in ``meta.json`` (e.g. the wheel name).

    Returns:
        The metadata written to ``meta.json``.
    """
    articles = []
    skipped = 0
    with bz2.open(dump_bz2, "rb") as stream:
        for title, wikitext in iter_mediawiki_articles(stream):
            paragraphs = wikitext_to_prose(wikitext)
            if paragraphs:
                articles.append((title.strip(), paragraphs))
            else:
                skipped += 1
    meta: dict[str, Any] = {
        "source": source,
        "source_sha256": hashlib.sha256(Path(dump_bz2).read_bytes()).hexdigest(),
        "split_rule": f"article index % {EVAL_EVERY} == {EVAL_EVERY - 1} -> evaluation",
        "articles_without_prose": skipped,
        "splits": {},
    }
    for split, members in split_articles(articles).items():
        data = format_articles(members).encode("utf-8")
        (Path(out_dir) / f"{split}.txt").write_bytes(data)
        meta["splits"][split] = {
            "file": f"{split}.txt",
            "articles": len(members),
            "paragraphs": sum(len(p) for _, p in members),
            "chars": len(data.decode("utf-8")),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    (Path(out_dir) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
