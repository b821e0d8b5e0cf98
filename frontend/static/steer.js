// Steering: continues a prompt through the dashboard's JSON route (forwarded to the inference
// process), as it is and with a latent steered, and shows the two continuations side by side.
"use strict";

function continuation(title, part) {
  const block = document.createElement("div");
  block.className = "continuation";
  const heading = document.createElement("b");
  heading.textContent = title;
  const text = document.createElement("p");
  text.className = "context";
  text.textContent = part.text;
  text.title = part.tokens.map((token) => JSON.stringify(token)).join(" ");
  block.append(heading, text);
  return block;
}

for (const form of document.querySelectorAll("form.steer")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = form.querySelector(".steer-result");
    const latent = { feature_index: Number(form.elements.feature_index.value) };
    latent[form.elements.how.value] = Number(form.elements.amount.value);
    const request = {
      prompt: form.elements.prompt.value,
      features: [latent],
      max_new_tokens: Number(form.elements.max_new_tokens.value),
      temperature: Number(form.elements.temperature.value),
      seed: Number(form.elements.seed.value),
    };
    const data = await postJson(form.dataset.url, request, out, "generating…");
    if (data === null) return;
    const how = "strength" in latent ? `+ ${latent.strength} × decoder row` : `clamped to ${latent.value}`;
    out.replaceChildren(
      continuation("without steering", data.default),
      continuation(`latent #${latent.feature_index} ${how}`, data.steered),
    );
  });
}
