"""The index routes of `swav serve` on both backends: its own index directory and a real Milvus 2.3.5
(PyPI's embedded standalone server, see milvus_server.py). One suite, parametrised over the backend;
then what only a shared store can do: two replicas on one collection, Milvus stopped and started
under a running server, and the batch indexer resuming into Milvus."""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from milvus_server import Milvus, loopback_only_network, milvus_python, milvus_server, swav_serve
from repo_tools import REPO, fixture_bundle, swav_bin  # noqa: F401 (a fixture)

# Short, so that the outage test is quick; long enough for a loaded machine's normal answers.
TIMEOUT_S = 3
# The kNN of benchmarks/bench_index.py (a majority vote of 20 neighbours).
KNN_K = 20
# Images per /v1/search request in the agreement test: Milvus answers all of a request's queries in
# one search, and each of its Strong reads waits up to a time tick (200 ms) for its data to catch up.
IMAGES_PER_SEARCH = 250


def png(seed: int) -> bytes:
    """Varied, distinct 28x28 gray images (noise, gradients, stripes, flat), so that they fall in several
    clusters and no two tie in a search."""
    rng = np.random.default_rng(seed)
    kind = seed % 4
    if kind == 0:
        pixels = rng.integers(0, 256, (28, 28))
    elif kind == 1:
        pixels = np.tile(np.linspace(0, 255 - 4 * seed, 28), (28, 1))
    elif kind == 2:
        pixels = np.full((28, 28), seed * 37 % 256)
    else:
        pixels = (np.indices((28, 28)).sum(axis=0) // (1 + seed % 5) % 2) * 255
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Ids that an expression or a URL could trip over.
IDS = ["img/0.png", 'quote"and\\backslash', "ünïcode ✓", "with space", "a'b"] + [f"img/{i}.png" for i in range(5, 16)]


def items(ids: list[str]) -> list[dict]:
    return [{"id": id, "image": b64(png(i)), "metadata": {"n": i, "tag": f"t{i % 3}"}} for i, id in enumerate(ids)]


def quoted(id: str) -> str:
    return quote(id, safe="")


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Milvus]:
    """One Milvus for the module, in a loopback-only network namespace with every process that uses it."""
    with loopback_only_network(), milvus_server(tmp_path_factory.mktemp("milvus")) as server:
        yield server


def collection() -> str:
    return "swav_" + uuid.uuid4().hex[:12]


@pytest.fixture(params=["local", "milvus"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty index of each backend, as `--index` names it."""
    if request.param == "local":
        return str(tmp_path / "index")
    server: Milvus = request.getfixturevalue("milvus")
    return server.url(collection())


def scenario(srv) -> dict:
    """Adds, reads, searches, replaces and deletes through the API; asserts what must hold on any
    backend and returns the answers that must agree between backends."""
    status, body, _ = srv.call("POST", "/v1/items", {"items": items(IDS)})
    assert status == 200, body
    assert body == {"added": len(IDS), "ids": IDS}
    got = {}
    for id in IDS:
        status, item, _ = srv.call("GET", f"/v1/items/{quoted(id)}")
        assert status == 200, (id, item)
        assert item["id"] == id and item["metadata"]["n"] == IDS.index(id)
        got[id] = item
    status, body, _ = srv.call("GET", "/v1/items/nope")
    assert (status, body["error"]["code"]) == (404, "item_not_found")

    status, thumb, headers = srv.call("GET", f"/v1/items/{quoted(IDS[1])}/thumbnail")
    assert status == 200 and headers["Content-Type"].startswith("image/")

    # Search by id: the item itself is left out, best first, at most k.
    status, body, _ = srv.call("POST", "/v1/search?k=5&ef=32", {"id": IDS[0]})
    assert status == 200, body
    hits = body["results"][0]
    assert len(hits) == 5 and IDS[0] not in [h["id"] for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    by_id = [h["id"] for h in hits]

    # An image's own item is its nearest neighbour, with cosine 1.
    status, body, _ = srv.call("POST", "/v1/search?k=3", {"images": [b64(png(7))]})
    assert status == 200, body
    assert body["results"][0][0]["id"] == IDS[7] and body["results"][0][0]["score"] == pytest.approx(1, abs=1e-4)

    # Several images in one search: the lists one search each would give (Milvus gets them in one request).
    together = srv.call("POST", "/v1/search?k=4", {"images": [b64(png(i)) for i in (3, 9, 12)]})[1]["results"]
    assert len(together) == 3
    for i, hits in zip((3, 9, 12), together):
        assert hits == srv.call("POST", "/v1/search?k=4", {"images": [b64(png(i))]})[1]["results"][0], i
        assert hits[0]["id"] == IDS[i]

    # The cluster filter keeps only that cluster's items.
    cluster = got[IDS[7]]["cluster"]
    status, body, _ = srv.call("POST", f"/v1/search?k=20&cluster={cluster}", {"images": [b64(png(7))]})
    assert status == 200, body
    filtered = body["results"][0]
    members = sorted(id for id, item in got.items() if item["cluster"] == cluster)
    assert sorted(h["id"] for h in filtered) == members
    assert all(h["cluster"] == cluster for h in filtered)

    status, body, _ = srv.call("GET", "/v1/clusters")
    assert status == 200, body
    sizes = {c["id"]: c["size"] for c in body["clusters"]}
    assert sum(sizes.values()) == len(IDS)
    status, page, _ = srv.call("GET", f"/v1/clusters/{cluster}/items?limit=2&offset=1")
    assert status == 200, page
    assert page["total"] == len(members) and [i["id"] for i in page["items"]] == members[1:3]

    # Replacing an id keeps one item with the new metadata.
    status, body, _ = srv.call("POST", "/v1/items", {"items": [{"id": IDS[2], "image": b64(png(2)), "metadata": {"n": -1}}]})
    assert status == 200 and body["added"] == 1
    assert srv.call("GET", f"/v1/items/{quoted(IDS[2])}")[1]["metadata"] == {"n": -1}

    # Deletes: gone from get, search and counts; a second delete is a 404.
    assert srv.call("DELETE", f"/v1/items/{quoted(IDS[7])}")[0] == 204
    assert srv.call("DELETE", f"/v1/items/{quoted(IDS[7])}")[0] == 404
    assert srv.call("GET", f"/v1/items/{quoted(IDS[7])}")[0] == 404
    status, body, _ = srv.call("POST", "/v1/search?k=20", {"images": [b64(png(7))]})
    assert IDS[7] not in [h["id"] for h in body["results"][0]]
    status, body, _ = srv.call("GET", "/v1/clusters")
    after = {c["id"]: c["size"] for c in body["clusters"]}
    assert sum(after.values()) == len(IDS) - 1 and after.get(cluster, 0) == sizes[cluster] - 1

    status, stats, _ = srv.call("GET", "/v1/index")
    assert status == 200 and stats["items"] == len(IDS) - 1
    return {"clusters": {id: item["cluster"] for id, item in got.items()}, "by_id": by_id, "sizes": after}


def test_index_api_on_each_backend(swav_bin, index):
    with swav_serve(swav_bin, index, "--milvus-timeout", str(TIMEOUT_S)) as srv:
        scenario(srv)


def test_backends_give_the_same_answers(swav_bin, tmp_path, milvus):
    with swav_serve(swav_bin, str(tmp_path / "index")) as local:
        want = scenario(local)
    with swav_serve(swav_bin, milvus.url(collection()), "--milvus-timeout", str(TIMEOUT_S)) as remote:
        got = scenario(remote)
    # With 16 items HNSW's search is exact on both sides.
    assert got == want


def test_the_collection_has_the_documented_schema_and_refuses_another_model(swav_bin, tmp_path, milvus):
    name = collection()
    with swav_serve(swav_bin, milvus.url(name)) as srv:
        assert srv.call("POST", "/v1/items", {"items": items(IDS[:2])})[0] == 200
    # Read back with Milvus's own client, in Milvus's environment.
    script = f"""
import json
from pymilvus import connections, Collection
connections.connect(host="127.0.0.1", port={milvus.port})
c = Collection({name!r})
fields = {{f.name: (f.dtype.name, f.is_primary, f.params) for f in c.schema.fields}}
indexes = {{i.field_name: i.params for i in c.indexes}}
print(json.dumps({{"fields": fields, "indexes": indexes, "description": c.schema.description}}, default=str))
"""
    out = subprocess.run([str(milvus_python()), "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["fields"]["id"][:2] == ["VARCHAR", True]
    assert info["fields"]["vector"][0] == "FLOAT_VECTOR" and info["fields"]["vector"][2]["dim"] == 32
    assert info["fields"]["cluster"][0] == "INT64" and info["fields"]["metadata"][0] == "JSON"
    hnsw = info["indexes"]["vector"]
    assert hnsw["index_type"] == "HNSW" and hnsw["metric_type"] == "IP"
    assert hnsw["params"] == {"M": 16, "efConstruction": 200}
    assert "cluster" in info["indexes"]
    description = json.loads(info["description"])
    manifest = json.loads((fixture_bundle("tiny-gray") / "manifest.json").read_text())
    assert description["model"]["sha256"] == manifest["model_sha256"]

    # Another model on the same collection: a clear error at start, not a silent mix of vectors.
    other = tmp_path / "other"
    other.mkdir()
    for file in ("model.onnx", "manifest.json"):
        (other / file).write_bytes((fixture_bundle("tiny-gray") / file).read_bytes())
    changed = json.loads((other / "manifest.json").read_text())
    changed["name"] = "another-model"
    (other / "manifest.json").write_text(json.dumps(changed))
    result = subprocess.run([str(swav_bin), "serve", "--model", str(other), "--listen", "127.0.0.1:0", "--device", "cpu",
                             "--index", milvus.url(name)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "was built with model 'tiny-gray'" in result.stderr and "another-model" in result.stderr, result.stderr[-2000:]


def test_two_replicas_share_one_collection(swav_bin, milvus):
    url = milvus.url(collection())
    with swav_serve(swav_bin, url) as a, swav_serve(swav_bin, url) as b:
        assert a.call("POST", "/v1/items", {"items": items(IDS)})[0] == 200
        # Added through A: found through B by id and by search, at once (Strong reads).
        status, item, _ = b.call("GET", f"/v1/items/{quoted(IDS[3])}")
        assert status == 200 and item["metadata"]["n"] == 3
        status, body, _ = b.call("POST", "/v1/search?k=1", {"images": [b64(png(3))]})
        assert status == 200 and body["results"][0][0]["id"] == IDS[3]
        # Deleted through B: gone through A.
        assert b.call("DELETE", f"/v1/items/{quoted(IDS[3])}")[0] == 204
        assert a.call("GET", f"/v1/items/{quoted(IDS[3])}")[0] == 404
        status, body, _ = a.call("POST", "/v1/search?k=20", {"images": [b64(png(3))]})
        assert IDS[3] not in [h["id"] for h in body["results"][0]]
        assert a.call("GET", "/v1/index")[1]["items"] == b.call("GET", "/v1/index")[1]["items"] == len(IDS) - 1


@pytest.mark.parametrize("level", ["strong", "eventually"])
def test_index_build_into_milvus_resumes_and_the_cli_reads_it(swav_bin, tmp_path, milvus, level):
    """With the default level, and with `eventually` from SWAV_MILVUS_CONSISTENCY: the resume's
    presence query stays Strong at every level, so the second build skips all it stored."""
    env = {**os.environ, "SWAV_MILVUS_CONSISTENCY": level} if level != "strong" else None
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"{i}.png").write_bytes(png(i))
    url = milvus.url(collection())
    model = ["--model", str(fixture_bundle("tiny-gray")), "--device", "cpu"]

    def build() -> dict:
        out = subprocess.run([str(swav_bin), "index", "build", *model, "--input", str(images), "--out", url,
                              "--no-progress", "--batch-size", "5"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = build()
    assert (first["indexed"], first["already_present"]) == (12, 0)
    (images / "12.png").write_bytes(png(12))
    second = build()
    assert (second["indexed"], second["already_present"]) == (1, 12)

    out = subprocess.run([str(swav_bin), "index", "stats", url], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout)
    assert stats["backend"] == "milvus" and stats["consistency"] == level
    # Counted at `level`: an eventually read may not count the second build's item yet, written
    # after that build's (Strong) presence query made Milvus consume the first build's.
    assert stats["items"] == 13 if level == "strong" else stats["items"] in (12, 13), stats
    out = subprocess.run([str(swav_bin), "index", "search", url, *model, "--k", "1", str(images / "5.png")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["results"][0][0]["id"] == "5.png"


def effective_level(srv) -> str:
    """The Milvus consistency level in the configuration a server logged at start (with --log-format json)."""
    for line in srv.logs().splitlines():
        if line.startswith("{") and json.loads(line)["fields"].get("message") == "effective configuration":
            return json.loads(line)["fields"]["milvus_consistency"]
    raise AssertionError(f"no effective configuration logged: {srv.logs()[-2000:]}")


def test_session_reads_see_this_replicas_own_writes_at_once(swav_bin, milvus):
    """--milvus-consistency session: what a replica wrote, it reads back at once (get, search), a
    replacement included, and what it deleted is gone for it at once, item after item. Another
    replica deletes an item the first has just added: the delete's own existence check stays Strong,
    so it is a 204, not a 404."""
    url = milvus.url(collection())
    session = ("--milvus-consistency", "session", "--log-format", "json")
    with swav_serve(swav_bin, url, *session) as a, swav_serve(swav_bin, url, *session) as b:
        assert a.call("GET", "/v1/index")[1]["consistency"] == "session" and effective_level(a) == "session"
        added = items(IDS)
        for i in range(6):
            id = IDS[i]
            assert a.call("POST", "/v1/items", {"items": [added[i]]})[0] == 200
            status, item, _ = a.call("GET", f"/v1/items/{quoted(id)}")
            assert status == 200 and item["metadata"]["n"] == i, (id, status, item)
            status, body, _ = a.call("POST", "/v1/search?k=1", {"images": [b64(png(i))]})
            assert status == 200 and [h["id"] for h in body["results"][0]] == [id], (id, body)
            assert a.call("POST", "/v1/items", {"items": [{**added[i], "metadata": {"n": -i}}]})[0] == 200
            assert a.call("GET", f"/v1/items/{quoted(id)}")[1]["metadata"] == {"n": -i}, id
            assert a.call("DELETE", f"/v1/items/{quoted(id)}")[0] == 204
            assert a.call("GET", f"/v1/items/{quoted(id)}")[0] == 404, id
            status, body, _ = a.call("POST", "/v1/search?k=20", {"images": [b64(png(i))]})
            assert status == 200 and id not in [h["id"] for h in body["results"][0]], (id, body)
        for i in range(6, 9):
            assert a.call("POST", "/v1/items", {"items": [added[i]]})[0] == 200
            assert b.call("DELETE", f"/v1/items/{quoted(IDS[i])}")[0] == 204, IDS[i]
            assert b.call("GET", f"/v1/items/{quoted(IDS[i])}")[0] == 404, IDS[i]


def test_bounded_and_eventually_are_accepted_reported_and_answer(swav_bin, milvus):
    """Both weaker levels start, say so in /v1/index and in the logged configuration, and answer
    searches. A Strong read after the writes made the (single) query node consume them, so reads at
    any level after it see them too."""
    url = milvus.url(collection())
    with swav_serve(swav_bin, url) as strong:
        assert strong.call("POST", "/v1/items", {"items": items(IDS)})[0] == 200
        stats = strong.call("GET", "/v1/index")[1]
        assert (stats["consistency"], stats["items"]) == ("strong", len(IDS)), stats
    for level in ("bounded", "eventually"):
        with swav_serve(swav_bin, url, "--milvus-consistency", level, "--log-format", "json") as srv:
            status, stats, _ = srv.call("GET", "/v1/index")
            assert status == 200 and stats["consistency"] == level and stats["items"] == len(IDS), stats
            assert effective_level(srv) == level
            status, body, _ = srv.call("POST", "/v1/search?k=3", {"images": [b64(png(7))]})
            assert status == 200 and body["results"][0][0]["id"] == IDS[7], (level, body)
            status, body, _ = srv.call("POST", "/v1/search?k=3", {"id": IDS[7]})
            assert status == 200 and len(body["results"][0]) == 3, (level, body)
            assert srv.call("GET", f"/v1/items/{quoted(IDS[4])}")[1]["metadata"]["n"] == 4
            assert sum(c["size"] for c in srv.call("GET", "/v1/clusters")[1]["clusters"]) == len(IDS)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_unknown_consistency_level_is_refused(swav_bin, how):
    """By the command line, before anything connects (nothing listens at this address)."""
    url = "milvus://127.0.0.1:1/" + collection()
    for command in (["index", "stats", url], ["serve", "--model", str(fixture_bundle("tiny-gray")), "--index", url]):
        args, env = ([*command, "--milvus-consistency", "weak"], None) if how == "flag" else \
            (command, {**os.environ, "SWAV_MILVUS_CONSISTENCY": "weak"})
        out = subprocess.run([str(swav_bin), *args], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "invalid value 'weak'" in out.stderr and "[possible values: strong, session, bounded, eventually]" in out.stderr, out.stderr


def fashion_mnist_test_images(swav_bin: Path, out: Path) -> list[Path]:
    """The 10,000 Fashion-MNIST test images as OUT/<class>/<n>.png, by `swav dataset` from Debian's IDX files."""
    result = subprocess.run([str(swav_bin), "dataset", "fashion-mnist", "--split", "test", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(out.rglob("*.png"))
    assert len(files) == 10_000, len(files)
    return files


def index_build(swav_bin: Path, model: list[str], images: Path, out: str) -> dict:
    # In the images' parent folder: a build into Milvus writes its list of refused files in the current one.
    result = subprocess.run([str(swav_bin), "index", "build", *model, "--input", str(images), "--out", out, "--no-progress"],
                            capture_output=True, text=True, timeout=600, cwd=images.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def searched(srv, files: list[Path], k: int) -> list[list[str]]:
    """The ids /v1/search finds for each image in `files`, asked IMAGES_PER_SEARCH images per request
    from a few threads, as a client with many queries would."""
    chunks = [files[i:i + IMAGES_PER_SEARCH] for i in range(0, len(files), IMAGES_PER_SEARCH)]

    def one(chunk: list[Path]) -> list[list[str]]:
        status, body, _ = srv.call("POST", f"/v1/search?k={k}", {"images": [b64(p.read_bytes()) for p in chunk]},
                                   timeout=300)
        assert status == 200, body
        return [[h["id"] for h in hits] for hits in body["results"]]

    with ThreadPoolExecutor(4) as pool:
        return [ids for part in pool.map(one, chunks) for ids in part]


def knn_accuracy(neighbours: list[list[str]], ids: list[str]) -> float:
    """benchmarks/bench_index.py's kNN: the majority class of the KNN_K nearest, ties to the nearer
    neighbour's class (Counter keeps first-seen order), the class being an id's folder."""
    votes = [collections.Counter(id.split("/")[0] for id in n).most_common(1)[0][0] for n in neighbours]
    return float(np.mean([vote == id.split("/")[0] for vote, id in zip(votes, ids)]))


def test_milvus_agrees_with_exact_search_and_the_local_index_on_fashion_mnist(swav_bin, tmp_path, milvus):
    """The issue's agreement check, with the default model on the 10,000 Fashion-MNIST test images,
    indexed by `swav index build` into Milvus and into a directory. Every image is then a query
    against all the others (leave-one-out: k+1 asked, the image's own id dropped): recall@10 of the
    Milvus-backed /v1/search against exact search over the server's own embeddings, and kNN accuracy
    through Milvus against through the local index."""
    model_dir = REPO / "models" / "fashion-mnist"
    model = ["--model", str(model_dir), "--device", "cpu"]
    images = tmp_path / "test"
    files = fashion_mnist_test_images(swav_bin, images)
    ids = [str(p.relative_to(images)) for p in files]
    url, local = milvus.url(collection()), str(tmp_path / "index")
    for out in (url, local):
        report = index_build(swav_bin, model, images, out)
        assert report["indexed"] == len(files), report

    serve = ["--max-images-per-request", str(IMAGES_PER_SEARCH), "--intra-threads", "2", "--max-batch-size", "64"]
    with swav_serve(swav_bin, url, *serve, model=model_dir) as remote:
        assert remote.call("GET", "/v1/index")[1]["items"] == len(files)
        # The same embeddings the index holds: exact search is brute force over them.
        vectors = []
        for start in range(0, len(files), IMAGES_PER_SEARCH):
            chunk = files[start:start + IMAGES_PER_SEARCH]
            status, body, _ = remote.call("POST", "/v1/embed", {"images": [b64(p.read_bytes()) for p in chunk]}, timeout=300)
            assert status == 200, body
            vectors += body["embeddings"]
        through_milvus = searched(remote, files, KNN_K + 1)
    with swav_serve(swav_bin, local, *serve, model=model_dir) as here:
        through_local = searched(here, files, KNN_K + 1)

    def leave_out(found: list[list[str]]) -> list[list[str]]:
        return [[h for h in hits if h != own][:KNN_K] for hits, own in zip(found, ids)]

    through_milvus, through_local = leave_out(through_milvus), leave_out(through_local)
    e = np.array(vectors, dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    found = 0
    for start in range(0, len(e), 1000):
        sims = e[start:start + 1000] @ e.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        for i, row in enumerate(top):
            found += len({ids[j] for j in row} & set(through_milvus[start + i][:10]))
    recall = found / (10 * len(files))
    milvus_acc, local_acc = knn_accuracy(through_milvus, ids), knn_accuracy(through_local, ids)
    print(f"recall@10 through Milvus {recall:.4f}; kNN accuracy (k={KNN_K}) Milvus {100 * milvus_acc:.2f} %, "
          f"local {100 * local_acc:.2f} %")
    assert recall >= 0.98, recall
    assert abs(milvus_acc - local_acc) <= 0.005, (milvus_acc, local_acc)


def test_milvus_down_is_a_quick_503_and_acknowledged_items_survive_its_restart(swav_bin, milvus):
    """Last in the module: it stops the module's Milvus and starts it again while a writer keeps
    adding items one by one."""
    url = milvus.url(collection())
    with swav_serve(swav_bin, url, "--milvus-timeout", str(TIMEOUT_S)) as srv:
        assert srv.call("POST", "/v1/items", {"items": items(IDS[:8])})[0] == 200
        acknowledged = set(IDS[:8])
        answers: list[tuple[int, float]] = []
        stop = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                id = f"during/{n}"
                started = time.monotonic()
                status, _, _ = srv.call("POST", "/v1/items", {"items": [{"id": id, "image": b64(png(n))}]},
                                        timeout=TIMEOUT_S * 4)
                answers.append((status, time.monotonic() - started))
                if status == 200:
                    acknowledged.add(id)
                n += 1
                time.sleep(0.05)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            time.sleep(2)
            milvus.stop()
            for method, path, body in [("GET", f"/v1/items/{quoted(IDS[0])}", None),
                                       ("POST", "/v1/search?k=3", {"id": IDS[0]}),
                                       ("POST", "/v1/items", {"items": items(IDS[8:9])}),
                                       ("GET", "/v1/clusters", None),
                                       ("GET", "/ready", None)]:
                started = time.monotonic()
                status, answer, headers = srv.call(method, path, body, timeout=TIMEOUT_S * 4)
                took = time.monotonic() - started
                assert (status, answer["error"]["code"]) == (503, "index_unavailable"), (path, answer)
                assert headers.get("Retry-After") == "1", (path, headers)
                assert took < TIMEOUT_S * 2 + 1, f"{path} took {took:.1f} s with Milvus down"
        finally:
            milvus.start()
        deadline = time.monotonic() + 180
        while srv.call("GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, "swav did not become ready again after Milvus restarted"
            time.sleep(1)
        time.sleep(2)
        stop.set()
        thread.join(timeout=60)
        statuses = {status for status, _ in answers}
        assert statuses <= {200, 503} and 503 in statuses, answers
        assert answers[-1][0] == 200, "writes did not succeed again after the restart"
        assert max(took for _, took in answers) < TIMEOUT_S * 2 + 1, answers
        for id in sorted(acknowledged):
            status, item, _ = srv.call("GET", f"/v1/items/{quoted(id)}")
            assert status == 200, (id, item)
        assert srv.call("GET", "/v1/index")[1]["items"] >= len(acknowledged)
        metrics = urllib.request.urlopen(srv.base + "/metrics", timeout=30).read().decode()
        errors = [line for line in metrics.splitlines()
                  if line.startswith("swav_index_store_errors_total") and 'kind="unavailable"' in line]
        assert errors and any(float(line.split()[-1]) > 0 for line in errors), errors
