// Posts a JSON body to one of the dashboard's routes for a form's result box: the answer's data,
// or null with the reason shown in the box (the dashboard unreachable, or its error message).
"use strict";

async function postJson(url, body, out, busy) {
  out.classList.remove("error");
  out.textContent = busy;
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    out.classList.add("error");
    out.textContent = `the dashboard does not answer: ${error}`;
    return null;
  }
  const data = await response.json();
  if (!response.ok) {
    out.classList.add("error");
    out.textContent = data.error.message;
    return null;
  }
  return data;
}
