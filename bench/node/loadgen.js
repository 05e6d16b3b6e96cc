// APIX benchmark load generator (one process; the harness starts several).
//
//   node loadgen.js '<json config>'
//
// Modes:
//   sub  - hold `connections` WebSockets, each connected and subscribed to one channel;
//          measure publish->receive latency of every event (open-loop: the publisher
//          writes the intended send time into the event), count deliveries and bytes.
//   pub  - publish over WebSocket at a fixed rate (open-loop schedule) for a duration.
//   http - publish over HTTP POST at a fixed concurrency (closed loop) for a duration.
//
// Dialects: "apix" (PROTOCOL.md frames; the Python/Node baselines speak the same subset)
// and "sio" (Engine.IO 4 / Socket.IO 5 over a raw WebSocket, for python-socketio).
//
// Control: one JSON command per stdin line ({"cmd": "open" | "reset" | "count" | "report" |
// "quit"}); one JSON result per stdout line. Every wait is bounded: the process exits by
// itself after `max_lifetime_s`, and when its stdin closes (the harness went away).
'use strict';

const http = require('http');
const { RawWebSocket } = require('./rawws');

// The WebSocket client: our lean one (rawws.js), or `ws`' with BENCH_CLIENT=ws (for
// comparing the two; every server in a run meets the same one).
const CLIENT = process.env.BENCH_CLIENT === 'ws' ? require('ws') : RawWebSocket;

const cfg = JSON.parse(process.argv[2] || '{}');
const MODE = cfg.mode || 'sub';
const DIALECT = cfg.dialect || 'apix';
const SOURCES = cfg.sources && cfg.sources.length ? cfg.sources : ['127.0.0.1'];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// Monotonic clock in microseconds (CLOCK_MONOTONIC: the same clock in every process).
function nowUs() {
  const t = process.hrtime();
  return t[0] * 1e6 + Math.floor(t[1] / 1e3);
}

function cpuUs() {
  const u = process.cpuUsage();
  return u.user + u.system;
}

// ---- a log-linear histogram (~0.1% resolution, like HDR with 3 significant digits) ----
class Hist {
  constructor() { this.m = new Map(); this.n = 0; this.max = 0; }
  record(v) {
    if (v < 0) v = 0;
    let key = v;
    if (v >= 2048) {
      const shift = Math.floor(Math.log2(v)) - 10;
      key = Math.floor(v / 2 ** shift) * 2 ** shift;
    }
    this.m.set(key, (this.m.get(key) || 0) + 1);
    this.n++;
    if (v > this.max) this.max = v;
  }
  toJSON() {
    const o = {};
    for (const [k, c] of this.m) o[k] = c;
    return { counts: o, n: this.n, max: this.max };
  }
}

// ---- lifetime and shutdown -----------------------------------------------------------
const sockets = new Set();
let quitting = false;
function quit(code) {
  if (quitting) return;
  quitting = true;
  for (const ws of sockets) {
    try { ws.terminate(); } catch (e) { /* closing anyway */ }
  }
  setTimeout(() => process.exit(code || 0), 50).unref();
}
setTimeout(() => { out({ event: 'timeout' }); quit(3); }, (cfg.max_lifetime_s || 600) * 1000).unref();
process.stdin.on('end', () => quit(0));
process.on('SIGTERM', () => quit(0));

function channelFor(globalIndex) {
  const count = cfg.channel_count || 1;
  return count === 1 ? cfg.channel_prefix : `${cfg.channel_prefix}-${globalIndex % count}`;
}

function wsUrl(i) {
  const urls = Array.isArray(cfg.url) ? cfg.url : [cfg.url];
  return urls[i % urls.length];
}

function openSocket(i) {
  const url = wsUrl(i);
  const full = DIALECT === 'sio' ? `${url}?EIO=4&transport=websocket` : url;
  return new CLIENT(full, {
    perMessageDeflate: false, // compression off, as in MEASURED.md, for every server
    localAddress: SOURCES[i % SOURCES.length],
    handshakeTimeout: 20000,
  });
}

// ---- subscriber mode -------------------------------------------------------------------
const sub = {
  run: -1,
  received: 0,
  bytes: 0,
  stray: 0,
  closedEarly: 0,
  hist: new Hist(),
  cpuAtReset: 0,
  resetAt: 0,
  lastUs: 0,
  byChannel: {},
  errors: {},
};

function noteError(msg) {
  const key = String(msg).slice(0, 120);
  sub.errors[key] = (sub.errors[key] || 0) + 1;
}

const BR = Buffer.from('"br":');
const BT = Buffer.from('"bt":');
const BS = Buffer.from('"bs":');

// With BENCH_TIMELINE=<dir>, each event's earliest and latest arrival in this process
// (by its sequence number) are kept and written there at the report: `python -m
// bench.timeline <dir>` shows when in a run the late events were (stalls, warm-up).
const TIMELINE = process.env.BENCH_TIMELINE;
const timeline = new Map(); // seq → [min µs, max µs, deliveries, intended send time]
if (TIMELINE) require('fs').mkdirSync(TIMELINE, { recursive: true });

function noteTimeline(buf, from, latency, sent) {
  const s = buf.indexOf(BS, from);
  if (s < 0) return;
  const seq = readInt(buf, s + 5);
  const e = timeline.get(seq);
  if (e === undefined) timeline.set(seq, [latency, latency, 1, sent]);
  else {
    if (latency < e[0]) e[0] = latency;
    if (latency > e[1]) e[1] = latency;
    e[2]++;
  }
}

function readInt(buf, at) {
  let v = 0;
  let i = at;
  for (; i < buf.length; i++) {
    const c = buf[i];
    if (c < 48 || c > 57) break;
    v = v * 10 + (c - 48);
  }
  return v;
}

// An event (either dialect): find the run and the intended send time without parsing JSON.
function onEvent(buf) {
  const r = buf.indexOf(BR);
  if (r < 0) return;
  const run = readInt(buf, r + 5);
  if (run !== sub.run) { sub.stray++; return; }
  const t = buf.indexOf(BT, r);
  if (t < 0) return;
  const sent = readInt(buf, t + 5);
  const latency = nowUs() - sent;
  sub.hist.record(latency);
  if (TIMELINE) noteTimeline(buf, r, latency, sent);
  sub.received++;
  sub.bytes += buf.length;
  sub.lastUs = nowUs();
}

function subscriber(i, globalIndex) {
  return new Promise((resolve) => {
    const channel = channelFor(globalIndex);
    const ws = openSocket(i);
    let settled = false;
    let subscribed = false;
    const done = (ok, why) => {
      if (settled) return;
      settled = true;
      subscribed = ok;
      clearTimeout(timer);
      if (!ok) { noteError(why); try { ws.terminate(); } catch (e) { /* ignore */ } }
      else sub.byChannel[channel] = (sub.byChannel[channel] || 0) + 1;
      resolve(ok);
    };
    const timer = setTimeout(() => done(false, 'connect+subscribe timeout'), 30000);
    sockets.add(ws);
    ws.on('error', (e) => done(false, e.code || e.message));
    ws.on('close', (code) => {
      sockets.delete(ws);
      if (!settled) done(false, `closed ${code} before subscribed`);
      else if (subscribed && !quitting) { sub.closedEarly++; noteError(`closed ${code}`); }
    });
    if (DIALECT === 'apix') {
      ws.on('open', () => {
        ws.send(JSON.stringify({
          op: 'connect', id: 1, token: cfg.token || 'bench',
          client: { type: 'API_CLIENT', name: 'apix-bench', version: '1' },
        }));
      });
      ws.on('message', (buf) => {
        // '{"op":"' is 7 bytes: the next one tells event / ping / reply / disconnect.
        const k = buf[7];
        if (k === 101 /* e */) { onEvent(buf); return; }
        if (k === 112 /* p */) {
          const m = JSON.parse(buf);
          if (m.op === 'ping') ws.send(`{"op":"pong","ts":${m.ts}}`);
          return;
        }
        const m = JSON.parse(buf);
        if (m.op !== 'reply') return;
        if (!m.ok) { done(false, `${m.error && m.error.code}: ${m.error && m.error.message}`); return; }
        if (m.id === 1) ws.send(JSON.stringify({ op: 'subscribe', id: 2, channel }));
        else if (m.id === 2) done(true);
      });
    } else {
      ws.on('message', (buf) => {
        const c = buf[0];
        if (c === 52 /* 4: message */) {
          const t = buf[1];
          if (t === 50 /* 2: event */) { onEvent(buf); return; }
          if (t === 48 /* 0: connected to the namespace */) {
            ws.send(`421${JSON.stringify(['subscribe', { channel }])}`);
            return;
          }
          if (t === 51 /* 3: ack */) { done(true); return; }
          if (t === 52 /* 4: connect error */) { done(false, buf.toString()); }
          return;
        }
        if (c === 50 /* 2: ping */) { ws.send('3'); return; }
        if (c === 48 /* 0: open */) { ws.send('40'); }
      });
    }
  });
}

async function openAll() {
  const n = cfg.connections || 0;
  const base = cfg.first_index || 0;
  const concurrency = Math.max(1, cfg.concurrency || 100);
  const started = Date.now();
  const cpu0 = cpuUs();
  let next = 0;
  let ok = 0;
  let failed = 0;
  async function lane() {
    while (next < n && !quitting) {
      const i = next++;
      if (await subscriber(base + i, base + i)) ok++; else failed++;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, lane));
  out({
    event: 'opened', ok, failed, elapsed_ms: Date.now() - started,
    cpu_us: cpuUs() - cpu0, by_channel: sub.byChannel, errors: sub.errors,
  });
}

// ---- publisher mode (WebSocket, open loop) ----------------------------------------------
function publisher() {
  const rate = cfg.rate;
  const durationUs = cfg.duration_s * 1e6;
  const total = Math.floor(rate * cfg.duration_s);
  const pad = 'x'.repeat(cfg.pad || 0);
  const conns = [];
  const pending = new Map(); // id -> [channel, sent_us]
  const okBy = {};
  const ack = new Hist();
  const res = { sent: 0, ok: 0, errors: {}, lag_max_us: 0 };
  let nextId = 10;
  let opened = 0;

  function onReply(id, ok, err) {
    const p = pending.get(id);
    if (!p) return;
    pending.delete(id);
    if (ok) { res.ok++; okBy[p[0]] = (okBy[p[0]] || 0) + 1; ack.record(nowUs() - p[1]); }
    else { const k = String(err).slice(0, 120); res.errors[k] = (res.errors[k] || 0) + 1; }
  }

  return new Promise((resolve) => {
    const n = Math.max(1, cfg.connections || 1);
    for (let i = 0; i < n; i++) {
      const ws = openSocket(i);
      sockets.add(ws);
      ws.on('error', (e) => { res.errors[e.code || e.message] = (res.errors[e.code || e.message] || 0) + 1; });
      ws.on('close', () => sockets.delete(ws));
      const ready = () => { conns.push(ws); if (++opened === n) start(); };
      if (DIALECT === 'apix') {
        ws.on('open', () => ws.send(JSON.stringify({
          op: 'connect', id: 1, token: cfg.token || 'bench',
          client: { type: 'API_CLIENT', name: 'apix-bench-publisher', version: '1' },
        })));
        ws.on('message', (buf) => {
          if (buf[7] !== 114 /* r */) {
            if (buf[7] === 112) { const m = JSON.parse(buf); if (m.op === 'ping') ws.send(`{"op":"pong","ts":${m.ts}}`); }
            return;
          }
          const m = JSON.parse(buf);
          if (m.id === 1) { if (m.ok) ready(); else { out({ event: 'error', error: m.error }); quit(2); } return; }
          onReply(m.id, m.ok, m.ok ? null : `${m.error.code}: ${m.error.message}`);
        });
      } else {
        ws.on('message', (buf) => {
          const c = buf[0];
          if (c === 52 && buf[1] === 51) { // 43<id>[...]: ack
            onReply(readInt(buf, 2), true, null);
          } else if (c === 52 && buf[1] === 48) ready();
          else if (c === 50) ws.send('3');
          else if (c === 48) ws.send('40');
        });
      }
    }
    const openTimer = setTimeout(() => { out({ event: 'error', error: 'publisher could not connect' }); quit(2); }, 30000);

    function start() {
      clearTimeout(openTimer);
      const t0 = nowUs() + 20000;
      const cpu0 = cpuUs();
      let i = 0;
      function tick() {
        const now = nowUs();
        while (i < total) {
          const intended = t0 + Math.floor((i * 1e6) / rate);
          if (intended > now) break;
          const lag = now - intended;
          if (lag > res.lag_max_us) res.lag_max_us = lag;
          const channel = channelFor(i);
          const id = nextId++;
          const data = `{"br":${cfg.run},"bs":${i},"bt":${intended},"pad":"${pad}"}`;
          const ws = conns[i % conns.length];
          pending.set(id, [channel, now]);
          if (DIALECT === 'apix') {
            ws.send(`{"op":"publish","id":${id},"channel":"${channel}","type":"bench.tick","data":${data}}`);
          } else {
            ws.send(`42${id}["publish",{"channel":"${channel}","type":"bench.tick","data":${data}}]`);
          }
          res.sent++;
          i++;
        }
        if (i < total && !quitting) {
          const wait = Math.max(0, (t0 + Math.floor((i * 1e6) / rate) - nowUs()) / 1000 - 0.3);
          setTimeout(tick, Math.min(wait, 50));
          return;
        }
        const publishedUs = nowUs() - t0;
        const cpuPublish = cpuUs() - cpu0;
        const deadline = Date.now() + 15000;
        const wait = () => {
          if (pending.size === 0 || Date.now() > deadline || quitting) {
            if (pending.size) res.errors['no reply'] = pending.size;
            resolve(Object.assign(res, {
              event: 'published', ok_by_channel: okBy, ack: ack.toJSON(),
              publish_us: publishedUs, duration_us: durationUs, cpu_us: cpuPublish, t0_us: t0,
            }));
          } else setTimeout(wait, 20);
        };
        wait();
      }
      const first = Math.max(0, (t0 - nowUs()) / 1000);
      setTimeout(tick, first);
    }
  });
}

// ---- HTTP publish (closed loop at a fixed concurrency) -----------------------------------
function httpPublisher() {
  const concurrency = cfg.concurrency || 32;
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const u = new URL(cfg.http_url);
  const headers = Object.assign({ 'content-type': 'application/json' }, cfg.headers || {});
  const pad = 'x'.repeat(cfg.pad || 0);
  const hist = new Hist();
  const res = { sent: 0, ok: 0, errors: {}, statuses: {} };
  const ends = Date.now() + cfg.duration_s * 1000;
  const cpu0 = cpuUs();
  const started = nowUs();
  let seq = 0;
  return new Promise((resolve) => {
    let lanes = concurrency;
    function one() {
      if (Date.now() >= ends || quitting) {
        if (--lanes === 0) {
          resolve(Object.assign(res, {
            event: 'published', latency: hist.toJSON(), elapsed_us: nowUs() - started,
            cpu_us: cpuUs() - cpu0,
          }));
        }
        return;
      }
      const t = nowUs();
      const body = `{"type":"bench.tick","data":{"br":${cfg.run},"bs":${seq++},"bt":${t},"pad":"${pad}"}}`;
      const req = http.request({
        host: u.hostname, port: u.port, path: u.pathname, method: 'POST', agent,
        headers: Object.assign({ 'content-length': Buffer.byteLength(body) }, headers),
        timeout: 10000,
      }, (resp) => {
        resp.resume();
        resp.on('end', () => {
          res.statuses[resp.statusCode] = (res.statuses[resp.statusCode] || 0) + 1;
          if (resp.statusCode >= 200 && resp.statusCode < 300) { res.ok++; hist.record(nowUs() - t); }
          one();
        });
      });
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', (e) => {
        const k = e.code || e.message;
        res.errors[k] = (res.errors[k] || 0) + 1;
        setTimeout(one, 10);
      });
      res.sent++;
      req.end(body);
    }
    for (let i = 0; i < concurrency; i++) one();
  });
}

// ---- control loop -------------------------------------------------------------------------
let buffered = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  buffered += chunk;
  let nl;
  while ((nl = buffered.indexOf('\n')) >= 0) {
    const line = buffered.slice(0, nl).trim();
    buffered = buffered.slice(nl + 1);
    if (line) handle(JSON.parse(line));
  }
});

function handle(msg) {
  switch (msg.cmd) {
    case 'open':
      openAll();
      break;
    case 'reset':
      timeline.clear();
      sub.run = msg.run;
      sub.received = 0;
      sub.bytes = 0;
      sub.stray = 0;
      sub.hist = new Hist();
      sub.cpuAtReset = cpuUs();
      sub.resetAt = nowUs();
      sub.lastUs = 0;
      out({ event: 'reset', run: msg.run, open: sockets.size });
      break;
    case 'count':
      out({ event: 'count', received: sub.received });
      break;
    case 'report':
      if (TIMELINE) {
        const file = `${TIMELINE}/run-${sub.run}-${process.pid}.json`;
        try {
          require('fs').writeFileSync(file, JSON.stringify([...timeline.entries()]));
        } catch (err) {
          noteError(`timeline: ${err.message}`);
        }
        timeline.clear();
      }
      out({
        event: 'report', run: sub.run, received: sub.received, bytes: sub.bytes,
        stray: sub.stray, closed_early: sub.closedEarly, open: sockets.size,
        cpu_us: cpuUs() - sub.cpuAtReset, elapsed_us: nowUs() - sub.resetAt, last_us: sub.lastUs,
        hist: sub.hist.toJSON(), errors: sub.errors,
      });
      break;
    case 'go':
      (MODE === 'http' ? httpPublisher() : publisher()).then((r) => out(r));
      break;
    case 'quit':
      quit(0);
      break;
    default:
      out({ event: 'error', error: `unknown command ${msg.cmd}` });
  }
}

out({ event: 'started', mode: MODE, pid: process.pid });
