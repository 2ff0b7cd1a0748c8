// dgemma playground: a chat page over POST /v1/chat/completions (streamed), drawing each denoising step's draft
// canvas from the `: dgemma-draft {json}` SSE comment lines the server sends with stream_options.include_drafts.
"use strict";

const KNOBS = ["max_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
               "confidence_threshold", "seed"];
const INTEGER = new Set(["max_tokens", "max_denoising_steps", "stability_threshold", "seed"]);
const SAVED = [...KNOBS, "system", "api_key", "thinking", "drafts"];
const $ = (id) => document.getElementById(id);

const state = { model: null, messages: [], controller: null, drafts: 0 };
window.dgemma = state;  // for tests and curious users: state.drafts counts draft events received

function loadSettings() {
  for (const id of SAVED) {
    const value = localStorage.getItem("dgemma." + id);
    if (value === null) continue;
    const el = $(id);
    if (el.type === "checkbox") el.checked = value === "true"; else el.value = value;
  }
  for (const id of SAVED) {
    $(id).addEventListener("change", () => {
      const el = $(id);
      localStorage.setItem("dgemma." + id, el.type === "checkbox" ? String(el.checked) : el.value);
    });
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
    const card = body.data[0];
    state.model = card.id;
    $("model").textContent = `${card.id} · canvas ${card.canvas_length} · max_model_len ${card.max_model_len}`;
  } catch (err) {
    $("model").textContent = "model list unavailable: " + err.message;
  }
}

function requestBody() {
  const body = { model: state.model || "default", stream: true, messages: [],
                 stream_options: { include_usage: true, include_drafts: $("drafts").checked } };
  const system = $("system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  body.messages.push(...state.messages);
  for (const k of KNOBS) {
    const raw = $(k).value.trim();
    if (raw !== "") body[k] = INTEGER.has(k) ? parseInt(raw, 10) : parseFloat(raw);
  }
  if ($("thinking").checked) body.chat_template_kwargs = { enable_thinking: true };
  return body;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  $("transcript").appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() { const t = $("transcript"); t.scrollTop = t.scrollHeight; }

// One answer: its text, thought, live canvas and stats.
class Answer {
  constructor() {
    this.el = $("answer-template").content.firstElementChild.cloneNode(true);
    $("transcript").appendChild(this.el);
    this.content = this.el.querySelector(".content");
    this.reasoning = this.el.querySelector(".reasoning");
    this.view = this.el.querySelector(".canvas-view");
    this.canvas = this.el.querySelector(".draft-canvas");
    this.label = this.el.querySelector(".canvas-label");
    this.text = "";
    this.pending = null;
    this.start = performance.now();
    this.firstText = null;
  }

  draft(d) {  // draw at most once a frame; keep only the newest draft
    state.drafts += 1;
    const scheduled = this.pending !== null;
    this.pending = d;
    if (!scheduled) requestAnimationFrame(() => this.drawDraft());
  }

  drawDraft() {
    const d = this.pending;
    this.pending = null;
    if (!d) return;
    this.view.hidden = false;
    this.label.textContent = `canvas ${d.canvas + 1} · step ${d.step}`;
    const spans = [];
    let ended = false;
    for (let i = 0; i < d.tokens.length; i++) {
      const span = document.createElement("span");
      const piece = d.text[i];
      // specials show as "·", newlines as "↵": the canvas keeps its shape while tokens change
      span.textContent = piece === "" ? "·" : piece.replaceAll("\n", "↵");
      const past = ended || i >= d.limit;
      span.className = past ? "pad" : d.settled[i] ? "settled" : "noisy";
      if (piece === "" && !past && d.step > 1) ended = true;  // a special token (EOS): the rest will be padding
      spans.push(span);
    }
    this.canvas.replaceChildren(...spans);
    scrollDown();
  }

  add(delta) {
    if (delta.reasoning_content) {
      this.reasoning.hidden = false;
      this.reasoning.querySelector(".reasoning-text").textContent += delta.reasoning_content;
    }
    if (delta.content) {
      if (this.firstText === null) this.firstText = performance.now();
      this.text += delta.content;
      this.content.textContent = this.text;
    }
    scrollDown();
  }

  finish(reason, usage) {
    this.pending = null;
    this.el.dataset.finished = reason || "done";
    this.view.hidden = true;
    const secs = (performance.now() - this.start) / 1000;
    if (!usage) { this.el.querySelector(".stats").textContent = `${reason} · ${secs.toFixed(2)} s`; return; }
    const spc = Array.isArray(usage.steps_per_canvas)
      ? usage.steps_per_canvas.reduce((a, b) => a + b, 0) / Math.max(usage.steps_per_canvas.length, 1)
      : usage.steps_per_canvas;
    const parts = [
      `${usage.completion_tokens} tokens`,
      `${usage.canvases ?? "?"} canvas${usage.canvases === 1 ? "" : "es"}`,
      `${fmt(spc, 1)} steps/canvas`,
      `${fmt(usage.tokens_per_forward, 2)} tokens/forward`,
      `${fmt(usage.completion_tokens / secs, 1)} tok/s`,
      `finish: ${reason}`,
    ];
    if (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens)
      parts.push(`${usage.prompt_tokens_details.cached_tokens} prompt tokens cached`);
    this.el.querySelector(".stats").textContent = parts.join(" · ");
  }

  fail(message) {
    this.el.classList.add("error");
    this.el.dataset.finished = "error";
    this.view.hidden = true;
    this.content.textContent = (this.text ? this.text + "\n" : "") + "error: " + message;
  }
}

function fmt(x, digits) { return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "?"; }

async function send(prompt) {
  state.messages.push({ role: "user", content: prompt });
  addTurn("user", prompt);
  const answer = new Answer();
  state.controller = new AbortController();
  setBusy(true);
  let reason = null, usage = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(requestBody()), signal: state.controller.signal });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `${res.status} ${res.statusText}`);
    }
    for await (const event of sse(res.body)) {
      if (event.draft) { answer.draft(event.draft); continue; }
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      answer.add(choice.delta || {});
      if (choice.finish_reason) reason = choice.finish_reason;
    }
    answer.finish(reason, usage);
    state.messages.push({ role: "assistant", content: answer.text });
  } catch (err) {
    if (err.name === "AbortError") { answer.finish("cancelled", null); state.messages.pop(); }
    else { answer.fail(err.message); state.messages.pop(); }
  } finally {
    setBusy(false);
  }
}

// Server-sent events from a fetch body: yields {draft} for `: dgemma-draft` comments, parsed JSON for data lines.
async function* sse(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith(": dgemma-draft ")) yield { draft: JSON.parse(line.slice(15)) };
        else if (line.startsWith("data: ")) {
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function init() {
  loadSettings();
  loadModel();
  $("api_key").addEventListener("change", loadModel);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || $("send").disabled) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    state.messages = [];
    $("transcript").replaceChildren();
  });
}

init();
