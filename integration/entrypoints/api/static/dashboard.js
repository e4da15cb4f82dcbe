// Draws the dashboard's plots with the vendored uPlot from data the server put in <script type="application/json">.
// No network requests: everything a plot needs is on the page.
(function () {
  "use strict";
  var COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"];
  var plots = [];

  function data(el) {
    return JSON.parse(document.getElementById(el.dataset.source).textContent);
  }

  function width(el) {
    return Math.max(200, Math.floor(el.clientWidth || el.parentElement.clientWidth));
  }

  function make(el, opts, rows) {
    opts.width = width(el);
    var plot = new uPlot(opts, rows, el);
    el.dataset.drawn = String(rows.length > 0 ? rows[0].length : 0);
    plots.push([el, plot]);
    return plot;
  }

  function latency(el) {
    var d = data(el);
    var key = el.dataset.key;
    var series = [{}];
    d.stages.forEach(function (stage, i) {
      series.push({label: stage, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: false,
                   points: {show: true, size: 6}});
    });
    make(el, {
      title: el.dataset.title, height: 240, series: series,
      scales: {x: {time: true, range: d.range}, y: {distr: 3}},
      axes: [{}, {label: "seconds", size: 60}],
    }, [d.times].concat(d[key]));
  }

  function risk(el) {
    var d = data(el);
    make(el, {
      title: el.dataset.title, height: 200,
      scales: {x: {time: true, range: d.range}, y: {range: [0, 1]}},
      series: [{}, {label: "probability", stroke: "#d62728", width: 2, points: {show: true, size: 6}}],
      axes: [{}, {label: "probability", size: 60}],
    }, d.data);
  }

  // One plot per vital sign, every one over the whole window the model saw. The boxes are laid out first, so
  // each plot is sized to its final grid cell.
  function vitals(container) {
    var d = data(container);
    var boxes = d.plots.map(function (v) {
      var el = document.createElement("div");
      el.className = "plot";
      el.id = "plot-vital-" + v.key;
      container.appendChild(el);
      return el;
    });
    d.plots.forEach(function (v, i) {
      make(boxes[i], {
        title: v.label + " (" + v.unit + ")", height: 160,
        scales: {x: {time: true, range: [d.start, d.end]}},
        series: [{}, {label: v.label, stroke: COLOURS[i % COLOURS.length], width: 1.5, points: {show: true, size: 4}}],
        axes: [{}, {size: 55}],
      }, v.data);
    });
  }

  function draw() {
    var kinds = {latency: latency, risk: risk, vitals: vitals};
    document.querySelectorAll("[data-plot]").forEach(function (el) {
      kinds[el.dataset.plot](el);
    });
    document.body.dataset.plotsReady = String(plots.length);
  }

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      plots.forEach(function (p) { p[1].setSize({width: width(p[0]), height: p[1].height}); });
    }, 100);
  });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
