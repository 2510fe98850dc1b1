// The live page: follows /v1/live (Server-Sent Events, read with fetch so that an API key can
// go in the Authorization header, which EventSource cannot send) and looks up balances.
"use strict";

const $ = (id) => document.getElementById(id);
const number = (n) => (n === null || n === undefined ? "unknown" : Number(n).toLocaleString("en-US"));
let key = sessionStorage.getItem("charging-key") || "";
const rates = [];  // settled/s, newest last

function headers() {
  return key ? { Authorization: "Bearer " + key } : {};
}

function askForKey(message) {
  $("key-form").hidden = false;
  setConnection(message, false);
}

function setConnection(text, ok) {
  $("connection").textContent = text;
  $("connection").className = "badge " + (ok ? "ok" : "bad");
}

async function follow(url, onEvent) {
  try {
    const response = await fetch(url, { headers: headers(), cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const problem = await response.json();
      askForKey(problem.detail);
      return;
    }
    setConnection("live", true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(event, JSON.parse(data));
      }
    }
  } catch (error) {
    setConnection("reconnecting…", false);
  }
  setTimeout(() => follow(url, onEvent), 2000);
}

function show(snapshot) {
  $("updated").textContent = new Date(snapshot.at).toLocaleTimeString();
  if (snapshot.error) {
    setConnection(snapshot.error, false);
    return;
  }
  setConnection("live", true);
  const s = snapshot.status;
  const rate = snapshot.settled_per_s;
  $("settled-rate").textContent = rate === null ? "–" : number(Math.round(rate));
  const latency = snapshot.latency_ms;
  $("latency-p50").textContent = latency ? number(latency.p50) : "–";
  $("latency-p99").textContent = latency ? number(latency.p99) : "–";
  $("latency-samples").textContent = latency ? number(latency.samples) : "0";
  for (const name of ["results", "length", "pending", "lag", "deadletters", "held"]) {
    $(name).textContent = number(s[name]);
  }
  $("open-reservations").textContent = number(s.open_reservations);
  $("consumers").textContent = s.consumers.length ? s.consumers.join(", ") : "none";
  $("deadletter-reasons").replaceChildren(...Object.entries(s.deadletter_reasons).map(([reason, count]) => {
    const item = document.createElement("li");
    item.dataset.reason = reason;
    item.textContent = `${reason}: ${number(count)}`;
    return item;
  }));
  $("partitions").replaceChildren(...s.partitions.map((p) => {
    const row = document.createElement("tr");
    row.id = "partition-" + p.partition;
    for (const value of [p.partition, p.length, p.pending, p.lag, p.oldest_pending_age_ms, p.results,
                         p.deadletters, p.open_reservations, p.held]) {
      const cell = document.createElement("td");
      cell.textContent = value === null ? "–" : number(value);
      row.append(cell);
    }
    return row;
  }));
  if (rate !== null) {
    rates.push(rate);
    if (rates.length > 120) rates.shift();
    spark();
  }
}

function spark() {
  const canvas = $("spark"), g = canvas.getContext("2d");
  const top = Math.max(1, ...rates);
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.strokeStyle = "#1f8a4c";
  g.beginPath();
  rates.forEach((value, i) => {
    const x = (i / 119) * canvas.width, y = canvas.height - 2 - (value / top) * (canvas.height - 4);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

$("lookup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const account = $("account").value.trim();
  const response = await fetch("/v1/accounts/" + encodeURIComponent(account), { headers: headers() });
  const body = await response.json();
  $("balance").className = response.ok ? "" : "dim";
  $("balance").textContent = response.ok
    ? `${body.account}: balance ${number(body.balance)}, held ${number(body.held)}, available ${number(body.available)}`
    : `${account}: ${body.detail}`;
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("charging-key", key);
  $("key-form").hidden = true;
  follow("/v1/live", (event, data) => event === "snapshot" && show(data));
});

follow("/v1/live", (event, data) => event === "snapshot" && show(data));
