"""The web page in a real browser: Debian's chromium and chromium-driver, driven by selenium,
against a real `swav serve` on loopback with a small index of Fashion-MNIST test images.

Screenshots of each view are saved under $SWAV_TEST_ARTIFACTS (default: a new temporary
directory); the path is printed. Chromium and its driver come from `scripts/setup --browser`
(scripts/test runs it).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from repo_tools import REPO, swav_bin  # noqa: F401 (swav_bin is a fixture)

MODEL = REPO / "models" / "fashion-mnist"
FASHION_MNIST = Path(os.environ.get("SWAV_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
PER_CLASS = 30
KEY = "browser-test-key"
XSS_ID = "<img src=x onerror=window.__pwned=1>"
XSS_META = {"note": "<img src=x onerror=window.__pwned=2>", "<b>key</b>": "<script>window.__pwned=3</script>"}
WAIT_S = 30


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `scripts/setup --browser` installs Debian's chromium and chromium-driver")
    return found


@pytest.fixture(scope="module")
def artifacts() -> Path:
    root = os.environ.get("SWAV_TEST_ARTIFACTS")
    path = Path(root) / "web-ui" if root else Path(tempfile.mkdtemp(prefix="swav-web-ui-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nweb UI screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """PER_CLASS test images of each of the ten classes, as PNGs named <class>/<n>.png."""
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    out = tmp_path_factory.mktemp("images")
    for cls in range(10):
        (out / str(cls)).mkdir()
        for n in np.flatnonzero(labels == cls)[:PER_CLASS]:
            Image.fromarray(pixels[n]).save(out / str(cls) / f"{n:05d}.png")
    return out


def env() -> dict[str, str]:
    e = dict(os.environ)
    ort = REPO / ".ort" / "libonnxruntime.so"
    if ort.is_file():
        e.setdefault("SWAV_ORT_LIB", str(ort))
    e.setdefault("RUST_LOG", "warn")
    return e


@pytest.fixture(scope="module")
def index(swav_bin, images, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("index") / "index"
    subprocess.run(
        [str(swav_bin), "index", "build", "--model", str(MODEL), "--input", str(images), "--out", str(out), "--no-progress"],
        check=True, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )
    return out


class Server:
    def __init__(self, swav: Path, index: Path, api_key: str | None, model: Path = MODEL):
        args = [str(swav), "serve", "--model", str(model), "--index", str(index), "--listen", "127.0.0.1:0"]
        if api_key:
            args += ["--api-key", api_key]
        self.key = api_key
        self.proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            pytest.fail(f"swav serve did not start: {line!r}")
        self.base = "http://" + line.split()[-1]
        self.wait_ready()

    def wait_ready(self) -> None:
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None:
                pytest.fail("swav serve exited before it was ready")
            time.sleep(0.1)
        pytest.fail("swav serve never became ready")

    def api(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", "Bearer " + self.key)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(swav_bin, index):  # noqa: F811
    s = Server(swav_bin, index, None)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed_server(swav_bin, index, tmp_path_factory):  # noqa: F811
    # A copy: one index directory is open in one process at a time.
    copy = tmp_path_factory.mktemp("keyed") / "index"
    shutil.copytree(index, copy, ignore=shutil.ignore_patterns("LOCK"))
    s = Server(swav_bin, copy, KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = tool("chromium")
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}",
    ]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Everything is given, so selenium's driver manager never looks anything up online.
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(service=Service(executable_path=tool("chromedriver")), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait(driver, predicate, what: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: predicate(d), message=f"waiting for {what}")


def loaded_thumbs(driver, container: str) -> int:
    """Thumbnails inside `container` shown from blob: URLs (fetched with the key) and decoded."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' .thumb img'))"
        ".filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')).length",
        container,
    )


def card_ids(driver, container: str) -> list[str]:
    # Read in one script: the page may re-render between separate element look-ups.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' .card')).map(c => c.dataset.id)", container
    )


def open_page(driver, base: str, fragment: str) -> None:
    """A fresh load of the page (not just a new fragment on the loaded one)."""
    driver.get("about:blank")
    driver.get(base + "/" + fragment)
    wait(driver, lambda d: d.find_element(By.ID, "model-name").text != "", "the page to load the model")


def first_image(images: Path) -> tuple[str, Path]:
    path = sorted(images.glob("3/*.png"))[0]
    return str(path.relative_to(images)), path


def test_search_by_upload_shows_neighbour_thumbnails_led_by_the_query(browser, server, images, artifacts):
    query_id, query_path = first_image(images)
    open_page(browser, server.base, "#/search")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("12")
    browser.find_element(By.ID, "file-input").send_keys(str(query_path))
    wait(browser, lambda d: loaded_thumbs(d, "#results") == 12, "12 result thumbnails")
    ids = card_ids(browser, "#results")
    assert ids[0] == query_id, f"the uploaded image's own item should lead: {ids}"
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert query_id in first.text and "cluster" in first.text
    score = float(first.find_element(By.CSS_SELECTOR, ".score").text)
    assert score > 0.99
    protos = browser.find_elements(By.CSS_SELECTOR, "#prototype-list li")
    assert len(protos) == 5 and all("%" in p.text for p in protos)
    assert browser.find_element(By.CSS_SELECTOR, "#query-image img").get_attribute("src").startswith("blob:")
    browser.save_screenshot(str(artifacts / "search.png"))

    # Clicking a result searches from that item: the query becomes it, and it leaves itself out.
    second = ids[1]
    browser.find_elements(By.CSS_SELECTOR, "#results .card .thumb")[1].click()
    wait(browser, lambda d: d.find_element(By.ID, "query-caption").text.startswith(second), "the search from an item")
    wait(browser, lambda d: loaded_thumbs(d, "#results") == 12 and second not in card_ids(d, "#results"), "its neighbours")
    assert "#/search/" in browser.current_url


def test_clusters_largest_first_and_a_cluster_pages_its_members(browser, server, artifacts):
    status, body = server.api("GET", "/v1/clusters")
    assert status == 200
    clusters = sorted(body["clusters"], key=lambda c: (-c["size"], c["id"]))
    open_page(browser, server.base, "#/clusters")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cluster-card")) == len(clusters), "the cluster cards")
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('.cluster-card')).map(c => Number(c.dataset.cluster))"
    )
    assert shown == [c["id"] for c in clusters], "largest first"
    wait(browser, lambda d: loaded_thumbs(d, "#clusters") >= min(5, clusters[0]["size"]), "example strips")
    browser.save_screenshot(str(artifacts / "clusters.png"))

    biggest = clusters[0]
    browser.find_element(By.CSS_SELECTOR, ".cluster-card").click()
    wait(browser, lambda d: d.find_element(By.ID, "cluster-total").text != "", "the cluster view")
    assert browser.find_element(By.ID, "cluster-title").text == f"Cluster {biggest['id']}"
    assert browser.find_element(By.ID, "cluster-total").text == f"{biggest['size']} members"
    on_page = min(biggest["size"], 48)
    wait(browser, lambda d: loaded_thumbs(d, "#cluster-items") == on_page, f"{on_page} member thumbnails")
    browser.save_screenshot(str(artifacts / "cluster.png"))
    if biggest["size"] > 48:
        first_page = card_ids(browser, "#cluster-items")
        browser.find_element(By.ID, "cluster-next").click()
        wait(browser, lambda d: card_ids(d, "#cluster-items")[:1] != first_page[:1], "the next page")
        assert not set(card_ids(browser, "#cluster-items")) & set(first_page)


def test_item_view_and_delete(browser, server, images, artifacts):
    victim = str(sorted(images.glob("7/*.png"))[1].relative_to(images))
    status, item = server.api("GET", "/v1/items/" + urllib.parse.quote(victim, safe=""))
    assert status == 200
    members = server.api("GET", f"/v1/clusters/{item['cluster']}/items?limit=1")[1]["total"]
    open_page(browser, server.base, "#/item/" + urllib.parse.quote(victim, safe=""))
    wait(browser, lambda d: d.find_element(By.ID, "item-id").text == victim, "the item view")
    assert browser.find_element(By.ID, "item-cluster").text == str(item["cluster"])
    wait(browser, lambda d: loaded_thumbs(d, "#view-item") == 13, "its thumbnail and 12 neighbours")
    browser.save_screenshot(str(artifacts / "item.png"))

    delete = browser.find_element(By.ID, "item-delete")
    delete.click()
    assert "again" in delete.text, "the first click only arms the button"
    delete.click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == f"Deleted {victim}", "the delete")
    assert browser.current_url.endswith(f"#/cluster/{item['cluster']}")
    # The page says "1 member" in the singular: which cluster the victim is in, and its size, depend on the model.
    left = f"{members - 1} member" + ("" if members - 1 == 1 else "s")
    wait(browser, lambda d: d.find_element(By.ID, "cluster-total").text == left, "one member fewer")
    wait(browser, lambda d: len(card_ids(d, "#cluster-items")) > 0, "the cluster after the delete")
    assert victim not in card_ids(browser, "#cluster-items")
    assert server.api("GET", "/v1/items/" + urllib.parse.quote(victim, safe=""))[0] == 404


def test_ids_and_metadata_are_shown_as_text_and_never_run(browser, server, images, artifacts):
    _, path = first_image(images)
    image = base64.b64encode(path.read_bytes()).decode()
    browser.get_log("browser")  # start from an empty console
    status, body = server.api("POST", "/v1/items", {"items": [{"id": XSS_ID, "image": image, "metadata": XSS_META}]})
    assert status == 200, body
    open_page(browser, server.base, "#/item/" + urllib.parse.quote(XSS_ID, safe=""))
    wait(browser, lambda d: d.find_element(By.ID, "item-id").text == XSS_ID, "the item view")
    meta = json.loads(browser.find_element(By.ID, "item-metadata").text)
    assert meta == XSS_META, "the metadata is shown as its JSON text"
    wait(browser, lambda d: loaded_thumbs(d, "#view-item") >= 2, "the thumbnails")
    # As a query, and as a result: the item with the same image leads the search from it.
    browser.find_element(By.ID, "item-search").click()
    wait(browser, lambda d: d.find_element(By.ID, "query-caption").text.startswith(XSS_ID), "the search from it")
    wait(browser, lambda d: len(card_ids(d, "#results")) > 0, "its neighbours")
    twin = card_ids(browser, "#results")[0]
    open_page(browser, server.base, "#/search/" + urllib.parse.quote(twin, safe=""))
    wait(browser, lambda d: XSS_ID in card_ids(d, "#results"), "the item among the results")
    shown = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#results .card .id")]
    assert XSS_ID in shown, f"the id is shown as its text: {shown}"
    browser.save_screenshot(str(artifacts / "xss.png"))
    assert browser.execute_script("return window.__pwned") is None, "a payload ran"
    # Had any of it been parsed as HTML, the CSP would have blocked its handler and said so.
    blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert blocked == [], blocked
    assert browser.find_elements(By.CSS_SELECTOR, "img[src='x'], b, main script") == []
    status, _ = server.api("DELETE", "/v1/items/" + urllib.parse.quote(XSS_ID, safe=""))
    assert status == 204


def test_with_an_api_key_the_page_works_only_after_the_key_is_entered(browser, keyed_server, artifacts):
    browser.get(keyed_server.base + "/#/clusters")
    wait(browser, lambda d: d.find_element(By.ID, "view-key").is_displayed(), "the key prompt")
    assert not browser.find_element(By.ID, "view-clusters").is_displayed()
    assert browser.find_element(By.ID, "model-name").text == "", "nothing was loaded without the key"
    browser.save_screenshot(str(artifacts / "key.png"))

    browser.find_element(By.ID, "key-input").send_keys("wrong")
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-error").text, "the refusal")
    assert browser.find_element(By.ID, "view-key").is_displayed()

    browser.find_element(By.ID, "key-input").send_keys(KEY)
    browser.find_element(By.ID, "key-submit").click()
    wait(browser, lambda d: d.find_element(By.ID, "view-clusters").is_displayed(), "the clusters after the key")
    wait(browser, lambda d: loaded_thumbs(d, "#clusters") > 0, "thumbnails fetched with the key")
    assert browser.execute_script("return sessionStorage.getItem('swav.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0, "the key stays out of localStorage"
    browser.execute_script("sessionStorage.clear()")


def headless_model(out: Path) -> Path:
    """The default model without its projection and prototypes: the shape of what `swav import`
    writes for a backbone-only checkpoint imported without --cluster-images."""
    import hashlib

    import onnx

    graph = onnx.load(str(MODEL / "model.onnx"))
    keep = [o for o in graph.graph.output if o.name == "embedding"]
    del graph.graph.output[:]
    graph.graph.output.extend(keep)
    out.mkdir()
    onnx.save(graph, str(out / "model.onnx"))
    manifest = json.loads((MODEL / "manifest.json").read_text())
    manifest.update(schema_version=2, name="fashion-mnist-trunk", num_prototypes=0, golden=None,
                    model_sha256=hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest(),
                    outputs={**manifest["outputs"], "projection": None, "prototype_scores": None})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_model_without_prototypes_searches_and_hides_what_needs_clusters(browser, swav_bin, images, tmp_path,
                                                                         artifacts):  # noqa: F811
    s = Server(swav_bin, tmp_path / "index", None, model=headless_model(tmp_path / "trunk"))
    try:
        query_id, query_path = first_image(images)
        image = base64.b64encode(query_path.read_bytes()).decode()
        status, body = s.api("POST", "/v1/items", {"items": [{"id": query_id, "image": image}]})
        assert status == 200, body
        assert s.api("GET", "/v1/clusters")[1]["error"]["code"] == "no_clusters"
        open_page(browser, s.base, "#/search")
        assert not browser.find_element(By.ID, "nav-clusters").is_displayed()
        assert not browser.find_element(By.ID, "cluster-filter").is_displayed()
        browser.find_element(By.ID, "file-input").send_keys(str(query_path))
        wait(browser, lambda d: loaded_thumbs(d, "#results") == 1, "the result thumbnail")
        assert card_ids(browser, "#results") == [query_id]
        assert not browser.find_element(By.ID, "prototypes").is_displayed()
        assert browser.find_element(By.ID, "status").text == "", "no error: /v1/assign was not asked"
        browser.save_screenshot(str(artifacts / "no-prototypes.png"))
    finally:
        s.stop()
