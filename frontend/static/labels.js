// Saves a latent's label through the JSON route, with the write token (kept in this browser).
"use strict";

const TOKEN_KEY = "saescope-write-token";

for (const form of document.querySelectorAll("form.label-form")) {
  form.elements.token.value = localStorage.getItem(TOKEN_KEY) || "";
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = form.querySelector(".label-status");
    const token = form.elements.token.value;
    const response = await fetch(form.dataset.url, {
      method: "PUT",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({
        label: form.elements.label.value,
        note: form.elements.note.value,
        author: form.elements.author.value,
      }),
    });
    const body = await response.json();
    if (!response.ok) {
      status.textContent = body.error.message;
      return;
    }
    localStorage.setItem(TOKEN_KEY, token);
    const shown = document.querySelector(".label-shown");
    const text = document.createElement("b");
    text.className = "label-text";
    text.textContent = body.label;
    const note = document.createElement("span");
    note.className = "label-note";
    note.textContent = body.note;
    const by = document.createElement("span");
    by.className = "muted";
    by.textContent = ` ${body.author || "anonymous"}, ${body.updated_at}`;
    shown.className = "label-shown";
    shown.replaceChildren(text, note, by);
    status.textContent = "saved";
  });
}
