"""Tests for modelfold.corpus: MediaWiki stripping, the article split, token windows."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from modelfold import corpus
from modelfold.assets import AssetError, pull, resolve_model
from modelfold.corpus import (
    build_wikipedia_corpus,
    calibration_batches,
    corpus_articles,
    corpus_text,
    iter_mediawiki_articles,
    split_articles,
    tokenize_text,
    wikitext_to_prose,
)

ARTICLE = """{{Infobox country
| name = Freedonia
| capital = [[Fredville]]
}}
{{Use dmy dates|date=May 2020}}
[[File:Freedonia flag.svg|thumb|200px|The [[flag]] of Freedonia, adopted in 1933.]]
'''Freedonia''' is a small [[country]] in [[Europe|central Europe]] with an area of \
{{convert|1200|km2|sqmi}}.<ref>{{cite web|url=http://example.org|title=Facts}}</ref> Its \
capital is [[Fredville]].<ref name="a"/> It is known for its ''duck soup''&nbsp;and its \
long-running rivalry with [[Sylvania (fictional country)|Sylvania]]<!-- hidden comment -->.

== History ==
The country was founded in 1890 by [[Rufus T. Firefly]] {{citation needed|date=June 2020}}, \
who ruled it for four decades ({{lang|fr|la belle époque}}) before the war.
* a list item that is not prose at all but is long enough to pass the length test
* another item
{| class="wikitable"
! Year !! Population
|-
| 1900 || 12,000 people lived in the small country at that time, said the census.
|}
Short line.
See [http://example.org the official site of the government] for the full history of it.

== See also ==
The see also section has a sentence that is long enough to look like real prose.

== References ==
{{Reflist}}

[[Category:Fictional countries]]
[[de:Freedonien]]
"""

EXPECTED = [
    (
        "Freedonia is a small country in central Europe with an area of 1200 km2. Its capital is "
        "Fredville. It is known for its duck soup and its long-running rivalry with Sylvania."
    ),
    (
        "The country was founded in 1890 by Rufus T. Firefly, who ruled it for four decades "
        "(la belle époque) before the war."
    ),
    "See the official site of the government for the full history of it.",
]


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    redirect_tag = f'<redirect title="{redirect}" />' if redirect else ""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
        f'<revision><id>2</id><text xml:space="preserve">{text}</text></revision></page>'
    )


def _dump(pages: list[str]) -> bytes:
    return (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
        "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(pages) + "</mediawiki>"
    ).encode()


@pytest.fixture(scope="module")
def wikipedia_dir() -> Path:
    return pull(["wikipedia"], progress=False)["wikipedia"]




# --- MediaWiki stripping -----------------------------------------------------------------


def test_wikitext_to_prose_strips_markup() -> None:
    assert wikitext_to_prose(ARTICLE) == EXPECTED


def test_wikitext_to_prose_drops_non_prose() -> None:
    assert wikitext_to_prose("* one item in a list of things that goes on for a while.\n") == []
    assert wikitext_to_prose("{{Infobox|a=This template text is long enough to be a line.}}") == []
    assert wikitext_to_prose("Too short to count.") == []
    unclosed = "An unclosed footnote cuts the rest of this line away here.<ref>Smith, p. 4"
    assert wikitext_to_prose(unclosed) == [
        "An unclosed footnote cuts the rest of this line away here."
    ]


def test_iter_mediawiki_articles_skips_redirects_and_namespaces() -> None:
    pages = [
        _page("AccessibleComputing", "#REDIRECT [[Computer accessibility]]", redirect="X"),
        _page("Freedonia", ARTICLE),
        _page("Talk:Freedonia", "Talk page text that is certainly not an article at all.", ns=1),
        _page("Wikipedia:About", "Project page text.", ns=4),
    ]
    found = list(iter_mediawiki_articles(io.BytesIO(_dump(pages))))
    assert [title for title, _ in found] == ["Freedonia"]
    assert found[0][1] == ARTICLE


def test_split_articles_every_fifth_goes_to_evaluation() -> None:
    articles = [(f"A{i}", [f"p{i}"]) for i in range(12)]
    splits = split_articles(articles)
    assert [t for t, _ in splits["evaluation"]] == ["A4", "A9"]
    assert len(splits["calibration"]) == 10
    assert split_articles(articles) == splits


def test_build_corpus_from_small_dump(tmp_path: Path) -> None:
    body = "Article number {i} has one sentence of prose that is comfortably long enough."
    pages = [_page(f"Title {i}", body.format(i=i)) for i in range(10)]
    pages.insert(3, _page("Empty", "{{Disambiguation}}\n* just a list"))  # no prose: not counted
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(_dump(pages)))
    out = tmp_path / "out"
    out.mkdir()

    meta = build_wikipedia_corpus(dump, out, source="test")
    evaluation = (out / "evaluation.txt").read_text()
    assert evaluation == (f"Title 4\n{body.format(i=4)}\n\nTitle 9\n{body.format(i=9)}\n")
    assert (out / "calibration.txt").read_text().startswith(f"Title 0\n{body.format(i=0)}\n\n")
    assert meta["articles_without_prose"] == 1
    assert meta["splits"]["calibration"]["articles"] == 8
    assert meta["splits"]["evaluation"]["articles"] == 2
    for split, info in meta["splits"].items():
        data = (out / f"{split}.txt").read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["chars"] == len(data.decode())
    assert json.loads((out / "meta.json").read_text()) == meta


# --- reading splits ----------------------------------------------------------------------


def test_bad_split_and_corpus_names() -> None:
    with pytest.raises(ValueError, match="split='test' is not a corpus split"):
        corpus_text("wikipedia", "test")
    with pytest.raises(ValueError, match="corpus='c4' is not a known corpus"):
        corpus_text("c4", "eval")


def test_missing_corpus_says_how_to_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="run `modelfold assets pull wikipedia`"):
        corpus_text("wikipedia", "calibration")


@pytest.mark.slow
def test_real_corpus_split_is_disjoint_and_matches_meta(wikipedia_dir: Path) -> None:
    meta = json.loads((wikipedia_dir / "meta.json").read_text())
    calibration = corpus_articles("wikipedia", "calib")
    evaluation = corpus_articles("wikipedia", "eval")
    assert corpus_text(split="train") == corpus_text(split="calibration")
    assert len(calibration) == meta["splits"]["calibration"]["articles"] >= 80
    assert len(evaluation) == meta["splits"]["evaluation"]["articles"] >= 20
    total_chars = sum(info["chars"] for info in meta["splits"].values())
    assert 2_000_000 < total_chars < 3_500_000
    for split in ("calibration", "evaluation"):
        data = (wikipedia_dir / f"{split}.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["splits"][split]["sha256"]

    # Disjoint by article, and no evaluation paragraph leaks into calibration text.
    assert not {t for t, _ in calibration} & {t for t, _ in evaluation}
    calibration_paragraphs = {p for _, body in calibration for p in body.split("\n")}
    assert not any(p in calibration_paragraphs for _, body in evaluation for p in body.split("\n"))
    assert evaluation[0][0] == "Alabama" and calibration[0][0] == "Anarchism"


@pytest.mark.slow
def test_real_corpus_rebuild_is_deterministic(wikipedia_dir: Path, tmp_path: Path) -> None:
    meta = json.loads((wikipedia_dir / "meta.json").read_text())
    (dump,) = wikipedia_dir.glob("*.bz2")
    rebuilt = build_wikipedia_corpus(dump, tmp_path, source=meta["source"])
    assert rebuilt == meta


# --- tokens and calibration windows ------------------------------------------------------


@pytest.mark.slow
def test_tokenize_text_is_lossless_and_quiet(
    smollm2_tokenizer, wikipedia_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    text = corpus_text(split="evaluation")
    ids = tokenize_text(smollm2_tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() > 8192  # longer than the model's context
    assert smollm2_tokenizer.bos_token_id not in ids[:10].tolist()
    assert smollm2_tokenizer.decode(ids) == text
    assert "sequence length is longer" not in capfd.readouterr().err


@pytest.mark.slow
def test_calibration_batches_shape_bos_and_determinism(
    smollm2_tokenizer, wikipedia_dir: Path
) -> None:
    batch = calibration_batches(smollm2_tokenizer, n_samples=8, seq_len=64, seed=0)
    assert batch.shape == (8, 64) and batch.dtype == torch.long
    assert (batch[:, 0] == smollm2_tokenizer.bos_token_id).all()
    assert smollm2_tokenizer.bos_token_id == 1

    torch.manual_seed(1234)  # the global RNG must not matter
    assert torch.equal(batch, calibration_batches(smollm2_tokenizer, n_samples=8, seq_len=64))
    other = calibration_batches(smollm2_tokenizer, n_samples=8, seq_len=64, seed=1)
    assert not torch.equal(batch, other)

    # Every window is a contiguous run of the tokenized calibration split.
    ids = corpus.corpus_token_ids(smollm2_tokenizer, split="calibration")
    assert ids.numel() > 400_000
    windows = ids.unfold(0, 63, 1)  # [N - 62, 63]
    for row in batch:
        assert (windows == row[1:]).all(dim=1).any()


@pytest.mark.slow
def test_calibration_token_cache_is_reused(smollm2_tokenizer, wikipedia_dir: Path) -> None:
    calibration_batches(smollm2_tokenizer, n_samples=1, seq_len=8)
    caches = list(wikipedia_dir.glob("tokens-calibration-smollm2-135m-instruct-*.npy"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    ids = corpus.corpus_token_ids(smollm2_tokenizer, split="calibration")
    assert caches[0].stat().st_mtime_ns == stamp
    assert torch.equal(ids, tokenize_text(smollm2_tokenizer, corpus_text(split="calibration")))


@pytest.mark.slow
def test_calibration_batches_without_bos(wikipedia_dir: Path) -> None:
    from transformers import AutoTokenizer

    pull(["minilm-l6"], progress=False)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    assert tokenizer.bos_token_id is None
    batch = calibration_batches(tokenizer, n_samples=4, seq_len=32, seed=3)
    assert batch.shape == (4, 32)
    assert not (batch == tokenizer.cls_token_id).any()


@pytest.mark.slow
def test_calibration_batches_rejects_bad_options(smollm2_tokenizer, wikipedia_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"seq_len=10000000 is longer than the 'wikipedia'"):
        calibration_batches(smollm2_tokenizer, seq_len=10_000_000)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        calibration_batches(smollm2_tokenizer, n_samples=0)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        calibration_batches(smollm2_tokenizer, seq_len=1)
    with pytest.raises(ValueError, match="seq_len must be an int"):
        calibration_batches(smollm2_tokenizer, seq_len=512.0)
