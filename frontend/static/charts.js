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
  // The end bins stop at the lowest and highest activation: narrower than the others, their
  // counts cover less of the scale, so they are drawn lighter and say so.
  const ratios = counts.map((_, i) => edges[i + 1] / edges[i]);
  const full = Math.max(...ratios);
  const partial = ratios.map((ratio) => ratio < full * 0.999);
  const ticks = logTicks(low, high);
  Plotly.newPlot(element, [{ type: "bar", x: centres, y: counts, width: widths,
    marker: { color: partial.map((cut) => (cut ? "#f3c69a" : "#e8862a")) },
    customdata: counts.map((_, i) => [edges[i], edges[i + 1], partial[i] ? " (a partial bin: it stops at the lowest or highest activation)" : ""]),
    hovertemplate: "%{customdata[0]:.3g}–%{customdata[1]:.3g}: %{y} firings%{customdata[2]}<extra></extra>" }],
    layout("activation (log scale)", "firings", {
      xaxis: { type: "log", title: { text: "activation (log scale)" }, tickvals: ticks, ticktext: ticks.map(label), automargin: true },
    }), config);
}

// Firings per bin of positions (bars) and the mean activation where it fires (line), both axes
// from 0.
function drawPositional(element, positional) {
  const { firings, bin_width: width } = positional;
  if (firings.every((value) => value === 0)) return message(element, "Never active on the corpus.");
  const starts = firings.map((_, i) => i * width);
  const unit = width === 1 ? "position" : `${width} positions`;
  Plotly.newPlot(element, [
    { type: "bar", x: starts.map((s) => s + (width - 1) / 2), y: firings, width: width * 0.9, name: `firings per ${unit}`,
      marker: { color: "#e8862a" }, customdata: starts.map((s) => [s, s + width - 1]),
      hovertemplate: (width === 1 ? "position %{customdata[0]}" : "positions %{customdata[0]}–%{customdata[1]}") + ": %{y} firings<extra></extra>" },
    { x: starts.map((s) => s + (width - 1) / 2), y: positional.bin_mean_activation, name: "mean activation where it fires", yaxis: "y2",
      mode: "lines+markers", marker: { size: 4 }, line: { color: "#2563eb" }, connectgaps: false,
      hovertemplate: "mean activation %{y:.3g}<extra></extra>" },
  ], layout("token position", `firings per ${unit}`, {
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } },
    xaxis: { title: { text: "token position" }, rangemode: "tozero", automargin: true },
    yaxis: { title: { text: `firings per ${unit}` }, rangemode: "tozero", nticks: 6, automargin: true },
    yaxis2: { overlaying: "y", side: "right", title: { text: "mean activation" }, rangemode: "tozero", tickmode: "auto", nticks: 6, showgrid: false, automargin: true },
    margin: { l: 52, r: 52, t: 34, b: 44 },
  }), config);
}

// Training curves, one panel per series: loss on a log axis with 1-2-5 ticks, dead latents as
// whole numbers, explained variance from 0 (early values below it are clipped, and the axis
// says so).
function drawTraining(element, log) {
  const tokens = log.map((row) => row.tokens ?? row.step);
  const series = ["loss", "l0", "explained_variance", "dead"].filter((key) => key in (log[0] || {}));
  const axis = (i) => (i === 0 ? "" : String(i + 1));
  const extra = {};
  series.forEach((key, i) => {
    const values = log.map((row) => row[key]);
    let yaxis = { title: { text: key.replace("_", " ") }, rangemode: "tozero" };
    if (key === "loss") {
      const positive = values.filter((v) => v > 0);
      const ticks = logTicks(Math.min(...positive), Math.max(...positive));
      yaxis = { title: { text: "loss (log scale)" }, type: "log", tickvals: ticks, ticktext: ticks.map(label) };
    } else if (key === "dead") {
      yaxis = { ...yaxis, title: { text: "dead latents" }, tickformat: "d", dtick: Math.max(1, Math.ceil(Math.max(...values) / 5)), range: [0, Math.max(1, ...values)] };
    } else if (key === "explained_variance" && Math.min(...values) < 0) {
      yaxis = { title: { text: "explained variance (clipped at 0)" }, range: [0, 1] };
    }
    extra[`xaxis${axis(i)}`] = { title: { text: "tokens" } };
    extra[`yaxis${axis(i)}`] = yaxis;
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
const Y_TITLES = { ce: "cross-entropy (nats)", mse: "MSE (mean over tokens and dimensions)" };
const hasY = (points, y) => points.some((point) => point[y] !== null);
const legendAbove = { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } };

// Threshold ablation of one SAE: each rule's points, L0 against CE or MSE.
function drawAblation(element, ablation, y) {
  const rules = ablation.rules.filter((rule) => hasY(rule.points, y));
  if (rules.length === 0) return message(element, y === "ce" ? "No language model: no cross-entropy." : "No threshold ablation.");
  Plotly.newPlot(element, rules.map((rule) => ({
    x: rule.points.map((point) => point.l0), y: rule.points.map((point) => point[y]), name: `remove ${rule.rule}`,
    mode: "lines+markers", line: { color: RULE_COLOURS[rule.name] }, text: rule.points.map((point) => point.threshold),
    hovertemplate: `remove ${rule.rule}, knob %{text:.3g}: L0 %{x:.3g}, %{y:.4g}<extra></extra>`,
  })), layout("L0 (active latents per token)", Y_TITLES[y], { showlegend: true, legend: legendAbove, margin: { l: 56, r: 14, t: 34, b: 44 } }), config);
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
  Plotly.newPlot(element, traces, layout("L0 on the evaluation contexts (active latents per token)", Y_TITLES[y], {
    showlegend: true, legend: legendAbove, margin: { l: 56, r: 14, t: 34, b: 44 },
  }), config);
}

// Best decoder cosines of one SAE's live latents in another, beside what random decoders of the
// same shapes give.
function drawCosines(element, data) {
  const { edges, counts } = data.histogram;
  const centres = counts.map((_, i) => (edges[i] + edges[i + 1]) / 2);
  Plotly.newPlot(element, [
    { type: "bar", x: centres, y: counts, width: edges[1] - edges[0], marker: { color: "#e8862a" }, name: "these SAEs",
      hovertemplate: "%{x:.2f}: %{y} latents<extra></extra>" },
    { type: "scatter", mode: "lines", line: { shape: "hvh", color: "#555", dash: "dot" }, x: centres, y: data.chance.counts,
      name: "random decoders", hovertemplate: "%{x:.2f}: %{y} by chance<extra></extra>" },
  ], layout("best decoder cosine", "live latents", { xaxis: { title: { text: "best decoder cosine" }, range: [0, 1] } }), config);
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
