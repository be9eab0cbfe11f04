// steerlm playground: plain JS, no build step. Talks to the server's own OpenAI-compatible API:
// GET /v1/models (attribute schema), POST /v1/chat/completions (streamed by server-sent events),
// POST /v1/attributes/score (APM scores, when the server has an APM).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("steerlm-key") || "",
  model: null,        // the /v1/models entry
  history: [],        // chat messages sent so far: {role, content, attributes?}
  moved: new Set(),   // sliders the user moved since connecting or resetting: the attributes a request names
  controller: null,   // AbortController of the answer being streamed
};

// ------------------------------------------------------------------ API helpers

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function apiError(resp) {
  let message = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  const err = new Error(message);
  err.status = resp.status;
  return err;
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

async function postJSON(path, body, signal) {
  const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!resp.ok) throw await apiError(resp);
  return resp;
}

// Read a server-sent-events response; calls onEvent(object) per `data:` line until [DONE].
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "generation failed");
        onEvent(obj);
      }
    }
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------ settings

// The levels of the sliders the user moved. Only these are sent: the server fills the rest with the defaults the
// untouched sliders show, and guidance against 'middle' then amplifies what the user moved (and the server's own
// --attr settings), not every slider (docs/serve.md, "The playground").
function movedLevels() {
  const levels = {};
  for (const input of document.querySelectorAll("#sliders input[type=range]")) {
    if (state.moved.has(input.dataset.attr)) levels[input.dataset.attr] = Number(input.value);
  }
  return levels;
}

function sampling() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Number($("max-tokens").value) || 1),
  };
  const topK = Number($("top-k").value);
  if (topK > 0) body.top_k = topK;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (state.model && state.model.guidance) {
    body.guidance_scale = Number($("guidance").value);
    body.guidance_reference = $("guidance-reference").value;
  }
  return body;
}

function renderLevels(levels) {
  return Object.entries(levels || {}).map(([k, v]) => k + ":" + v).join(",");
}

function buildSliders(schema) {
  const box = $("sliders");
  box.textContent = "";
  $("no-attributes").hidden = !!schema;
  $("reset-attributes").hidden = !schema;
  const select = $("compare-attr");
  select.textContent = "";
  if (!schema) return;
  for (const name of schema.names) {
    const wrap = document.createElement("div");
    wrap.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = "attr-" + name;
    const title = document.createElement("span");
    title.textContent = name;
    const out = document.createElement("output");
    out.id = "attr-" + name + "-value";
    out.htmlFor = "attr-" + name;
    label.append(title, out);
    const input = document.createElement("input");
    input.type = "range";
    input.id = "attr-" + name;
    input.min = "0";
    input.max = String(schema.levels - 1);
    input.step = "1";
    input.value = String(schema.defaults[name]);
    input.dataset.attr = name;
    input.setAttribute("aria-valuetext", name + " " + input.value);
    out.textContent = input.value;
    input.addEventListener("input", (event) => {
      if (event.isTrusted) state.moved.add(name);  // a reset dispatches untrusted events
      out.textContent = input.value;
      input.setAttribute("aria-valuetext", name + " " + input.value);
    });
    wrap.append(label, input);
    box.append(wrap);
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
  const top = schema.levels - 1;
  $("compare-levels").value = [0, Math.round(top / 2), top].join(",");
  if (schema.names.includes("humor")) select.value = "humor";
}

function resetAttributes() {
  const schema = state.model && state.model.attributes;
  if (!schema) return;
  for (const input of document.querySelectorAll("#sliders input[type=range]")) {
    input.value = String(schema.defaults[input.dataset.attr]);
    input.dispatchEvent(new Event("input"));
  }
  state.moved.clear();
}

// The guidance controls start at the server's defaults (`steerlm serve --guidance_scale --guidance_reference`).
// The reference starts at 'middle' unless the server sets guidance of its own: against no attribute line, guidance
// made the quickstart's model write its attribute line (docs/steering.md).
function setGuidance(defaults) {
  const scale = defaults ? defaults.scale : 1;
  const slider = $("guidance");
  slider.max = String(Math.max(4, scale));
  slider.step = scale % 0.25 === 0 ? "0.25" : "any";  // the server's own scale must not snap to the grid
  slider.value = String(scale);
  slider.dispatchEvent(new Event("input"));
  const select = $("guidance-reference");
  for (const option of select.querySelectorAll("option[data-server]")) option.remove();
  const own = defaults && (defaults.scale !== 1 || defaults.reference);
  const reference = own ? defaults.reference : "middle";
  if (![...select.options].some((o) => o.value === reference)) {
    const option = document.createElement("option");
    option.value = reference;
    option.textContent = reference;
    option.dataset.server = "true";
    select.append(option);
  }
  select.value = reference;
}

async function connect() {
  showError("");
  try {
    const models = await getJSON("/v1/models");
    const model = models.data[0];
    state.model = model;
    const apm = model.apm ? "APM loaded" : "no APM";
    $("model-info").textContent = model.id + " · template " + model.template + " · " + apm;
    if (!$("system").value) $("system").value = model.system || "";
    $("max-tokens").value = String(model.limits.default_max_tokens);
    $("max-tokens").max = String(model.limits.max_tokens);
    buildSliders(model.attributes);
    state.moved.clear();
    $("guidance-box").hidden = !model.guidance;
    setGuidance(model.default_guidance);
    document.body.dataset.ready = "true";
  } catch (err) {
    if (err.status === 401) {
      $("model-info").textContent = "this server needs an API key";
      showError("This server needs an API key: enter it at the top right.");
      $("api-key").focus();
    } else {
      $("model-info").textContent = "not connected";
      showError("Cannot reach the server: " + err.message);
    }
  }
}

// ------------------------------------------------------------------ chat

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "msg-text";
  body.textContent = text;
  div.append(body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function chatMessages() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.history);
}

async function sendChat(event) {
  if (event) event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller) return;
  if (!state.model) return showError("Not connected to the server (enter the API key if it needs one).");
  showError("");
  $("chat-input").value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const levels = state.model && state.model.attributes ? movedLevels() : undefined;
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  const out = bubble.querySelector(".msg-text");
  const caption = document.createElement("span");
  caption.className = "msg-attrs";
  bubble.append(caption);
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "";
  let used = levels;
  try {
    const body = Object.assign({ model: state.model.id, messages: chatMessages(), stream: true }, sampling());
    if (levels) body.attributes = levels;
    const resp = await postJSON("/v1/chat/completions", body, state.controller.signal);
    await readSSE(resp, (chunk) => {
      if (chunk.attributes) {
        used = chunk.attributes;
        caption.textContent = renderLevels(used);
      }
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) bubble.dataset.finish = choice.finish_reason;
      }
    });
    bubble.dataset.state = "done";
    state.history.push(used ? { role: "assistant", content: answer, attributes: used }
                            : { role: "assistant", content: answer });
  } catch (err) {
    const stopped = err.name === "AbortError";
    bubble.dataset.state = stopped ? "stopped" : "error";
    if (!stopped) {
      bubble.classList.add("error");
      out.textContent = answer + (answer ? "\n" : "") + "[" + err.message + "]";
      state.history.pop();  // the unanswered user message
    } else if (answer) {
      state.history.push(used ? { role: "assistant", content: answer, attributes: used }
                              : { role: "assistant", content: answer });
    } else {
      state.history.pop();
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stopChat() {
  if (state.controller) state.controller.abort();  // closing the stream stops the generation on the server
}

function clearChat() {
  stopChat();
  state.history = [];
  $("messages").textContent = "";
}

// ------------------------------------------------------------------ compare

function parseLevels(text, top) {
  const levels = [];
  for (const part of text.split(",")) {
    const t = part.trim();
    if (!t) continue;
    const v = Number(t);
    if (!Number.isInteger(v) || v < 0 || v > top) throw new Error("levels must be integers from 0 to " + top);
    if (!levels.includes(v)) levels.push(v);
  }
  if (!levels.length) throw new Error("give at least one level, e.g. 0,4,9");
  if (levels.length > 8) throw new Error("compare at most 8 levels at once");
  return levels;
}

function scoreTable(scores) {
  const table = document.createElement("table");
  table.className = "scores";
  for (const [name, s] of Object.entries(scores)) {
    const tr = document.createElement("tr");
    const a = document.createElement("td");
    a.textContent = name;
    const b = document.createElement("td");
    b.textContent = s.level + " (" + s.value.toFixed(2) + ")";
    tr.append(a, b);
    table.append(tr);
  }
  return table;
}

async function runCompare() {
  showError("");
  const schema = state.model && state.model.attributes;
  const prompt = $("compare-prompt").value.trim();
  if (!schema) return showError("This model has no attributes to compare.");
  if (!prompt) return showError("Write a prompt to compare.");
  let levels;
  try {
    levels = parseLevels($("compare-levels").value, schema.levels - 1);
  } catch (err) {
    return showError(err.message);
  }
  const attr = $("compare-attr").value;
  const base = movedLevels();
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat([{ role: "user", content: prompt }]);
  const results = $("compare-results");
  results.textContent = "";
  $("compare-run").disabled = true;
  // All levels are requested at once: the server batches them together.
  const runs = levels.map(async (level) => {
    const col = document.createElement("div");
    col.className = "compare-col";
    col.dataset.level = String(level);
    col.dataset.state = "streaming";
    const h = document.createElement("h3");
    h.textContent = attr + " = " + level;
    const text = document.createElement("div");
    text.className = "compare-text";
    col.append(h, text);
    results.append(col);
    let answer = "";
    try {
      const attributes = Object.assign({}, base, { [attr]: level });
      const body = Object.assign({ model: state.model.id, messages, stream: true, attributes }, sampling());
      const resp = await postJSON("/v1/chat/completions", body);
      await readSSE(resp, (chunk) => {
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            text.textContent = answer;
          }
        }
      });
      col.dataset.state = "done";
    } catch (err) {
      col.dataset.state = "error";
      text.textContent = answer + "[" + err.message + "]";
    }
    return { col, answer };
  });
  const done = await Promise.all(runs);
  $("compare-run").disabled = false;
  const scorable = done.filter((d) => d.col.dataset.state === "done" && d.answer.trim());
  if (!state.model.apm || !scorable.length) return;
  try {
    const items = scorable.map((d) => ({ messages, response: d.answer }));
    const resp = await postJSON("/v1/attributes/score", { items });
    const scored = await resp.json();
    scored.data.forEach((entry, i) => {
      const col = scorable[i].col;
      if (entry.error) {
        const p = document.createElement("p");
        p.className = "subtle";
        p.textContent = "APM: " + entry.error;
        col.append(p);
      } else {
        col.append(scoreTable(entry.scores));
      }
      col.dataset.scored = "true";
    });
  } catch (err) {
    showError("Scoring failed: " + err.message);
  }
}

// ------------------------------------------------------------------ wiring

function selectTab(name) {
  for (const tab of ["chat", "compare"]) {
    $("tab-" + tab).setAttribute("aria-selected", String(tab === name));
    $("panel-" + tab).hidden = tab !== name;
  }
}

function bindOutput(inputId, outputId) {
  const input = $(inputId);
  const out = $(outputId);
  const update = () => { out.textContent = input.value; };
  input.addEventListener("input", update);
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("steerlm-key", state.key);
    connect();
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("stop").addEventListener("click", stopChat);
  $("clear").addEventListener("click", clearChat);
  $("reset-attributes").addEventListener("click", resetAttributes);
  $("tab-chat").addEventListener("click", () => selectTab("chat"));
  $("tab-compare").addEventListener("click", () => selectTab("compare"));
  $("compare-run").addEventListener("click", runCompare);
  bindOutput("temperature", "temperature-value");
  bindOutput("top-p", "top-p-value");
  bindOutput("guidance", "guidance-value");
  connect();
});
