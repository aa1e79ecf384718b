// prewarm's chat page: plain ES2020, no build step, nothing from elsewhere (the page is served
// with a Content-Security-Policy that allows only its own files).
//
// Model and user text is only ever inserted as text nodes (textContent, Text.appendData), never
// parsed as HTML: an answer that contains <script> shows as those characters.
"use strict";

(() => {
  const FAST_POLL_MS = 1000; // while the daemon starts (or a message waits for the engine)
  const SLOW_POLL_MS = 10000; // once an engine serves
  const KEY_STORAGE = "prewarm.apiKey";
  const SERVING_STATES = new Set(["ready", "degraded"]);
  const PHASE_NAMES = { engine_start: "engine start", warmup: "warm-up" };

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model-name"),
    status: $("status"),
    state: $("state"),
    statusDetail: $("status-detail"),
    phases: $("phases"),
    progressRow: $("progress-row"),
    progressLabel: $("progress-label"),
    progress: $("progress"),
    failure: $("failure"),
    keyForm: $("key-form"),
    keyMessage: $("key-message"),
    keyInput: $("key-input"),
    conversation: $("conversation"),
    empty: $("empty"),
    composer: $("composer"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    settings: $("settings"),
    temperature: $("temperature"),
    topP: $("top-p"),
    maxTokens: $("max-tokens"),
    maxTokensLimit: $("max-tokens-limit"),
    jsonMode: $("json-mode"),
    system: $("system"),
    clear: $("clear"),
  };

  const daemon = {
    status: null, // the last GET /prewarm/status
    serving: false, // an engine answers (or the daemon queues for one that did)
    failure: null, // the reason, while the state is failed
    model: null, // from /v1/models once an engine serves, else the status's served name
    maxModelLen: null,
    modelsFor: null, // the engine id the two above were read from
  };
  let history = []; // the conversation as sent: {role, content}; a new one is a new array
  let current = null; // the answer in progress: {controller, view}
  let waiters = []; // {resolve, reject}: messages waiting for an engine

  // -- requests, with the API key when the daemon asks for one ---------------------------------
  let keyPrompt = null; // the key form's answer, while it is shown
  let memoryKey = null; // where sessionStorage is disabled: the key lives as long as the page

  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || memoryKey;
    } catch {
      return memoryKey;
    }
  }

  const stopped = () => new DOMException("stopped", "AbortError");

  // ``promise``, unless ``signal`` (the stop button) comes first.
  function abortable(promise, signal) {
    if (!signal) return promise;
    if (signal.aborted) return Promise.reject(stopped());
    return new Promise((resolve, reject) => {
      signal.addEventListener("abort", () => reject(stopped()), { once: true });
      promise.then(resolve, reject);
    });
  }

  function askForKey(refused) {
    // One form for every request that got 401 meanwhile: the key is asked for once.
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      ui.keyMessage.textContent = refused
        ? "The daemon refused that API key. Enter the right one:"
        : "This daemon needs an API key (its api_key setting):";
      ui.keyForm.hidden = false;
      ui.keyInput.value = "";
      ui.keyInput.focus();
      const submitted = (event) => {
        event.preventDefault();
        const key = ui.keyInput.value.trim();
        if (!key) return;
        try {
          sessionStorage.setItem(KEY_STORAGE, key);
        } catch {
          memoryKey = key;
        }
        ui.keyInput.value = "";
        ui.keyForm.hidden = true;
        ui.keyForm.removeEventListener("submit", submitted);
        keyPrompt = null;
        resolve();
      };
      ui.keyForm.addEventListener("submit", submitted);
    });
    return keyPrompt;
  }

  async function api(path, init = {}) {
    for (;;) {
      const key = storedKey();
      const headers = new Headers(init.headers || {});
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const response = await fetch(path, { ...init, headers, cache: "no-store" });
      if (response.status !== 401) return response;
      await response.body?.cancel();
      await abortable(askForKey(Boolean(key)), init.signal);
    }
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const error = body.error || body;
      return { message: error.message || body.detail || text, state: error.state };
    } catch {
      return { message: text.slice(0, 300) || response.statusText, state: undefined };
    }
  }

  function sleep(ms, signal) {
    return abortable(new Promise((resolve) => setTimeout(resolve, ms)), signal);
  }

  // -- the daemon's status ----------------------------------------------------------------------
  function formatBytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function formatSeconds(s) {
    return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
  }

  function showStatus(status) {
    const state = String(status.state || "unknown");
    ui.status.dataset.state = state;
    ui.state.textContent = state;
    const name = status.model?.served_name;
    const details = [];
    if (!name && status.model?.source) details.push(`preparing ${status.model.source}`);
    if (!SERVING_STATES.has(state) && typeof status.uptime_s === "number") {
      details.push(`daemon up ${formatSeconds(status.uptime_s)}`);
    }
    const waiting = status.queue?.waiting;
    if (waiting) details.push(`${waiting} waiting`);
    ui.statusDetail.textContent = details.length ? ` · ${details.join(" · ")}` : "";
    if (!daemon.model && name) ui.model.textContent = name;

    const phases = (status.phases || []).map(
      (p) => `${PHASE_NAMES[p.name] || p.name} ${formatSeconds(Number(p.seconds) || 0)}`,
    );
    ui.phases.textContent = phases.join(" · ");

    const progress = status.progress;
    if (progress && progress.total_bytes > 0) {
      const share = Math.min(1, progress.done_bytes / progress.total_bytes);
      ui.progress.value = share;
      ui.progressLabel.textContent = `${progress.label || state}: ${formatBytes(progress.done_bytes)} of ${formatBytes(progress.total_bytes)} (${Math.round(share * 100)}%)`;
      ui.progressRow.hidden = false;
    } else {
      ui.progressRow.hidden = true;
    }

    const failure = status.failure;
    if (failure && failure.reason) {
      const lines = (failure.last_lines || []).slice(-6).map(String);
      ui.failure.textContent = [String(failure.reason), ...lines].join("\n");
      ui.failure.hidden = false;
    } else {
      ui.failure.hidden = true;
      ui.failure.textContent = "";
    }
  }

  function servingNow(status) {
    // ready or degraded: an engine serves. Other states after an engine was ready (a blue-green
    // reload goes through verifying, warming, starting): the old engine still serves, or the
    // daemon queues the request until the new one does.
    if (SERVING_STATES.has(status.state)) return true;
    if (status.state === "failed" || status.state === "stopping") return false;
    return Boolean(status.engine && status.engine.uptime_s != null);
  }

  async function readModels(engineId) {
    const response = await api("/v1/models");
    if (!response.ok) return;
    const body = await response.json();
    const card = (body.data || [])[0];
    if (!card) return;
    daemon.model = String(card.id);
    ui.model.textContent = daemon.model;
    const limit = Number(card.max_model_len);
    if (Number.isInteger(limit) && limit > 0) {
      daemon.maxModelLen = limit;
      ui.maxTokens.max = String(limit);
      ui.maxTokensLimit.textContent = `(at most ${limit})`;
      readInteger(ui.maxTokens, 1, limit); // clamps what is there
    }
    daemon.modelsFor = engineId;
  }

  async function refresh() {
    const response = await api("/prewarm/status");
    if (!response.ok) throw new Error((await errorMessage(response)).message);
    const status = await response.json();
    daemon.status = status;
    showStatus(status);
    daemon.serving = servingNow(status);
    daemon.failure = status.state === "failed" ? String(status.failure?.reason || "the engine failed") : null;
    const engineId = status.engine ? status.engine.id : null;
    if (daemon.serving && SERVING_STATES.has(status.state) && daemon.modelsFor !== engineId) {
      await readModels(engineId);
    }
    const pending = waiters;
    if (daemon.serving) {
      waiters = [];
      pending.forEach((w) => w.resolve());
    } else if (daemon.failure) {
      waiters = [];
      pending.forEach((w) => w.reject(new Error(`the daemon failed: ${daemon.failure}`)));
    }
  }

  async function poll() {
    try {
      await refresh();
    } catch (error) {
      daemon.serving = false;
      ui.status.dataset.state = "unreachable";
      ui.state.textContent = "no answer from the daemon";
      ui.statusDetail.textContent = ` · ${error.message}`;
    }
    const fast = !daemon.serving || waiters.length > 0;
    setTimeout(poll, fast ? FAST_POLL_MS : SLOW_POLL_MS);
  }

  function untilServing(signal) {
    if (daemon.serving) return Promise.resolve();
    if (daemon.failure) return Promise.reject(new Error(`the daemon failed: ${daemon.failure}`));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      waiters.push(waiter);
      signal.addEventListener("abort", () => {
        waiters = waiters.filter((w) => w !== waiter);
        reject(stopped());
      }, { once: true });
    });
  }

  // -- settings ---------------------------------------------------------------------------------
  function readNumber(input, lo, hi, fallback) {
    let value = Number.parseFloat(input.value);
    if (!Number.isFinite(value)) value = fallback;
    value = Math.min(hi, Math.max(lo, value));
    if (String(value) !== input.value) input.value = String(value);
    return value;
  }

  function readInteger(input, lo, hi) {
    const value = Math.round(readNumber(input, lo, hi, Math.min(256, hi)));
    input.value = String(value);
    return value;
  }

  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true, continuous_usage_stats: true },
      temperature: readNumber(ui.temperature, 0, 2, 0.7),
      top_p: readNumber(ui.topP, 0.01, 1, 1), // vLLM takes (0, 1]
      max_tokens: readInteger(ui.maxTokens, 1, daemon.maxModelLen || Number.MAX_SAFE_INTEGER),
    };
    if (daemon.model) body.model = daemon.model;
    if (ui.jsonMode.checked) body.response_format = { type: "json_object" };
    return body;
  }

  // -- the conversation -------------------------------------------------------------------------
  function nearBottom() {
    const doc = document.scrollingElement || document.documentElement;
    return doc.scrollHeight - doc.scrollTop - doc.clientHeight < 120;
  }

  function keepScrolled(wasNearBottom) {
    if (wasNearBottom) window.scrollTo(0, document.documentElement.scrollHeight);
  }

  function addMessage(role, who) {
    ui.empty.hidden = true;
    const article = document.createElement("article");
    article.className = `msg ${role}`;
    const label = document.createElement("p");
    label.className = "who";
    label.textContent = who;
    const text = document.createElement("div");
    text.className = "text";
    const node = document.createTextNode("");
    text.append(node);
    article.append(label, text);
    ui.conversation.append(article);
    return { article, text, node };
  }

  function addQuestion(content) {
    const view = addMessage("user", "You");
    view.node.data = content;
  }

  function addAnswer() {
    const view = addMessage("assistant", daemon.model || ui.model.textContent || "model");
    const note = document.createElement("p");
    note.className = "note";
    const meta = document.createElement("p");
    meta.className = "meta";
    view.article.append(note, meta);
    view.article.dataset.outcome = "pending";
    view.article.setAttribute("aria-busy", "true");
    return { ...view, note, meta };
  }

  function setOutcome(view, outcome, note) {
    view.article.dataset.outcome = outcome;
    view.note.textContent = note || "";
    if (outcome !== "pending" && outcome !== "streaming") view.article.setAttribute("aria-busy", "false");
  }

  function describe(timing) {
    const parts = [];
    if (timing.first) parts.push(`first token ${formatSeconds((timing.first.at - timing.sent) / 1000)}`);
    else parts.push("no tokens");
    const tokens = timing.usage?.completion_tokens ?? timing.last.tokens;
    parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
    if (timing.first) {
      const decodeTokens = timing.last.tokens - timing.first.tokens;
      const decodeS = (timing.last.at - timing.first.at) / 1000;
      if (decodeTokens > 0 && decodeS > 0) parts.push(`${(decodeTokens / decodeS).toFixed(1)} tokens/s`);
    }
    return parts.join(" · ");
  }

  // Server-sent events (HTML's "event stream" format): "data:" lines, a blank line ends an event.
  class EventStream {
    constructor() {
      this.buffer = "";
      this.data = [];
    }

    push(text) {
      this.buffer += text;
      const events = [];
      let end;
      while ((end = this.buffer.indexOf("\n")) >= 0) {
        const line = this.buffer.slice(0, end).replace(/\r$/, "");
        this.buffer = this.buffer.slice(end + 1);
        if (line === "") {
          if (this.data.length) events.push(this.data.join("\n"));
          this.data = [];
        } else if (line.startsWith("data:")) {
          this.data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
      return events;
    }
  }

  async function readAnswer(response, view, sent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8"); // {stream: true}: a character split across reads waits for its rest
    const events = new EventStream();
    const timing = { sent, first: null, last: { at: sent, tokens: 0 }, usage: null };
    let finish = null;
    let done = false;
    // The text goes into the page once per frame, not once per token: a fast engine sends
    // hundreds of pieces a second, and a layout for each would slow the page (and the stop button).
    let unshown = "";
    let frame = 0;
    const show = () => {
      frame = 0;
      const wasNearBottom = nearBottom();
      if (unshown) view.node.appendData(unshown);
      unshown = "";
      view.meta.textContent = describe(timing);
      if (timing.first && view.article.dataset.outcome === "pending") setOutcome(view, "streaming");
      keepScrolled(wasNearBottom);
    };
    const handle = (data) => {
      if (data === "[DONE]") {
        done = true;
        return;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`the engine stopped the answer: ${chunk.error.message || chunk.error}`);
      const now = performance.now();
      const choices = chunk.choices || [];
      const texts = choices.map((c) => (c.delta && c.delta.content) || "");
      for (const c of choices) if (c.finish_reason) finish = c.finish_reason;
      if (chunk.usage) timing.usage = chunk.usage;
      // vLLM's own count with every piece (continuous_usage_stats): a token that adds no text yet
      // (part of a character) still counts when it arrives.
      const tokens = chunk.usage ? Number(chunk.usage.completion_tokens) || 0 : timing.last.tokens + (texts.some(Boolean) ? 1 : 0);
      if (tokens > timing.last.tokens) {
        timing.last = { at: now, tokens };
        timing.first = timing.first || timing.last;
      }
      unshown += texts.join("");
    };
    try {
      for (;;) {
        const { value, done: ended } = await reader.read();
        const text = ended ? decoder.decode() : decoder.decode(value, { stream: true });
        for (const data of events.push(ended ? `${text}\n\n` : text)) handle(data);
        if (ended || done) break;
        if (!frame) frame = requestAnimationFrame(show);
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      show();
      view.content = view.node.data;
      view.timing = timing;
      view.finish = finish;
    }
    if (!done) throw new Error("the stream ended before the answer was complete");
  }

  async function answer(view, signal) {
    for (;;) {
      if (!daemon.serving) {
        setOutcome(view, "pending", "waiting for the engine…");
        await untilServing(signal);
      }
      if (daemon.modelsFor === null && daemon.status?.engine) await readModels(daemon.status.engine.id);
      const body = requestBody();
      setOutcome(view, "pending", SERVING_STATES.has(daemon.status?.state) ? "" : "waiting for the engine…");
      const sent = performance.now();
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal,
      });
      if (response.status === 503) {
        // No engine after all (a restart, a queue past its bounds): wait for one and send again.
        const error = await errorMessage(response);
        if (error.state === "failed") throw new Error(error.message);
        daemon.serving = false;
        setOutcome(view, "pending", "waiting for the engine…");
        const retry = Number(response.headers.get("Retry-After")) || 5;
        await sleep(Math.min(retry, 30) * 1000, signal);
        continue;
      }
      if (!response.ok) throw new Error((await errorMessage(response)).message);
      await readAnswer(response, view, sent);
      return;
    }
  }

  async function send(content) {
    if (current) return;
    const turns = history; // "New conversation" during the answer starts another array
    turns.push({ role: "user", content });
    addQuestion(content);
    const view = addAnswer();
    keepScrolled(true); // the user just sent: show the question and its answer
    const controller = new AbortController();
    current = { controller, view };
    setBusy(true);
    try {
      await answer(view, controller.signal);
      turns.push({ role: "assistant", content: view.content });
      setOutcome(view, "done", view.finish === "length" ? "cut at max tokens" : "");
    } catch (error) {
      if (view.content) turns.push({ role: "assistant", content: view.content }); // what came before the stop
      else turns.pop(); // never answered: the question is not part of the conversation
      if (controller.signal.aborted) setOutcome(view, "stopped", "stopped");
      else setOutcome(view, "error", `error: ${error.message}`);
    } finally {
      if (view.timing) view.meta.textContent = describe(view.timing);
      current = null;
      setBusy(false);
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.conversation.setAttribute("aria-busy", String(busy));
  }

  // -- wiring -----------------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = ui.input.value;
    if (current || !content.trim()) return;
    ui.input.value = "";
    send(content);
  });

  ui.input.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; an Enter that ends an input method's composition
    // (Japanese, Chinese...) is not a send.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    ui.composer.requestSubmit();
  });

  ui.stop.addEventListener("click", () => {
    if (current) current.controller.abort();
  });

  ui.clear.addEventListener("click", () => {
    if (current) current.controller.abort();
    history = [];
    for (const message of ui.conversation.querySelectorAll(".msg")) message.remove();
    ui.empty.hidden = false;
    ui.input.focus();
  });

  for (const input of [ui.temperature, ui.topP, ui.maxTokens]) {
    input.addEventListener("change", () => {
      if (input === ui.maxTokens) readInteger(input, 1, daemon.maxModelLen || Number.MAX_SAFE_INTEGER);
      else readNumber(input, Number(input.min), Number(input.max), Number(input.defaultValue));
    });
  }

  const wide = window.matchMedia("(min-width: 760px)");
  ui.settings.open = wide.matches;
  wide.addEventListener("change", () => {
    ui.settings.open = wide.matches;
  });

  ui.input.focus();
  poll();
})();
