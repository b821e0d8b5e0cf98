// Draws the charts of a page from the JSON embedded in it; plotly.js is served locally.
"use strict";

const layout = (xTitle, yTitle, extra = {}) => ({
  margin: { l: 48, r: 12, t: 8, b: 40 },
  xaxis: { title: { text: xTitle } },
  yaxis: { title: { text: yTitle } },
  showlegend: false,
  ...extra,
});
const config = { displayModeBar: false, responsive: true };

function drawHistogram(element, histogram) {
  const centres = histogram.counts.map((_, i) => Math.sqrt(histogram.edges[i] * histogram.edges[i + 1]));
  const widths = histogram.counts.map((_, i) => histogram.edges[i + 1] - histogram.edges[i]);
  Plotly.newPlot(element, [{ type: "bar", x: centres, y: histogram.counts, width: widths, marker: { color: "#e8862a" },
    hovertemplate: "%{x:.3g}: %{y}<extra></extra>" }],
    layout("activation (log scale)", "count", { xaxis: { type: "log", title: { text: "activation (log scale)" } } }), config);
}

function drawPositional(element, positional) {
  const positions = positional.firing_rate.map((_, i) => i);
  Plotly.newPlot(element, [
    { x: positions, y: positional.firing_rate, name: "firing rate", line: { color: "#e8862a" } },
    { x: positions, y: positional.mean_activation, name: "mean activation when active", yaxis: "y2", line: { color: "#2563eb" } },
  ], layout("token position", "firing rate", {
    showlegend: true, legend: { orientation: "h", y: -0.35 },
    yaxis2: { overlaying: "y", side: "right", title: { text: "mean act." } },
    margin: { l: 48, r: 48, t: 8, b: 60 },
  }), config);
}

function drawTraining(element, log) {
  const tokens = log.map((row) => row.tokens ?? row.step);
  const series = ["loss", "l0", "explained_variance", "dead"].filter((key) => key in (log[0] || {}));
  const axis = (i) => (i === 0 ? "" : String(i + 1));
  const extra = {};
  series.forEach((key, i) => {
    extra[`xaxis${axis(i)}`] = { title: { text: "tokens" } };
    extra[`yaxis${axis(i)}`] = { title: { text: key.replace("_", " ") }, type: key === "loss" ? "log" : "linear" };
  });
  Plotly.newPlot(element, series.map((key, i) => ({
    x: tokens, y: log.map((row) => row[key]), name: key, xaxis: `x${axis(i)}`, yaxis: `y${axis(i)}`,
    line: { color: "#c25400" },
  })), {
    grid: { rows: 1, columns: series.length, pattern: "independent" },
    margin: { l: 56, r: 10, t: 10, b: 44 }, showlegend: false, ...extra,
  }, config);
}

document.addEventListener("DOMContentLoaded", () => {
  const embedded = document.getElementById("chart-data");
  const data = embedded ? JSON.parse(embedded.textContent) : {};
  for (const element of document.querySelectorAll("[data-chart]")) {
    const kind = element.dataset.chart;
    if (kind === "histogram") drawHistogram(element, data.histogram);
    else if (kind === "positional") drawPositional(element, data.positional);
    else if (kind === "training") drawTraining(element, JSON.parse(document.getElementById(element.dataset.source).textContent));
  }
});
