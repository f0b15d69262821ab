// A second sandbus client, in JavaScript, written from docs/protocol.md alone (no sandbus code).
//
//   node client.mjs <nats url> <node id>
//
// Runs one case per documented behaviour against a node serving the example plugins `echo` and
// `order_logger` (durable subscriber of orders.*), and prints one JSON line per case:
//   {"case": "<name>", "ok": true|false, "problems": ["..."], "observed": {...}}
// tests/protocol/test_js_client.py starts nats-server and the node, runs this, and asserts per case.

import { connect, createInbox, Empty, headers, ErrorCode } from "nats";

const [url, nodeId] = process.argv.slice(2);
if (!url || !nodeId) {
  console.error("usage: node client.mjs <nats url> <node id>");
  process.exit(2);
}

// The page's recommended client timeout: the plugin's timeout_seconds (5 for the examples) + 1 s.
const TIMEOUT_MS = 6000;
const ENVELOPE_TYPE = "application/vnd.sandbus.message+json";
const ENVELOPE_KEYS = ["from", "headers", "id", "payload", "timestamp", "to", "topic"];
const enc = new TextEncoder();
const dec = new TextDecoder();

const json = (value) => enc.encode(JSON.stringify(value));
const parse = (msg) => JSON.parse(dec.decode(msg.data));

function hdrs(pairs = {}) {
  const h = headers();
  for (const [k, v] of Object.entries(pairs)) h.set(k, v);
  return h;
}

function headerMap(msg) {
  const out = {};
  if (msg.headers) for (const [k, v] of msg.headers) out[k] = v.join(",");
  return out;
}

// One case: `run` returns what it observed and calls `check(condition, problem)` for every expectation.
async function runCase(name, run) {
  const problems = [];
  const check = (condition, problem) => { if (!condition) problems.push(problem); };
  let observed = null;
  try {
    observed = await run(check);
  } catch (e) {
    problems.push(`threw: ${e && e.stack ? e.stack.split("\n").slice(0, 3).join(" | ") : e}`);
  }
  console.log(JSON.stringify({ case: name, ok: problems.length === 0, problems, observed }));
}

function checkReplyHeaders(check, h, msgId) {
  check(h["Content-Type"] === "application/json", `Content-Type is ${h["Content-Type"]}`);
  check(h["Sandbus-Node"] === nodeId, `Sandbus-Node is ${h["Sandbus-Node"]}, expected ${nodeId}`);
  if (msgId !== undefined) check(h["Sandbus-Msg-Id"] === msgId, `Sandbus-Msg-Id is ${h["Sandbus-Msg-Id"]}`);
}

function checkErrorReply(check, msg, code) {
  const h = headerMap(msg);
  const body = parse(msg);
  check(h["Sandbus-Error-Code"] === code, `Sandbus-Error-Code is ${h["Sandbus-Error-Code"]}, expected ${code}`);
  check(typeof h["Sandbus-Error"] === "string" && h["Sandbus-Error"].length > 0, "Sandbus-Error is missing");
  checkReplyHeaders(check, h);
  const err = body && body.error;
  check(err && typeof err === "object", "the body has no error object");
  if (err) {
    check(err.code === code, `error.code is ${err.code}`);
    check(typeof err.message === "string", "error.message is not a string");
    check("plugin" in err, "error.plugin is missing");
    check(err.details !== null && typeof err.details === "object", "error.details is not an object");
    check(Object.keys(err).sort().join(",") === "code,details,message,plugin",
      `error has keys ${Object.keys(err)}`);
  }
  return { headers: h, body };
}

async function gatherPing(nc, subject, windowMs) {
  // $SRV has no queue group: every node answers; gather until the window closes.
  const inbox = createInbox();
  const sub = nc.subscribe(inbox);
  const answers = [];
  const timer = setTimeout(() => sub.unsubscribe(), windowMs);
  const done = (async () => { for await (const m of sub) answers.push(parse(m)); })();
  nc.publish(subject, Empty, { reply: inbox });
  await done;
  clearTimeout(timer);
  return answers;
}

async function control(nc, verb, body) {
  return nc.request(`sandbus.node.${nodeId}.${verb}`, body === undefined ? Empty : json(body),
    { timeout: TIMEOUT_MS });
}

async function pluginStats(nc, name) {
  const stats = parse(await control(nc, "stats"));
  return stats.plugins.find((p) => p.name === name);
}

const nc = await connect({ servers: url, timeout: 5000, maxReconnectAttempts: 0 });

await runCase("request", async (check) => {
  const sent = { hello: "from javascript", n: [1, 2, 3] };
  const msg = await nc.request("sandbus.req.echo.handle_request", json(sent),
    { timeout: TIMEOUT_MS, headers: hdrs({ "Sandbus-Msg-Id": "js-req-1", "Sandbus-From": "js-client" }) });
  const h = headerMap(msg);
  check(JSON.stringify(parse(msg)) === JSON.stringify(sent), "the reply is not the plugin's reply (echo)");
  check(!("Sandbus-Error-Code" in h), "a success reply carries an error code");
  checkReplyHeaders(check, h, "js-req-1");
  return { headers: h };
});

await runCase("no_responders", async (check) => {
  try {
    await nc.request("sandbus.req.nobody_serves_this.handle_request", json({}), { timeout: TIMEOUT_MS });
    check(false, "a request nobody serves was answered");
  } catch (e) {
    check(e.code === ErrorCode.NoResponders, `expected no responders (503), got ${e.code}`);
    return { code: e.code };
  }
  return null;
});

await runCase("error_reply", async (check) => {
  const msg = await nc.request("sandbus.req.echo.handle_request", enc.encode('{"not": json'),
    { timeout: TIMEOUT_MS, headers: hdrs({ "Sandbus-Msg-Id": "js-err-1" }) });
  const { headers: h, body } = checkErrorReply(check, msg, "request.invalid_json");
  check(h["Sandbus-Msg-Id"] === "js-err-1", "the error reply does not echo Sandbus-Msg-Id");
  check(body.error.plugin === "echo", `error.plugin is ${body.error.plugin}`);
  return { headers: h, body };
});

await runCase("unknown_function", async (check) => {
  const msg = await nc.request("sandbus.req.echo.no_such_function", json({ x: 1 }), { timeout: TIMEOUT_MS });
  return checkErrorReply(check, msg, "request.unknown_function");
});

await runCase("plain_direct_message", async (check) => {
  // Shaped like an envelope, but sent as plain JSON: it must arrive as the payload of a new envelope.
  const sent = { id: "order-77", payload: { total: 12 } };
  const msg = await nc.request("sandbus.msg.echo", json(sent), {
    timeout: TIMEOUT_MS,
    headers: hdrs({ "Content-Type": "application/json", "Sandbus-Msg-Id": "js-msg-1", "Sandbus-From": "js-client" }),
  });
  const env = parse(msg);
  checkReplyHeaders(check, headerMap(msg), "js-msg-1");
  check(Object.keys(env).sort().join(",") === ENVELOPE_KEYS.join(","), `envelope keys ${Object.keys(env)}`);
  check(JSON.stringify(env.payload) === JSON.stringify(sent), "the body is not the envelope's payload");
  check(env.id === "js-msg-1", `id is ${env.id}, not the Sandbus-Msg-Id header`);
  check(env.from === "js-client", `from is ${env.from}, not the Sandbus-From header`);
  check(env.to === "echo" && env.topic === null, `to/topic are ${env.to}/${env.topic}`);
  check(typeof env.timestamp === "number" && Math.abs(env.timestamp - Date.now() / 1000) < 60,
    `timestamp ${env.timestamp} is not the receipt time in unix seconds`);
  check(JSON.stringify(env.headers) === "{}", "headers is not {}");
  return env;
});

await runCase("bytes_direct_message", async (check) => {
  // A body of a media type that is not JSON is raw bytes: base64 in the payload, the headers saying so.
  const sent = new Uint8Array(256);
  for (let i = 0; i < 256; i++) sent[i] = i;
  const msg = await nc.request("sandbus.msg.echo", sent, {
    timeout: TIMEOUT_MS,
    headers: hdrs({ "Content-Type": "application/octet-stream", "Sandbus-Msg-Id": "js-bytes-1" }),
  });
  const env = parse(msg);
  checkReplyHeaders(check, headerMap(msg), "js-bytes-1");
  check(typeof env.payload === "string" && Buffer.from(env.payload, "base64").equals(Buffer.from(sent)),
    "the payload is not the base64 of the bytes sent");
  check(env.headers["Content-Type"] === "application/octet-stream", `headers are ${JSON.stringify(env.headers)}`);
  check(env.headers["Content-Transfer-Encoding"] === "base64", "no Content-Transfer-Encoding: base64");
  return env;
});

await runCase("explicit_envelope", async (check) => {
  const sent = { id: "js-env-1", from: "js", to: "not-echo", payload: [1, 2], timestamp: 12.5,
    headers: { k: "v" } };
  const msg = await nc.request("sandbus.msg.echo", json(sent),
    { timeout: TIMEOUT_MS, headers: hdrs({ "Content-Type": ENVELOPE_TYPE }) });
  const env = parse(msg);
  checkReplyHeaders(check, headerMap(msg));
  check(env.id === "js-env-1" && env.from === "js", `id/from are ${env.id}/${env.from}`);
  check(env.to === "echo", `to is ${env.to}: the subject must win`);
  check(env.topic === null, `topic is ${env.topic}`);
  check(JSON.stringify(env.payload) === "[1,2]", "payload changed");
  check(env.timestamp === 12.5, `timestamp is ${env.timestamp}`);
  check(JSON.stringify(env.headers) === '{"k":"v"}', "headers changed");
  return env;
});

await runCase("invalid_envelope", async (check) => {
  const msg = await nc.request("sandbus.msg.echo", json({ id: 7, payload: {} }),
    { timeout: TIMEOUT_MS, headers: hdrs({ "Content-Type": ENVELOPE_TYPE }) });
  const out = checkErrorReply(check, msg, "request.invalid_envelope");
  check(/\bid\b/.test(out.body.error.message), `the message does not name the field: ${out.body.error.message}`);
  return out;
});

await runCase("topic_publish", async (check) => {
  const js = nc.jetstream();
  // A dead letter would mean the node took the plain body for an envelope: listen for one.
  const letters = [];
  const dlq = nc.subscribe("sandbus.dlq.order_logger", { callback: (_err, m) => letters.push(headerMap(m)) });
  await nc.flush();
  const before = (await pluginStats(nc, "order_logger")).executions;
  const id = `js-topic-${Date.now()}`;
  // Plain JSON shaped like an envelope (an `id` that is no valid id): payload, wrapped, not refused.
  const body = json({ id: 7, payload: { order: 1 } });
  const ack = await js.publish("sandbus.topic.orders.created", body,
    { headers: hdrs({ "Nats-Msg-Id": id, "Sandbus-Msg-Id": id }) });
  check(ack.stream === "SANDBUS_TOPICS", `stored in ${ack.stream}`);
  check(ack.duplicate === false, "the first publish is a duplicate");
  const again = await js.publish("sandbus.topic.orders.created", body, { headers: hdrs({ "Nats-Msg-Id": id }) });
  check(again.duplicate === true && again.seq === ack.seq, "the same Nats-Msg-Id was stored twice");
  // The subscriber gets it once: wait (bounded) for its executions to grow by one.
  const deadline = Date.now() + 10000;
  let after = before;
  while (Date.now() < deadline && after < before + 1) {
    await new Promise((r) => setTimeout(r, 50));
    after = (await pluginStats(nc, "order_logger")).executions;
  }
  check(after === before + 1, `order_logger executions went from ${before} to ${after}`);
  await nc.flush();
  dlq.unsubscribe();
  check(letters.length === 0, `dead-lettered: ${JSON.stringify(letters)}`);
  return { seq: ack.seq, before, after, letters };
});

await runCase("discovery", async (check) => {
  const answers = await gatherPing(nc, "$SRV.PING.sandbus-node", 500);
  const ours = answers.filter((a) => a && a.metadata && a.metadata.node_id === nodeId);
  check(ours.length === 1, `${ours.length} answers from node ${nodeId} among ${answers.length}`);
  if (ours.length) {
    check(ours[0].type === "io.nats.micro.v1.ping_response", `type is ${ours[0].type}`);
    check(ours[0].name === "sandbus-node", `name is ${ours[0].name}`);
  }
  return answers;
});

await runCase("control_list", async (check) => {
  const msg = await control(nc, "list");
  const h = headerMap(msg);
  const body = parse(msg);
  checkReplyHeaders(check, h);
  check(body.node_id === nodeId, `node_id is ${body.node_id}`);
  check(typeof body.version === "string" && typeof body.durable_topics === "boolean", "version/durable_topics");
  const echo = (body.plugins || []).find((p) => p.name === "echo");
  check(echo && echo.status === "loaded", "echo is not listed as loaded");
  check(echo && echo.functions.includes("handle_request"), "echo's functions lack handle_request");
  check(echo && !("executions" in echo), "list carries counters (they belong to stats)");
  return body;
});

await runCase("control_stats", async (check) => {
  const msg = await control(nc, "stats");
  const body = parse(msg);
  checkReplyHeaders(check, headerMap(msg));
  for (const key of ["inline_budget_ms", "request_spans", "spans_dropped"]) {
    check(key in body, `stats lacks ${key}`);
  }
  const echo = (body.plugins || []).find((p) => p.name === "echo");
  for (const key of ["executions", "errors", "host_errors", "rejected", "p50_ms", "p99_ms", "fuel_used",
    "memory_bytes", "instances", "in_flight", "queue_depth", "last_error"]) {
    check(echo && key in echo, `echo's stats lack ${key}`);
  }
  check(echo && echo.executions >= 1, "echo served calls, stats says none");
  check(echo && echo.rejected >= 2, `echo's rejected is ${echo && echo.rejected} after two client mistakes`);
  return body;
});

await runCase("bad_control_body", async (check) => {
  const msg = await control(nc, "reload", { plugin: "echo", nonsense: true });
  return checkErrorReply(check, msg, "request.invalid_control");
});

await runCase("trace_id_back", async (check) => {
  const traceId = "0af7651916cd43dd8448eb211c80319c";
  const msg = await nc.request("sandbus.req.echo.handle_request", json({ traced: true }), {
    timeout: TIMEOUT_MS, headers: hdrs({ traceparent: `00-${traceId}-b7ad6b7169203331-01` }),
  });
  const parent = headerMap(msg).traceparent || "";
  check(/^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/.test(parent), `traceparent is '${parent}'`);
  check(parent.split("-")[1] === traceId, `trace id ${parent.split("-")[1]} is not ${traceId}`);
  return { traceparent: parent };
});

await nc.drain();
