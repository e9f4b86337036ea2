// The swav web page. Plain JavaScript, no build step; it uses only the public /v1 API.
// Ids and metadata are user data: they only ever reach the page through textContent or
// attribute values, never through HTML parsing.
'use strict';

const KEY_STORAGE = 'swav.apiKey';
const PAGE_SIZE = 48;
const NEIGHBOURS = 12;
const EXAMPLES_PER_CLUSTER = 5;
const THUMB_CACHE_LIMIT = 3000;

const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  cluster: { id: null, offset: 0 },
  item: null,
  searchSeq: 0,
  // A message for the next view (set before navigating to it).
  flash: '',
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ------------------------------------------------------------------ API access

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set('Authorization', 'Bearer ' + key);
  const res = await fetch(path, { ...options, headers });
  if (res.ok) return res;
  let error = null;
  try {
    error = (await res.json()).error;
  } catch (_) {
    // Not our JSON error body; the status says enough.
  }
  const err = new ApiError(res.status, error ? error.code : 'http_' + res.status, error ? error.message : res.statusText);
  if (res.status === 401) askForKey(key ? 'The API key was refused: ' + err.message : '');
  throw err;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function itemPath(id) {
  // encodeURIComponent also encodes '/', so an id ending in "/thumbnail" is never mistaken
  // for the thumbnail route.
  return '/v1/items/' + encodeURIComponent(id);
}

// ------------------------------------------------------------------ status line

function setStatus(text, isError = false) {
  const el = $('status');
  el.textContent = text;
  el.classList.toggle('error', isError);
}

function report(err) {
  if (err instanceof ApiError && err.status === 401) return;
  setStatus(err instanceof ApiError ? `${err.code}: ${err.message}` : String(err), true);
}

// ------------------------------------------------------------------ thumbnails

// id -> Promise of a blob: URL (or null when the item has no thumbnail). Thumbnails are under
// /v1, so they are fetched with the key and shown from blob: URLs.
const thumbs = new Map();

function thumbUrl(id) {
  if (!thumbs.has(id)) {
    if (thumbs.size >= THUMB_CACHE_LIMIT) forgetThumbs();
    const p = api(itemPath(id) + '/thumbnail')
      .then((res) => res.blob())
      .then((blob) => URL.createObjectURL(blob))
      .catch(() => null);
    thumbs.set(id, p);
  }
  return thumbs.get(id);
}

function forgetThumb(id) {
  const p = thumbs.get(id);
  thumbs.delete(id);
  if (p) p.then((url) => url && URL.revokeObjectURL(url));
}

function forgetThumbs() {
  for (const id of Array.from(thumbs.keys())) forgetThumb(id);
}

function showImage(box, url, label) {
  const img = document.createElement('img');
  img.alt = label;
  img.addEventListener('load', () => {
    // Small images (Fashion-MNIST is 28 px) are scaled up; keep their pixels sharp.
    if (img.naturalWidth < 64) img.classList.add('pixelated');
  });
  img.src = url;
  box.replaceChildren(img);
  box.classList.remove('missing');
}

function thumbBox(id, extraClass) {
  const box = document.createElement('div');
  box.className = 'thumb' + (extraClass ? ' ' + extraClass : '');
  fillThumb(box, id);
  return box;
}

function fillThumb(box, id) {
  box.replaceChildren();
  box.classList.add('loading');
  thumbUrl(id).then((url) => {
    box.classList.remove('loading');
    if (url) {
      showImage(box, url, id);
    } else {
      box.classList.add('missing');
      box.textContent = 'no thumbnail';
    }
  });
}

// ------------------------------------------------------------------ building blocks

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function link(href, text, className) {
  const a = el('a', className, text);
  a.href = href;
  return a;
}

function itemHref(id) {
  return '#/item/' + encodeURIComponent(id);
}

// One result or member: its thumbnail (click: search from it), id, score, cluster, details link.
function itemCard(item) {
  const card = el('div', 'card');
  card.dataset.id = item.id;
  const box = thumbBox(item.id);
  box.title = 'Search from this item';
  box.classList.add('clickable');
  box.addEventListener('click', () => {
    location.hash = '#/search/' + encodeURIComponent(item.id);
  });
  card.append(box);
  card.append(link(itemHref(item.id), item.id, 'id'));
  const facts = el('div', 'facts');
  if (typeof item.score === 'number') facts.append(el('span', 'score', item.score.toFixed(3)));
  facts.append(link('#/cluster/' + item.cluster, 'cluster ' + item.cluster, 'cluster'));
  card.append(facts);
  return card;
}

// ------------------------------------------------------------------ views

const VIEWS = ['key', 'search', 'clusters', 'cluster', 'item'];

function show(view) {
  for (const v of VIEWS) $('view-' + v).hidden = v !== view;
  $('nav-search').classList.toggle('active', view === 'search');
  $('nav-clusters').classList.toggle('active', view === 'clusters' || view === 'cluster');
}

function askForKey(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  $('forget-key').hidden = true;
  $('key-error').textContent = message || '';
  show('key');
  $('key-input').focus();
}

async function route() {
  if (!state.model) return;
  setStatus(state.flash);
  state.flash = '';
  const m = /^#\/([a-z]+)(?:\/(.*))?$/.exec(location.hash) || [];
  const view = m[1] || 'search';
  const arg = m[2] === undefined ? null : decodeURIComponent(m[2]);
  try {
    if (view === 'clusters') {
      show('clusters');
      await loadClusters();
    } else if (view === 'cluster' && arg !== null) {
      show('cluster');
      await loadCluster(Number(arg.split('/')[0]), Number(arg.split('/')[1] || 0));
    } else if (view === 'item' && arg !== null) {
      show('item');
      await loadItem(arg);
    } else {
      show('search');
      if (arg !== null) await searchById(arg);
    }
  } catch (err) {
    report(err);
  }
}

// ------------------------------------------------------------------ search

function searchParams() {
  const params = new URLSearchParams();
  const k = parseInt($('k').value, 10);
  params.set('k', String(Number.isFinite(k) && k > 0 ? k : 24));
  const c = $('cluster-filter').value.trim();
  if (c !== '') params.set('cluster', c);
  return params;
}

async function searchByImage(file) {
  if (!file) return;
  const seq = ++state.searchSeq;
  if (location.hash !== '#/search') history.replaceState(null, '', '#/search');
  show('search');
  setStatus('Searching…');
  const box = $('query-image');
  showImage(box, URL.createObjectURL(file), file.name || 'query image');
  $('query-caption').textContent = file.name || 'pasted image';
  $('query').hidden = false;
  const body = { method: 'POST', body: file, headers: { 'Content-Type': file.type || 'application/octet-stream' } };
  // A model imported without prototypes answers /v1/assign with 409 no_prototypes: do not ask.
  const hasPrototypes = state.model.clusters === 'prototypes';
  try {
    const [assigned, found] = await Promise.all([
      hasPrototypes ? apiJson('/v1/assign?top_k=5', body) : Promise.resolve(null),
      apiJson('/v1/search?' + searchParams(), body),
    ]);
    if (seq !== state.searchSeq) return;
    if (assigned) showPrototypes(assigned.assignments[0]);
    else $('prototypes').hidden = true;
    showResults(found.results[0]);
    setStatus('');
  } catch (err) {
    report(err);
  }
}

async function searchById(id) {
  const seq = ++state.searchSeq;
  setStatus('Searching…');
  fillThumb($('query-image'), id);
  const caption = $('query-caption');
  caption.replaceChildren(link(itemHref(id), id, 'id'));
  $('query').hidden = false;
  $('prototypes').hidden = true;
  try {
    const item = await apiJson(itemPath(id));
    const found = await apiJson('/v1/search?' + searchParams(), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ id }),
    });
    if (seq !== state.searchSeq) return;
    caption.append(el('span', 'muted', ' · cluster ' + item.cluster));
    showResults(found.results[0]);
    setStatus('');
  } catch (err) {
    report(err);
  }
}

function showPrototypes(assignment) {
  const list = $('prototype-list');
  list.replaceChildren();
  // Bars relative to the most likely prototype: with many prototypes every probability is small.
  const top = Math.max(...assignment.top.map((p) => p.probability), 1e-9);
  for (const p of assignment.top) {
    const li = el('li');
    li.append(link('#/cluster/' + p.cluster, 'cluster ' + p.cluster));
    const bar = el('span', 'bar');
    bar.style.width = Math.max(1, Math.round((p.probability / top) * 80)) + 'px';
    li.append(bar, el('span', 'prob', (p.probability * 100).toFixed(1) + ' %'));
    list.append(li);
  }
  $('prototypes').hidden = false;
}

function showResults(hits) {
  $('results-title').hidden = false;
  $('results-title').textContent = hits.length ? `Nearest items (${hits.length})` : 'No items found';
  $('results').replaceChildren(...hits.map(itemCard));
}

// ------------------------------------------------------------------ clusters

async function loadClusters() {
  const { clusters } = await apiJson('/v1/clusters');
  clusters.sort((a, b) => b.size - a.size || a.id - b.id);
  $('cluster-count').textContent = `(${clusters.length})`;
  const cards = clusters.map((c) => {
    const card = el('a', 'cluster-card');
    card.href = '#/cluster/' + c.id;
    card.dataset.cluster = String(c.id);
    const head = el('div', 'cluster-head');
    head.append(el('strong', null, 'Cluster ' + c.id), el('span', 'size', c.size + (c.size === 1 ? ' item' : ' items')));
    const strip = el('div', 'strip');
    for (const id of c.examples.slice(0, EXAMPLES_PER_CLUSTER)) strip.append(thumbBox(id, 'small'));
    card.append(head, strip);
    return card;
  });
  $('clusters').replaceChildren(...cards);
  if (!clusters.length) $('clusters').append(el('p', 'muted', 'The index is empty.'));
}

async function loadCluster(id, offset) {
  state.cluster = { id, offset };
  $('cluster-title').textContent = 'Cluster ' + id;
  const page = await apiJson(`/v1/clusters/${id}/items?limit=${PAGE_SIZE}&offset=${offset}`);
  const last = Math.min(offset + page.items.length, page.total);
  $('cluster-total').textContent = `${page.total} ${page.total === 1 ? 'member' : 'members'}`;
  $('cluster-page').textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : '';
  $('cluster-prev').disabled = offset === 0;
  $('cluster-next').disabled = last >= page.total;
  $('cluster-items').replaceChildren(...page.items.map(itemCard));
}

// ------------------------------------------------------------------ item

async function loadItem(id) {
  const del = $('item-delete');
  del.textContent = 'Delete';
  del.classList.remove('armed');
  const item = await apiJson(itemPath(id));
  state.item = item;
  fillThumb($('item-image'), id);
  $('item-id').textContent = item.id;
  const cl = $('item-cluster');
  cl.textContent = String(item.cluster);
  cl.href = '#/cluster/' + item.cluster;
  $('item-metadata').textContent = item.metadata === null || item.metadata === undefined
    ? '(none)'
    : JSON.stringify(item.metadata, null, 2);
  const found = await apiJson('/v1/search?k=' + NEIGHBOURS, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ id }),
  });
  $('item-neighbours').replaceChildren(...found.results[0].map(itemCard));
}

// Two clicks: the first arms the button, the second deletes.
async function deleteItem() {
  const item = state.item;
  const del = $('item-delete');
  if (!item) return;
  if (!del.classList.contains('armed')) {
    del.classList.add('armed');
    del.textContent = 'Click again to delete';
    return;
  }
  try {
    await api(itemPath(item.id), { method: 'DELETE' });
    forgetThumb(item.id);
    state.item = null;
    state.flash = 'Deleted ' + item.id;
    location.hash = '#/cluster/' + item.cluster;
  } catch (err) {
    report(err);
  }
}

// ------------------------------------------------------------------ start

/** Clusters of the index: the model's prototypes, or k-means centroids of an imported backbone. */
function clusterCount(model) {
  if (model.clusters === 'prototypes') return model.num_prototypes;
  if (model.clusters === 'centroids') return model.outputs.centroid_scores.dim;
  return 0;
}

async function start() {
  try {
    state.model = await apiJson('/v1/model');
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) report(err);
    return;
  }
  $('model-name').textContent = state.model.name;
  const clusters = clusterCount(state.model);
  $('cluster-filter').max = String(clusters - 1);
  // Without prototypes or k-means centroids the index's items are not clustered.
  $('cluster-filter').parentElement.hidden = clusters === 0;
  $('nav-clusters').hidden = clusters === 0;
  $('forget-key').hidden = !apiKey();
  await route();
}

function wire() {
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('key-input').value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $('key-input').value = '';
    $('key-error').textContent = '';
    start();
  });
  $('forget-key').addEventListener('click', () => {
    forgetThumbs();
    state.model = null;
    askForKey('');
  });
  $('file-input').addEventListener('change', (e) => searchByImage(e.target.files[0]));
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    searchByImage(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    const file = Array.from(e.clipboardData ? e.clipboardData.files : []).find((f) => f.type.startsWith('image/'));
    if (file) searchByImage(file);
  });
  $('cluster-prev').addEventListener('click', () => {
    location.hash = `#/cluster/${state.cluster.id}/${Math.max(0, state.cluster.offset - PAGE_SIZE)}`;
  });
  $('cluster-next').addEventListener('click', () => {
    location.hash = `#/cluster/${state.cluster.id}/${state.cluster.offset + PAGE_SIZE}`;
  });
  $('item-search').addEventListener('click', () => {
    if (state.item) location.hash = '#/search/' + encodeURIComponent(state.item.id);
  });
  $('item-delete').addEventListener('click', deleteItem);
  window.addEventListener('hashchange', route);
}

wire();
start();
