"""End to end: real headless Chromium drives the search page against a live server on wang1k.

Needs /usr/bin/chromium (apt's chromium; .ci/run installs it) and the playwright package; the
test skips with the reason when either is absent. Set FASTRET_WEB_SCREENSHOT=PATH to keep the
screenshot of the result page (docs/web-search.png is made this way).
"""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.data
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install 'fastret[web]'")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")


@pytest.fixture(scope="session")
def wang1k_server(wang1k, bundled_onnx, live_server):
    """(base URL, search service): the web app over wang1k indexed with the bundled model, on a free loopback port."""
    from fastret.engine.retrieval import build_index
    from fastret.service.search import Retriever
    from fastret.web.app import create_app

    index, _ = build_index(wang1k, bundled_onnx)
    retriever = Retriever(index, bundled_onnx)
    with live_server(create_app(retriever)) as url:
        yield url, retriever


def wait_for_results(page, count: int) -> None:
    """Until `count` result cards are shown and every thumbnail has loaded."""
    page.wait_for_function(
        """count => {
            const images = [...document.querySelectorAll('#results img')];
            return images.length === count && images.every(img => img.complete && img.naturalWidth > 0);
        }""",
        arg=count,
    )


def test_upload_shows_ten_buildings_and_click_searches_again(wang1k_server, browser, wang1k, tmp_path):
    url, _ = wang1k_server
    page = browser.new_page(viewport={"width": 1280, "height": 540})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("() => document.getElementById('health').textContent.includes('1000 images')")

    page.set_input_files("#file", str(wang1k / "buildings" / "299.jpg"))
    wait_for_results(page, 10)
    assert page.locator("#results .label").all_text_contents() == ["buildings"] * 10
    assert page.locator("#results .path").all_text_contents()[0] == "buildings/299.jpg"
    assert page.locator("#status").text_content().startswith("10 results in")
    page.screenshot(path=str(tmp_path / "web-search.png"))
    if os.environ.get("FASTRET_WEB_SCREENSHOT"):
        shutil.copy(tmp_path / "web-search.png", os.environ["FASTRET_WEB_SCREENSHOT"])

    clicked = page.locator("#results .path").all_text_contents()[1]
    page.locator("#results button").nth(1).click()
    page.wait_for_function(f"() => document.getElementById('query-name').textContent === {clicked!r}")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('10 results in')")
    wait_for_results(page, 10)
    assert clicked not in page.locator("#results .path").all_text_contents()

    page.select_option("#k", "5")
    wait_for_results(page, 5)
    assert errors == []


def test_rerank_box_unchecked_gives_the_plain_ranking(wang1k_server, browser, wang1k):
    from fastret.engine.rerank import RerankOptions
    from fastret.service.search import SearchOptions

    url, retriever = wang1k_server
    page = browser.new_page()
    page.goto(url)
    assert page.is_checked("#rerank")  # on by default
    page.uncheck("#rerank")
    page.set_input_files("#file", str(wang1k / "buildings" / "299.jpg"))
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('10 results in')")
    wait_for_results(page, 10)
    assert "re-ranking" not in page.locator("#status").text_content()
    expected = retriever.search_file(wang1k / "buildings" / "299.jpg",
                                     SearchOptions(rerank=RerankOptions(), include_self=True))
    assert page.locator("#results .path").all_text_contents() == [hit.path for hit in expected]


def test_the_page_shows_what_fastret_search_finds_by_default(wang1k_index, live_server, browser, wang1k, capsys):
    """The default ranking (re-ranked through the index's graph) is the same on the page and in the CLI."""
    import json

    from fastret.cli.main import main
    from fastret.service.search import Retriever
    from fastret.web.app import create_app

    query = wang1k / "buildings" / "299.jpg"
    assert main(["search", str(query), "--index", str(wang1k_index), "--json", "--include-self"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["search"] == "hnsw" and cli["rerank"]["source"] == "index" and cli["rerank"]["pca_dim"] == 256
    with live_server(create_app(Retriever.open(wang1k_index))) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => document.getElementById('health').textContent.includes(\"index's graph\")")
        page.set_input_files("#file", str(query))
        page.wait_for_function("() => document.getElementById('status').textContent.includes('hnsw + re-ranking')")
        wait_for_results(page, 10)
        assert page.locator("#results .path").all_text_contents() == [hit["path"] for hit in cli["results"]]


# An indexed photo fetched by the page and handed to it as a dropped or pasted file.
SEND_FILE_AS = """async ([id, how]) => {
    const blob = await (await fetch(`/items/${id}/image`)).blob();
    const transfer = new DataTransfer();
    transfer.items.add(new File([blob], 'query.jpg', {type: 'image/jpeg'}));
    const event = how === 'drop'
        ? new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true})
        : new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true});
    (how === 'drop' ? document.getElementById('drop') : document).dispatchEvent(event);
}"""


@pytest.mark.parametrize(("item", "how"), [(5, "drop"), (750, "paste")])
def test_dropped_or_pasted_image_is_searched(wang1k_server, browser, item, how):
    url, retriever = wang1k_server
    page = browser.new_page()
    page.goto(url)
    page.evaluate(SEND_FILE_AS, [item, how])
    wait_for_results(page, 10)
    assert page.locator("#query-name").text_content() == "query.jpg"
    assert page.locator("#results .path").first.text_content() == retriever.index.items[item].path
    from fastret.service.search import SearchOptions  # the page's default: re-ranked, itself kept (an upload)

    expected = retriever.search_item(int(retriever.index.ids[item]), SearchOptions(include_self=True))[0].score
    assert float(page.locator("#results .score").first.text_content()) == pytest.approx(expected, abs=2e-3)
