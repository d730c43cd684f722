/* The gallery page: filters, pages, the full view with its infotext, and side-by-side
   comparison. Inlined into index.html by render.gallery, which puts the data in the
   <script id="gallery-data"> block. Everything user-made reaches the page through
   textContent and attributes only (never innerHTML), so a prompt cannot inject markup.
   The state lives in the URL hash (#job=cabins&q=winter&a.cfg=5&page=2): links and
   reloads keep the view. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("gallery-data").textContent);
  const JOBS = DATA.jobs;
  const IMAGES = DATA.images;
  const FAILED = DATA.failed;
  const PAGE_SIZES = [50, 100, 200, 500];
  const state = { job: "", q: "", axes: {}, page: 1, size: 100, chosen: [] };

  IMAGES.forEach(function (im, n) {
    im.key = n;
    im.hay = [JOBS[im.j].name, im.n, im.x].join("\n").toLowerCase();
  });
  FAILED.forEach(function (f) {
    f.hay = [JOBS[f.j].name, f.p, f.err].join("\n").toLowerCase();
  });

  // -- small helpers ------------------------------------------------------------------------
  function el(tag, attrs) {
    const node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), attrs[k]);
      else node.setAttribute(k, attrs[k]);
    });
    for (let i = 2; i < arguments.length; i++) {
      const kid = arguments[i];
      if (kid !== null && kid !== undefined) node.append(kid);
    }
    return node;
  }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
  /* A file name that may wrap only after "-", "_" or ".", never inside a word. */
  function breakable(text) {
    const span = el("span", { class: "name", title: text });
    text.split(/(?<=[-_.])/).forEach(function (part, n) {
      if (n) span.append(el("wbr"));
      span.append(part);
    });
    return span;
  }
  /* A <select> of [value, text] options with ``current`` chosen; ``change(value)`` on change. */
  function selectBox(attrs, options, current, change) {
    const select = el("select", attrs, ...options.map(function (o) {
      const option = el("option", { value: o[0], text: o[1] });
      if (o[0] === current) option.selected = true;
      return option;
    }));
    select.addEventListener("change", function () { change(select.value); });
    return select;
  }
  function markSmall(img) {
    img.addEventListener("load", function () {
      if (img.naturalWidth && img.naturalWidth < 128 && img.naturalHeight < 128) {
        img.classList.add("small");
      }
    });
  }
  function media(item, full) {
    if (item.k === "missing") return el("div", { class: "missing", text: "missing: " + item.n });
    if (item.k === "video") {
      return el("video", { src: item.f, poster: item.t || "", muted: "", loop: "",
        autoplay: "", playsinline: "", controls: "", preload: full ? "auto" : "none" });
    }
    if (item.k === "file") return el("a", { href: item.f, text: item.n });
    const src = full || item.k === "anim" ? item.f : item.t;
    const img = el("img", { src: src, alt: item.n, loading: "lazy" });
    markSmall(img);
    return img;
  }

  // -- the state in the hash ----------------------------------------------------------------
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.job = params.get("job") || "";
    state.q = params.get("q") || "";
    state.axes = {};
    params.forEach(function (value, key) {
      if (key.slice(0, 2) === "a.") state.axes[key.slice(2)] = value;
    });
    state.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    const size = parseInt(params.get("size") || "100", 10);
    state.size = PAGE_SIZES.indexOf(size) >= 0 ? size : 100;
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.job) params.set("job", state.job);
    if (state.q) params.set("q", state.q);
    Object.keys(state.axes).forEach(function (k) { params.set("a." + k, state.axes[k]); });
    if (state.page > 1) params.set("page", String(state.page));
    if (state.size !== 100) params.set("size", String(state.size));
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  // -- filtering ----------------------------------------------------------------------------
  function inJob(item) { return !state.job || JOBS[item.j].name === state.job; }
  function matches(item) {
    if (!inJob(item)) return false;
    for (const k in state.axes) {
      if (!(k in item.a) || item.a[k] !== state.axes[k]) return false;
    }
    return !state.q || item.hay.indexOf(state.q.toLowerCase()) >= 0;
  }
  /* Every axis of the images in view, with its values in first-seen order. */
  function axisValues() {
    const axes = {};
    IMAGES.concat(FAILED).forEach(function (item) {
      if (!inJob(item)) return;
      Object.keys(item.a).forEach(function (k) {
        const values = axes[k] || (axes[k] = []);
        if (values.indexOf(item.a[k]) < 0) values.push(item.a[k]);
      });
    });
    return axes;
  }

  // -- drawing ------------------------------------------------------------------------------
  const root = document.getElementById("gallery");
  function draw() {
    const shown = IMAGES.filter(matches);
    const failed = FAILED.filter(matches);
    const pages = Math.max(1, Math.ceil(shown.length / state.size));
    state.page = Math.min(state.page, pages);
    root.replaceChildren(controls(shown.length, failed.length), sheets());
    const start = (state.page - 1) * state.size;
    const title = state.job || state.q || Object.keys(state.axes).length ? "Images (filtered)" : "Images";
    root.append(el("h2", { id: "images", text: title + " · " + shown.length }));
    if (shown.length) {
      root.append(pager(pages), el("div", { class: "cards" },
        ...shown.slice(start, start + state.size).map(function (im) { return card(im, shown); })),
        pager(pages));
    } else {
      root.append(el("p", { class: "empty", text: "No image matches." }));
    }
    if (failed.length) {
      root.append(el("h2", { id: "failed", text: "Failed · " + failed.length }),
        el("ul", { class: "failures" }, ...failed.map(failure)));
    }
    writeHash();
  }

  function controls(count, failedCount) {
    const jobSelect = selectBox({ id: "job-filter", "aria-label": "job" },
      [["", "all jobs (" + JOBS.length + ")"]].concat(JOBS.map(function (j) {
        return [j.name, j.name + " (" + j.done + ")"]; })),
      state.job, function (value) { state.job = value; state.axes = {}; state.page = 1; draw(); });
    const search = el("input", { type: "search", id: "text-filter", placeholder: "prompt, settings, file name",
      "aria-label": "text", value: state.q });
    search.addEventListener("change", function () { state.q = search.value; state.page = 1; draw(); });
    search.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { state.q = search.value; state.page = 1; draw(); }
    });
    const parts = [el("label", {}, "Job ", jobSelect), el("label", {}, "Search ", search)];
    const axes = axisValues();
    Object.keys(axes).forEach(function (k) {
      // all jobs: only the seed (every job has one); one job: each of its axes that varies
      if (!state.job && k !== "seed" && !(k in state.axes)) return;
      if (axes[k].length < 2 && !(k in state.axes)) return;
      const select = selectBox({ class: "axis-filter", "data-axis": k, "aria-label": k },
        [["", "any"]].concat(axes[k].map(function (v) { return [v, v]; })),
        state.axes[k] === undefined ? "" : state.axes[k], function (value) {
          if (value === "") delete state.axes[k]; else state.axes[k] = value;
          state.page = 1; draw();
        });
      parts.push(el("label", {}, k + " ", select));
    });
    const compare = el("button", { id: "compare", class: state.chosen.length === 2 ? "primary" : "",
      text: "Compare (" + state.chosen.length + "/2)", onclick: openCompare });
    compare.disabled = state.chosen.length !== 2;
    parts.push(compare);
    if (state.job || state.q || Object.keys(state.axes).length) {
      parts.push(el("button", { id: "clear", text: "Clear filters", onclick: function () {
        state.job = ""; state.q = ""; state.axes = {}; state.page = 1; draw(); } }));
    }
    const summary = document.getElementById("summary");
    summary.textContent = plural(DATA.total_done, "image") + ", " + DATA.total_failed + " failed, "
      + plural(JOBS.length, "job") + " · showing " + count + " and " + failedCount + " failed · updated " + DATA.updated;
    return el("div", { class: "controls" }, ...parts);
  }

  function pager(pages) {
    const prev = el("button", { class: "prev", text: "← Previous", onclick: function () { state.page--; draw(); } });
    const next = el("button", { class: "next", text: "Next →", onclick: function () { state.page++; draw(); } });
    prev.disabled = state.page <= 1;
    next.disabled = state.page >= pages;
    const size = selectBox({ "aria-label": "per page" },
      PAGE_SIZES.map(function (n) { return [String(n), n + " per page"]; }), String(state.size),
      function (value) { state.size = parseInt(value, 10); state.page = 1; draw(); });
    return el("div", { class: "pager" }, prev, el("span", { class: "page", text: "page " + state.page + " of " + pages }), next, size);
  }

  function sheets() {
    const box = el("section", { id: "sheets" });
    JOBS.forEach(function (job) {
      if ((state.job && job.name !== state.job) || !job.sheets.length) return;
      box.append(el("h3", { text: job.name + " · " + plural(job.sheets.length, "grid sheet") }),
        el("div", { class: "sheets" }, ...job.sheets.map(function (s, n) {
          const img = el("img", { src: s.t || s.f, alt: s.n, loading: "lazy" });
          return el("figure", { class: "sheet", "data-name": s.n },
            el("button", { class: "thumb", title: "open " + s.n,
              onclick: function () { openViewer(job.sheets.map(sheetItem), n); } }, img),
            el("figcaption", { class: "caption" }, breakable(s.n)));
        })));
    });
    if (box.childNodes.length) box.prepend(el("h2", { text: "Grid sheets" }));
    return box;
  }
  function sheetItem(s) { return { k: "image", f: s.f, t: s.t, n: s.n, x: s.x, sheet: true }; }

  function card(im, list) {
    const chosen = state.chosen.indexOf(im.key) >= 0;
    const box = el("input", { type: "checkbox", class: "choose", "aria-label": "compare " + im.n });
    box.checked = chosen;
    box.addEventListener("change", function () { choose(im.key, box.checked); });
    const axes = Object.keys(im.a).filter(function (k) { return k !== "seed"; })
      .map(function (k) { return k + ": " + im.a[k]; }).join(" · ");
    return el("figure", { class: "card" + (chosen ? " chosen" : ""), "data-key": String(im.key), "data-name": im.n },
      el("button", { class: "thumb", title: "open " + im.n,
        onclick: function () { openViewer(list, list.indexOf(im)); } }, media(im, false)),
      el("label", { class: "pick" }, box, " compare"),
      el("figcaption", { class: "caption" },
        el("div", { text: JOBS[im.j].name + " · #" + im.i + " · seed " + im.s }),
        axes ? el("div", { class: "axes", text: axes }) : null,
        breakable(im.n)));
  }

  function failure(f) {
    return el("li", { class: "failure" },
      el("div", { text: JOBS[f.j].name + " · #" + f.i + " · seed " + f.s + " · " + f.id }),
      f.p ? el("div", { text: f.p }) : null,
      el("pre", { class: "error", text: f.err }));
  }

  function choose(key, on) {
    state.chosen = state.chosen.filter(function (k) { return k !== key; });
    if (on) state.chosen.push(key);
    if (state.chosen.length > 2) state.chosen.shift();
    draw();
  }

  // -- the full view and the comparison -----------------------------------------------------
  const overlay = document.getElementById("overlay");
  let viewer = null;
  function closeOverlay() { overlay.hidden = true; overlay.replaceChildren(); viewer = null; }
  function copyButton(text) {
    const button = el("button", { class: "copy", text: "Copy infotext" });
    button.addEventListener("click", function () {
      const done = function () { button.textContent = "Copied"; };
      const fallback = function () {
        const area = el("textarea", {});
        area.value = text;
        document.body.append(area);
        area.select();
        try { document.execCommand("copy"); done(); } catch (e) { button.textContent = "Copy failed"; }
        area.remove();
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, fallback);
      } else {
        fallback();
      }
    });
    return button;
  }
  function openViewer(list, n) {
    viewer = { list: list, n: n };
    showViewer();
  }
  function showViewer() {
    const item = viewer.list[viewer.n];
    const label = item.sheet ? item.n : JOBS[item.j].name + " · #" + item.i + " · seed " + item.s + " · " + item.n;
    const prev = el("button", { class: "prev", text: "←", title: "previous", onclick: function () { step(-1); } });
    const next = el("button", { class: "next", text: "→", title: "next", onclick: function () { step(1); } });
    prev.disabled = viewer.n <= 0;
    next.disabled = viewer.n >= viewer.list.length - 1;
    const extras = (item.e || []).map(function (e) { return el("a", { href: e[1], text: e[0] }); });
    overlay.replaceChildren(
      el("div", { class: "bar" }, el("span", { class: "title", text: label }), prev, next,
        item.x ? copyButton(item.x) : null, el("a", { href: item.f, text: "open file" }), ...extras,
        el("button", { class: "close", text: "Close", onclick: closeOverlay })),
      el("div", { class: "body" }, el("div", { class: "pane" },
        el("div", { class: "media" }, media(item, true)),
        item.x ? el("pre", { class: "infotext", text: item.x }) : el("p", { class: "note", text: "no infotext" }))));
    overlay.hidden = false;
  }
  function step(d) {
    const n = viewer.n + d;
    if (n >= 0 && n < viewer.list.length) { viewer.n = n; showViewer(); }
  }

  /* A1111's infotext: prompt, "Negative prompt:" line, then "Key: value, ..." parameters. */
  function parseInfotext(text) {
    const lines = (text || "").trim().split("\n");
    const fields = {};
    const last = lines.length > 1 ? lines[lines.length - 1] : "";
    const re = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
    let m;
    let found = 0;
    while ((m = re.exec(last)) !== null && m[0].length) { fields[m[1]] = m[2]; found++; }
    const body = found >= 3 ? lines.slice(0, -1) : lines;
    const neg = body.findIndex(function (l) { return l.indexOf("Negative prompt:") === 0; });
    const prompt = (neg < 0 ? body : body.slice(0, neg)).join("\n");
    const out = { Prompt: prompt };
    if (neg >= 0) out["Negative prompt"] = body.slice(neg).join("\n").replace(/^Negative prompt:\s*/, "");
    Object.keys(fields).forEach(function (k) { out[k] = fields[k]; });
    return out;
  }
  function openCompare() {
    if (state.chosen.length !== 2) return;
    const pair = state.chosen.map(function (k) { return IMAGES[k]; });
    const parsed = pair.map(function (im) { return parseInfotext(im.x); });
    const keys = [];
    parsed.forEach(function (p) { Object.keys(p).forEach(function (k) { if (keys.indexOf(k) < 0) keys.push(k); }); });
    const rows = keys.map(function (k) {
      const a = parsed[0][k] === undefined ? "" : parsed[0][k];
      const b = parsed[1][k] === undefined ? "" : parsed[1][k];
      return el("tr", { class: a === b ? "same" : "differs" }, el("th", { text: k }), el("td", { text: a }), el("td", { text: b }));
    });
    const differs = rows.filter(function (r) { return r.className === "differs"; }).length;
    overlay.replaceChildren(
      el("div", { class: "bar" }, el("span", { class: "title", text: "Compare: " + pair.map(function (im) {
        return JOBS[im.j].name + " #" + im.i; }).join("  ↔  ") + " · " + plural(differs, "setting") + " differ" + (differs === 1 ? "s" : "") }),
        el("button", { class: "close", text: "Close", onclick: closeOverlay })),
      el("div", { class: "body compare" }, ...pair.map(function (im) {
        return el("div", { class: "pane" }, el("div", { class: "media" }, media(im, true)),
          el("div", { class: "note", text: JOBS[im.j].name + " · #" + im.i + " · " + im.n }));
      })),
      el("div", { class: "body" }, el("table", { class: "diff" },
        el("tr", {}, el("th", { text: "setting" }), el("th", { text: "left" }), el("th", { text: "right" })), ...rows)));
    overlay.hidden = false;
  }

  document.addEventListener("keydown", function (ev) {
    if (overlay.hidden) return;
    if (ev.key === "Escape") closeOverlay();
    else if (viewer && ev.key === "ArrowLeft") step(-1);
    else if (viewer && ev.key === "ArrowRight") step(1);
  });
  window.addEventListener("hashchange", function () { readHash(); draw(); });
  readHash();
  draw();
})();
