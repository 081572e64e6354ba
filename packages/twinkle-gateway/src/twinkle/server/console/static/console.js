// Live loss curve of a run page: polls the run's new steps and redraws the SVG polyline and the steps table.
(function () {
  "use strict";
  var svg = document.getElementById("loss-curve");
  if (!svg) { return; }
  var line = document.getElementById("loss-line");
  var caption = document.getElementById("loss-range");
  var count = document.getElementById("step-count");
  var body = document.querySelector("#steps tbody");
  var steps = JSON.parse(document.getElementById("loss-data").textContent || "[]");
  var after = Number(svg.dataset.after);
  var box = svg.viewBox.baseVal;

  function fmt(x, digits) { return x === null || x === undefined ? "\u2014" : Number(x).toPrecision(digits); }

  function draw() {
    var pts = steps.filter(function (s) { return s.loss !== null; });
    if (!pts.length) { return; }
    var xs = pts.map(function (s) { return s.step; }), ys = pts.map(function (s) { return s.loss; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var sx = (box.width - 20) / Math.max(x1 - x0, 1), sy = (box.height - 20) / (y1 > y0 ? y1 - y0 : 1);
    line.setAttribute("points", pts.map(function (s) {
      return (10 + (s.step - x0) * sx).toFixed(1) + "," + (box.height - 10 - (s.loss - y0) * sy).toFixed(1);
    }).join(" "));
    caption.textContent = "loss " + fmt(y1, 4) + " \u2192 " + fmt(pts[pts.length - 1].loss, 4) + " (low " + fmt(y0, 4) + ")";
    count.textContent = String(steps.length);
  }

  function addRow(s) {
    var tr = document.createElement("tr");
    [s.step, fmt(s.loss, 5), s.tokens, s.learning_rate === null ? "\u2014" : s.learning_rate, fmt(s.grad_norm, 4),
     new Date(s.time * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"].forEach(function (v) {
      var td = document.createElement("td");
      td.textContent = String(v);  // text only: nothing from the server is parsed as HTML
      tr.appendChild(td);
    });
    body.insertBefore(tr, body.firstChild);
  }

  function poll() {
    fetch(svg.dataset.history + "?after=" + after, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : { steps: [] }; })
      .then(function (data) {
        (data.steps || []).forEach(function (s) { steps.push(s); addRow(s); after = s.step; });
        if (data.steps && data.steps.length) { svg.dataset.after = String(after); draw(); }
      })
      .catch(function () { /* a missed poll is retried on the next tick */ })
      .finally(function () { setTimeout(poll, 2000); });
  }

  setTimeout(poll, 2000);
}());
