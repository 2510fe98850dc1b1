// The API reference, drawn from /openapi.json with no framework and nothing fetched from
// elsewhere: every operation, its scope, its body's fields and its answers.
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function fields(schema) {
  const list = element("ul");
  for (const [name, field] of Object.entries(schema.properties || {})) {
    const required = (schema.required || []).includes(name) ? " (required)" : "";
    const detail = field.enum ? field.enum.join(" | ") : field.type || "";
    const range = field.maximum ? `, ${field.minimum}..${field.maximum}` : "";
    list.append(element("li", `${name}: ${detail}${range}${required}`));
  }
  return list;
}

fetch("/openapi.json").then((r) => r.json()).then((doc) => {
  document.getElementById("intro").textContent = doc.info.description;
  const schemas = doc.components.schemas;
  const target = document.getElementById("operations");
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const block = element("div", undefined, "op");
      block.id = `${method.toUpperCase()} ${path}`;
      const title = element("div");
      title.append(element("span", method.toUpperCase(), "method"), element("code", path), element("span", " — " + op.summary));
      block.append(title);
      if (op.description) block.append(element("div", op.description, "dim"));
      const body = op.requestBody && op.requestBody.content["application/json"].schema.$ref;
      if (body) {
        const name = body.split("/").pop();
        block.append(element("div", `body (${name}):`), fields(schemas[name]));
      }
      block.append(element("div", "answers: " + Object.entries(op.responses)
        .map(([status, r]) => `${status} ${r.description}`).join("; "), "dim"));
      target.append(block);
    }
  }
});
