// "Test your text": runs the SAE on a text through the dashboard's JSON route (which forwards it
// to the inference process) and draws every token coloured by activation.
"use strict";

const HEAT_LEVELS = 10;

// A token as the pages draw it: line breaks, tabs and spaces at its ends made visible.
function shownToken(token) {
  if (token === "") return "∅";
  const inner = token.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  if (token.trim() === "") return inner.replace(/ /g, "·");
  return inner;
}

function heat(activation, maximum) {
  if (maximum <= 0 || activation <= 0) return 0;
  return Math.max(1, Math.min(HEAT_LEVELS, Math.round((HEAT_LEVELS * activation) / maximum)));
}

function tokenSpan(token, special, activation, maximum, title) {
  const span = document.createElement("span");
  span.className = `tok h${heat(activation, maximum)}${special ? " special" : ""}`;
  span.textContent = shownToken(token);
  span.title = title;
  return span;
}

// One latent: every token coloured by its activation, against the larger of its stored maximum
// and its maximum on the text.
function drawFeature(out, data, scale) {
  const values = data.features[0].activations;
  const maximum = Math.max(scale, ...values);
  const context = document.createElement("p");
  context.className = "context tested";
  data.tokens.forEach((token, i) => {
    const title = `${JSON.stringify(token)} · ${values[i].toPrecision(4)}`;
    context.append(tokenSpan(token, data.special[i], values[i], maximum, title));
  });
  const fired = values.filter((value, i) => value > 0 && !data.special[i]).length;
  const summary = document.createElement("p");
  summary.className = "muted";
  summary.textContent = `fires on ${fired} of ${data.tokens.length} tokens; max ${Math.max(...values).toPrecision(3)}`;
  out.replaceChildren(context, summary, windowsNote(data));
}

// Every latent: tokens coloured by their strongest latent; then the latents most specific to the
// text.
function drawAll(out, data, featureUrl) {
  const strongest = data.top.map((latents) => (latents.length ? latents[0].activation : 0));
  const maximum = Math.max(0, ...strongest);
  const context = document.createElement("p");
  context.className = "context tested";
  data.tokens.forEach((token, i) => {
    const listed = data.top[i].map((l) => `#${l.feature_index} ${l.activation.toPrecision(3)}`);
    const title = `${JSON.stringify(token)}${listed.length ? " · " + listed.join(", ") : ""}`;
    context.append(tokenSpan(token, data.special[i], strongest[i], maximum, title));
  });
  const counted = data.special.filter((special) => !special).length;
  const caption = document.createElement("p");
  caption.className = "muted";
  caption.textContent =
    "Latents most specific to the text: mean activation over its tokens (zeros included) as a " +
    "multiple of the mean over the corpus's tokens.";
  const table = document.createElement("table");
  table.className = "grid tested-latents";
  const head = table.createTHead().insertRow();
  for (const name of ["latent", "fires on", "max activation", "specificity"]) {
    const cell = document.createElement("th");
    cell.textContent = name;
    head.append(cell);
  }
  const body = table.createTBody();
  for (const latent of data.summary) {
    const row = body.insertRow();
    const link = document.createElement("a");
    link.href = featureUrl + latent.feature_index;
    link.textContent = `#${latent.feature_index}`;
    row.insertCell().append(link);
    row.insertCell().textContent = `${latent.fires_on} of ${counted} tokens`;
    row.insertCell().textContent = latent.max_activation.toPrecision(3);
    row.insertCell().textContent =
      latent.specificity === null ? "never fired on the corpus" : `×${latent.specificity.toPrecision(3)}`;
  }
  out.replaceChildren(context, windowsNote(data), caption, table);
}

// How a text longer than the model's context ran.
function windowsNote(data) {
  const note = document.createElement("p");
  note.className = "muted windows-note";
  if (data.windows > 1) {
    note.textContent =
      `The text is ${data.tokens.length} tokens, longer than the model's context of ` +
      `${data.context_length}: it ran in ${data.windows} windows overlapping by half a context, ` +
      `so each token is read with at least ${Math.floor(data.context_length / 2)} tokens of the ` +
      "text before it (the first window's tokens with all of theirs).";
  }
  return note;
}

for (const form of document.querySelectorAll("form.text-test")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = form.querySelector(".text-test-result");
    const feature = form.dataset.feature === undefined ? null : Number(form.dataset.feature);
    const request = {
      text: form.elements.text.value,
      features: feature === null ? [] : [feature],
      top: feature === null ? 5 : 0,
    };
    const dense = form.elements.leave_out_dense;
    if (dense && dense.checked) request.max_frequency = Number(dense.value);
    const data = await postJson(form.dataset.url, request, out, "running…");
    if (data === null) return;
    if (feature === null) drawAll(out, data, form.dataset.featureUrl);
    else drawFeature(out, data, Number(form.dataset.scale));
  });
}
