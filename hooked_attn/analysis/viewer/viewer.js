// hooked_attn attention viewer: everything it needs is in this page (no network).
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("hooked-attn-data").textContent);
  var H = DATA.n_heads, Q = DATA.q_pos, K = DATA.k_pos, OFFSET = K - Q;
  var raw = atob(DATA.patterns);
  var bytes = new Uint8Array(raw.length);
  for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  var VALUES = new Float32Array(bytes.buffer);  // [layer head q_pos k_pos], little-endian float32
  if (VALUES.length !== DATA.layers.length * H * Q * K) throw new Error("hooked_attn viewer: pattern data has the wrong size");

  var state = { layer: DATA.start_layer || 0, head: String(DATA.start_head || 0), focus: K - 1, pinned: false,
                topk: DATA.top_k };
  var $ = function (id) { return document.getElementById(id); };

  function raw4(layer, head, q, k) { return VALUES[((layer * H + head) * Q + q) * K + k]; }
  // The weight query row q puts on key k in the selected layer and head ("mean": average over heads).
  function weight(q, k) {
    if (state.head !== "mean") return raw4(state.layer, +state.head, q, k);
    var sum = 0;
    for (var h = 0; h < H; h++) sum += raw4(state.layer, h, q, k);
    return sum / H;
  }
  function attendable(q, k) { return !DATA.causal || k <= q + OFFSET; }
  function show(token) {
    var out = token.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
    return out.length ? out : "\u2205";
  }
  function colour(w) {
    var a = Math.max(0, Math.min(1, w));
    var r = Math.round(255 - a * (255 - 8)), g = Math.round(255 - a * (255 - 48)), b = Math.round(255 - a * (255 - 107));
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function fmt(w) { return w.toFixed(4); }

  function fillSelect(select, options) {
    select.innerHTML = "";
    options.forEach(function (o) {
      var opt = document.createElement("option");
      opt.value = o[0]; opt.textContent = o[1]; select.appendChild(opt);
    });
  }

  function makeStrip(container, kind) {
    container.innerHTML = "";
    for (var p = 0; p < K; p++) {
      var span = document.createElement("span");
      span.className = "tok";
      span.dataset.pos = p;
      span.title = "position " + p;
      span.appendChild(document.createTextNode(show(DATA.tokens[p])));
      var pos = document.createElement("span");
      pos.className = "pos"; pos.textContent = p;
      span.appendChild(pos);
      span.addEventListener("mouseenter", onHover);
      span.addEventListener("click", onClick);
      container.appendChild(span);
    }
    container.dataset.kind = kind;
  }

  function onHover(event) {
    if (state.pinned) return;
    state.focus = +event.currentTarget.dataset.pos;
    render();
  }
  function onClick(event) {
    var pos = +event.currentTarget.dataset.pos;
    state.pinned = !(state.pinned && state.focus === pos);
    state.focus = pos;
    render();
  }

  function paint(span, w, masked) {
    span.classList.toggle("masked", masked === "masked");
    span.classList.toggle("none", masked === "none");
    if (masked) {
      span.style.background = "";
      span.classList.remove("dark");
      delete span.dataset.weight;
      span.title = "position " + span.dataset.pos + (masked === "masked" ? ": masked" : ": not a query");
      return;
    }
    span.style.background = colour(w);
    span.classList.toggle("dark", w > 0.55);
    span.dataset.weight = String(w);
    span.title = "position " + span.dataset.pos + ": " + fmt(w);
  }

  function topList(list, entries) {
    list.innerHTML = "";
    entries.sort(function (a, b) { return b[1] - a[1] || a[0] - b[0]; });
    entries.slice(0, state.topk).forEach(function (e) {
      var li = document.createElement("li");
      li.dataset.pos = e[0];
      li.dataset.weight = String(e[1]);
      var bar = document.createElement("span");
      bar.className = "bar"; bar.style.width = Math.round(80 * Math.max(0, e[1])) + "px";
      li.appendChild(bar);
      li.appendChild(document.createTextNode(e[0] + " " + JSON.stringify(DATA.tokens[e[0]]) + " " + fmt(e[1])));
      list.appendChild(li);
    });
  }

  function render() {
    var f = state.focus, q = f - OFFSET;
    var name = f + " " + JSON.stringify(DATA.tokens[f]);
    $("focus-to").textContent = name; $("focus-from").textContent = name;
    var to = $("tokens-to").children, from = $("tokens-from").children;
    var toEntries = [], fromEntries = [];
    for (var p = 0; p < K; p++) {
      to[p].classList.toggle("focus", p === f);
      from[p].classList.toggle("focus", p === f);
      // Strip 1: the focused token as a query, over every key p.
      if (q < 0) paint(to[p], 0, "none");
      else if (!attendable(q, p)) paint(to[p], 0, "masked");
      else { var wt = weight(q, p); paint(to[p], wt, ""); toEntries.push([p, wt]); }
      // Strip 2: every query p, over the focused token as a key.
      var qp = p - OFFSET;
      if (qp < 0) paint(from[p], 0, "none");
      else if (!attendable(qp, f)) paint(from[p], 0, "masked");
      else { var wf = weight(qp, f); paint(from[p], wf, ""); fromEntries.push([p, wf]); }
    }
    topList($("topk-to"), toEntries);
    topList($("topk-from"), fromEntries);
    drawGrid();
  }

  var CELL = Math.max(8, Math.min(28, Math.floor(640 / Math.max(K, 1))));
  var LABEL = 0;
  function drawGrid() {
    var canvas = $("grid"), ctx = canvas.getContext("2d");
    var font = Math.max(8, Math.min(12, CELL - 2)) + "px ui-monospace, Menlo, Consolas, monospace";
    ctx.font = font;
    LABEL = 8;
    for (var p = 0; p < K; p++) LABEL = Math.max(LABEL, ctx.measureText(show(DATA.tokens[p]).slice(0, 12)).width + 8);
    var ratio = window.devicePixelRatio || 1;
    var width = LABEL + K * CELL + 4, height = LABEL + Q * CELL + 4;
    canvas.width = width * ratio; canvas.height = height * ratio;
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = font; ctx.fillStyle = "#1f2328"; ctx.textBaseline = "middle";
    for (var k = 0; k < K; k++) {  // key labels, rotated
      ctx.save();
      ctx.translate(LABEL + k * CELL + CELL / 2, LABEL - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillStyle = k === state.focus ? "#d1242f" : "#1f2328";
      ctx.fillText(show(DATA.tokens[k]).slice(0, 12), 0, 0);
      ctx.restore();
    }
    ctx.textAlign = "right";
    for (var q = 0; q < Q; q++) {
      ctx.fillStyle = q + OFFSET === state.focus ? "#d1242f" : "#1f2328";
      ctx.fillText(show(DATA.tokens[q + OFFSET]).slice(0, 12), LABEL - 4, LABEL + q * CELL + CELL / 2);
      for (var kk = 0; kk < K; kk++) {
        var x = LABEL + kk * CELL, y = LABEL + q * CELL;
        if (attendable(q, kk)) {
          ctx.fillStyle = colour(weight(q, kk));
          ctx.fillRect(x, y, CELL, CELL);
        } else {
          ctx.fillStyle = "#ececec";
          ctx.fillRect(x, y, CELL, CELL);
          ctx.strokeStyle = "#c8c8c8"; ctx.lineWidth = 1;
          ctx.beginPath(); ctx.moveTo(x, y + CELL); ctx.lineTo(x + CELL, y); ctx.stroke();
        }
      }
    }
    var fq = state.focus - OFFSET;
    ctx.strokeStyle = "#d1242f"; ctx.lineWidth = 2;
    if (fq >= 0) ctx.strokeRect(LABEL, LABEL + fq * CELL, K * CELL, CELL);
    ctx.strokeRect(LABEL + state.focus * CELL, LABEL, CELL, Q * CELL);
    var headName = state.head === "mean" ? "mean of heads" : "head " + state.head;
    $("grid-name").textContent = "layer " + DATA.layers[state.layer] + ", " + headName;
  }

  function cellAt(event) {
    var rect = $("grid").getBoundingClientRect();
    var k = Math.floor((event.clientX - rect.left - LABEL) / CELL), q = Math.floor((event.clientY - rect.top - LABEL) / CELL);
    return (k >= 0 && k < K && q >= 0 && q < Q) ? [q, k] : null;
  }
  $("grid").addEventListener("mousemove", function (event) {
    var cell = cellAt(event), info = $("cell-info");
    if (!cell) { info.textContent = "hover a cell"; return; }
    var q = cell[0], k = cell[1];
    var what = attendable(q, k) ? fmt(weight(q, k)) : "masked";
    info.textContent = "query " + (q + OFFSET) + " " + JSON.stringify(DATA.tokens[q + OFFSET]) + " \u2192 key " + k + " " +
      JSON.stringify(DATA.tokens[k]) + ": " + what;
  });
  $("grid").addEventListener("click", function (event) {
    var cell = cellAt(event);
    if (!cell) return;
    state.focus = cell[0] + OFFSET; state.pinned = true; render();
  });

  fillSelect($("layer"), DATA.layers.map(function (l, i) { return [String(i), String(l)]; }));
  var heads = [];
  for (var h = 0; h < H; h++) heads.push([String(h), String(h)]);
  heads.push(["mean", "mean"]);
  fillSelect($("head"), heads);
  $("layer").value = String(state.layer);  // the page opens at the layer and head asked for
  $("head").value = state.head;
  $("topk").value = state.topk;
  $("layer").addEventListener("change", function (e) { state.layer = +e.target.value; render(); });
  $("head").addEventListener("change", function (e) { state.head = e.target.value; render(); });
  $("topk").addEventListener("change", function (e) { state.topk = Math.max(1, Math.floor(+e.target.value) || 1); render(); });
  makeStrip($("tokens-to"), "to");
  makeStrip($("tokens-from"), "from");
  render();
  document.body.dataset.ready = "1";
})();
