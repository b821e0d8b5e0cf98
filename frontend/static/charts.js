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

const RULE_COLOURS = { global: "#c25400", lowest_k: "#2563eb", fraction_of_max: "#1a7f37", quantile: "#7c3aed" };
const SAE_COLOURS = ["#c25400", "#2563eb", "#1a7f37", "#7c3aed", "#b42318", "#0e7490", "#a16207", "#4b5563"];
const Y_TITLES = { ce: "cross-entropy (nats)", mse: "MSE" };
const hasY = (points, y) => points.some((point) => point[y] !== null);
const legendAbove = { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } };

// Threshold ablation of one SAE: each rule's points, L0 against CE or MSE.
function drawAblation(element, ablation, y) {
  const rules = ablation.rules.filter((rule) => hasY(rule.points, y));
  if (rules.length === 0) return message(element, y === "ce" ? "No language model: no cross-entropy." : "No threshold ablation.");
  Plotly.newPlot(element, rules.map((rule) => ({
    x: rule.points.map((point) => point.l0), y: rule.points.map((point) => point[y]), name: rule.name,
    mode: "lines+markers", line: { color: RULE_COLOURS[rule.name] }, text: rule.points.map((point) => point.threshold),
    hovertemplate: `${rule.name}, knob %{text:.3g}: L0 %{x:.3g}, %{y:.4g}<extra></extra>`,
  })), layout("L0", Y_TITLES[y], { showlegend: true, legend: legendAbove, margin: { l: 56, r: 14, t: 34, b: 44 } }), config);
}

// SAEs side by side: each SAE's evaluation point, with its global-threshold curve through it.
function drawFrontier(element, overview, y) {
  const curves = overview.saes.map((sae, i) => {
    const global = sae.threshold_ablation.find((rule) => rule.name === "global");
    return { sae, colour: SAE_COLOURS[i % SAE_COLOURS.length], points: global ? global.points : [] };
  }).filter((curve) => hasY(curve.points, y));
  if (curves.length === 0) return message(element, "No SAE here has cross-entropy figures (no language model).");
  const traces = curves.flatMap(({ sae, colour, points }) => [
    { x: points.map((p) => p.l0), y: points.map((p) => p[y]), mode: "lines", line: { color: colour, dash: "dot" },
      name: sae.name, legendgroup: sae.name, showlegend: false, hovertemplate: `${sae.name} thresholded: L0 %{x:.3g}, %{y:.4g}<extra></extra>` },
    { x: [points[0].l0], y: [points[0][y]], mode: "markers", marker: { color: colour, size: 10 }, name: sae.name,
      legendgroup: sae.name, hovertemplate: `${sae.name}: L0 %{x:.3g}, %{y:.4g}<extra></extra>` },
  ]);
  Plotly.newPlot(element, traces, layout("L0 (evaluation contexts)", Y_TITLES[y], {
    showlegend: true, legend: legendAbove, margin: { l: 56, r: 14, t: 34, b: 44 },
  }), config);
}

// Best decoder cosines of one SAE's live latents in another.
function drawCosines(element, histogram) {
  const { edges, counts } = histogram;
  const centres = counts.map((_, i) => (edges[i] + edges[i + 1]) / 2);
  Plotly.newPlot(element, [{ type: "bar", x: centres, y: counts, width: edges[1] - edges[0], marker: { color: "#e8862a" },
    hovertemplate: "%{x:.2f}: %{y} latents<extra></extra>" }],
    layout("best decoder cosine", "live latents", { xaxis: { title: { text: "best decoder cosine" }, range: [0, 1] } }), config);
}

const embeddedData = (element) => JSON.parse(document.getElementById(element.dataset.source).textContent);

document.addEventListener("DOMContentLoaded", () => {
  const embedded = document.getElementById("chart-data");
  const data = embedded ? JSON.parse(embedded.textContent) : {};
  for (const element of document.querySelectorAll("[data-chart]")) {
    const kind = element.dataset.chart;
    if (kind === "histogram") drawHistogram(element, data.histogram);
    else if (kind === "positional") drawPositional(element, data.positional);
    else if (kind === "training") drawTraining(element, embeddedData(element));
    else if (kind === "ablation") drawAblation(element, embeddedData(element), element.dataset.y);
    else if (kind === "frontier") drawFrontier(element, embeddedData(element), element.dataset.y);
    else if (kind === "cosines") drawCosines(element, embeddedData(element));
  }
});
