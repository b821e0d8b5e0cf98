// Draws the charts of a page from the JSON embedded in it; plotly.js is served locally.
"use strict";

const config = { displayModeBar: false, responsive: true };
const layout = (xTitle, yTitle, extra = {}) => ({
  margin: { l: 52, r: 14, t: 10, b: 44 },
  xaxis: { title: { text: xTitle }, automargin: true },
  yaxis: { title: { text: yTitle }, automargin: true },
  showlegend: false,
  ...extra,
});

// A value as a tick label: two significant digits, no trailing zeros.
const label = (value) => String(Number(value.toPrecision(2)));

// Tick values for a log axis over [low, high]: 1, 2, 5 × 10^k inside it, or, over less than a
// factor of three, five geometrically spaced values.
function logTicks(low, high) {
  const ticks = [];
  for (let k = Math.floor(Math.log10(low)); k <= Math.ceil(Math.log10(high)); k++) {
    for (const m of [1, 2, 5]) {
      const value = m * 10 ** k;
      if (value >= low && value <= high) ticks.push(value);
    }
  }
  if (ticks.length >= 3) return ticks;
  return [0, 1, 2, 3, 4].map((i) => low * (high / low) ** (i / 4));
}

function message(element, text) {
  element.classList.add("chart-message");
  element.textContent = text;
}

function drawHistogram(element, histogram) {
  if (histogram.counts.length === 0) return message(element, "Never active on the corpus.");
  const { edges, counts } = histogram;
  const low = edges[0], high = edges[edges.length - 1];
  if (!(high > low)) {
    const total = counts.reduce((a, b) => a + b, 0);
    return message(element, `All ${total} firings have the same activation, ${label(low)}.`);
  }
  const centres = counts.map((_, i) => Math.sqrt(edges[i] * edges[i + 1]));
  const widths = counts.map((_, i) => edges[i + 1] - edges[i]);
  const ticks = logTicks(low, high);
  Plotly.newPlot(element, [{ type: "bar", x: centres, y: counts, width: widths, marker: { color: "#e8862a" },
    hovertemplate: "%{x:.3g}: %{y}<extra></extra>" }],
    layout("activation (log scale)", "firings", {
      xaxis: { type: "log", title: { text: "activation (log scale)" }, tickvals: ticks, ticktext: ticks.map(label), automargin: true },
    }), config);
}

function drawPositional(element, positional) {
  const rate = positional.firing_rate;
  if (rate.every((value) => value === 0)) return message(element, "Never active on the corpus.");
  const positions = rate.map((_, i) => i);
  // No mean where it never fires: null leaves a gap, and markers show lone points.
  Plotly.newPlot(element, [
    { x: positions, y: rate, name: "firing rate", mode: "lines", line: { color: "#e8862a" } },
    { x: positions, y: positional.mean_activation, name: "mean activation where it fires", yaxis: "y2",
      mode: "lines+markers", marker: { size: 4 }, line: { color: "#2563eb" }, connectgaps: false },
  ], layout("token position", "firing rate", {
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } },
    yaxis2: { overlaying: "y", side: "right", title: { text: "mean activation" }, automargin: true, rangemode: "tozero" },
    margin: { l: 52, r: 52, t: 34, b: 44 },
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
