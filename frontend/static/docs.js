// The API docs: Swagger UI over this server's OpenAPI document (a file, not inline script).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const element = document.getElementById("swagger-ui");
  SwaggerUIBundle({ url: element.dataset.openapi, dom_id: "#swagger-ui", deepLinking: true });
});
