// A lean WebSocket client for the load generator (RFC 6455, client side, no extensions).
//
// Why not `ws`: the generator shares the machine's two cores with the server it measures,
// and `ws`' client goes through Node's HTTP client for the upgrade (an agent, a request,
// an HTTP parser, a fresh random key and its SHA-1 per connection), which made the
// generator cost as much CPU per connect as the server it was measuring. This client sends
// a prebuilt upgrade request, checks the answer against a precomputed accept value, and
// reads frames with a few comparisons. It offers the part of `ws`' interface loadgen.js
// uses (`open`, `message` with a Buffer, `close` with a code, `error`; `send(string)`,
// `terminate()`), so every dialect and mode runs unchanged, for every server alike.
//
// What it does not do, on purpose: compression (off for every server, as in MEASURED.md),
// redirects, TLS, subprotocols. Each process draws one random Sec-WebSocket-Key and one
// random masking key; the server cannot tell and does the same work either way (RFC 6455
// section 5.3 asks for a fresh mask per frame to protect proxies, which loopback has not).
'use strict';

const crypto = require('crypto');
const net = require('net');
const { EventEmitter } = require('events');

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const KEY = crypto.randomBytes(16).toString('base64');
const ACCEPT = crypto.createHash('sha1').update(KEY + GUID).digest('base64');
const ACCEPT_LINE = Buffer.from(`sec-websocket-accept: ${ACCEPT.toLowerCase()}`);
const MASK = crypto.randomBytes(4);
const HEAD_END = Buffer.from('\r\n\r\n');
const STATUS_101 = Buffer.from('HTTP/1.1 101');
const MAX_HEAD = 16 * 1024;
const CLOSE_WAIT_MS = 30000; // as `ws`: a closing connection whose server never ends it

// A connection's states.
const OPENING = 0; // upgrade request sent, answer not read yet
const OPEN = 1;
const CLOSING = 2; // a close frame read and answered; bytes after it are ignored

const requests = new Map(); // url -> { host, port, request bytes }

function target(url) {
  let t = requests.get(url);
  if (t === undefined) {
    const u = new URL(url);
    const port = Number(u.port || 80);
    const request = Buffer.from(
      `GET ${u.pathname}${u.search} HTTP/1.1\r\n` +
      `Host: ${u.hostname}:${port}\r\n` +
      'Upgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Key: ${KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
    );
    t = { host: u.hostname, port, request };
    requests.set(url, t);
  }
  return t;
}

// A masked frame from the client (opcode 1 text, 9 ping, 10 pong, 8 close).
function frame(opcode, payload) {
  const n = payload.length;
  const head = n < 126 ? 6 : n < 65536 ? 8 : 14;
  const out = Buffer.allocUnsafe(head + n);
  out[0] = 0x80 | opcode;
  if (n < 126) out[1] = 0x80 | n;
  else if (n < 65536) { out[1] = 0x80 | 126; out.writeUInt16BE(n, 2); }
  else { out[1] = 0x80 | 127; out.writeUInt32BE(0, 2); out.writeUInt32BE(n, 6); }
  MASK.copy(out, head - 4);
  for (let i = 0; i < n; i++) out[head + i] = payload[i] ^ MASK[i & 3];
  return out;
}

class RawWebSocket extends EventEmitter {
  constructor(url, options) {
    super();
    const t = target(url);
    this.state = OPENING;
    this.closed = false;
    this.buf = null; // bytes not yet parsed (the upgrade answer, then frames)
    this.fragments = null; // a fragmented message's parts so far
    this.closeCode = 1006;
    const socket = net.connect({ host: t.host, port: t.port, localAddress: options.localAddress });
    this.socket = socket;
    socket.setNoDelay(true);
    this.timer = options.handshakeTimeout
      ? setTimeout(() => this.fail(new Error('Opening handshake has timed out')), options.handshakeTimeout)
      : null;
    socket.on('connect', () => socket.write(t.request));
    socket.on('data', (chunk) => this.received(chunk));
    // As `ws`: a socket error while opening is the client's error; once open, the close
    // (1006) that follows says it.
    socket.on('error', (e) => { if (this.state === OPENING && !this.closed) this.fail(e); });
    socket.on('close', () => {
      if (this.state === OPENING && !this.closed) this.emit('error', new Error('socket hang up'));
      this.finish();
    });
  }

  send(text) {
    if (this.state !== OPEN) return;
    this.socket.write(frame(1, Buffer.from(text)));
  }

  terminate() {
    this.state = CLOSING;
    this.socket.destroy();
  }

  finish() {
    if (this.closed) return;
    this.closed = true;
    this.state = CLOSING;
    if (this.timer !== null) clearTimeout(this.timer);
    this.emit('close', this.closeCode);
  }

  received(chunk) {
    if (this.state === CLOSING) return;
    let data = this.buf === null ? chunk : Buffer.concat([this.buf, chunk]);
    this.buf = null;
    if (this.state === OPENING) {
      const end = data.indexOf(HEAD_END);
      if (end < 0) {
        if (data.length > MAX_HEAD) this.fail(new Error('upgrade answer too long'));
        else this.buf = data;
        return;
      }
      const head = data.subarray(0, end);
      if (head.indexOf(STATUS_101) !== 0) {
        const line = head.toString('latin1').split('\r\n', 1)[0];
        this.fail(new Error(`Unexpected server response: ${line.slice(9, 12)}`));
        return;
      }
      if (Buffer.from(head.toString('latin1').toLowerCase(), 'latin1').indexOf(ACCEPT_LINE) < 0) {
        this.fail(new Error('Invalid Sec-WebSocket-Accept header'));
        return;
      }
      this.state = OPEN;
      clearTimeout(this.timer);
      this.timer = null;
      this.emit('open');
      data = data.subarray(end + 4);
    }
    this.frames(data);
  }

  // Every whole frame in `data`; a partial one is kept for the next read.
  frames(data) {
    let at = 0;
    const total = data.length;
    while (this.state === OPEN && total - at >= 2) {
      const b0 = data[at];
      const b1 = data[at + 1];
      if (b0 & 0x70) { this.fail(new Error('reserved bits set: no extension was agreed')); return; }
      let size = b1 & 0x7f;
      let head = 2;
      if (size === 126) {
        if (total - at < 4) break;
        size = data.readUInt16BE(at + 2);
        head = 4;
      } else if (size === 127) {
        if (total - at < 10) break;
        size = data.readUInt32BE(at + 2) * 2 ** 32 + data.readUInt32BE(at + 6);
        head = 10;
      }
      const masked = b1 & 0x80;
      if (masked) head += 4;
      if (total - at < head + size) break;
      let payload = data.subarray(at + head, at + head + size);
      if (masked) {
        const key = data.subarray(at + head - 4, at + head);
        payload = Buffer.from(payload);
        for (let i = 0; i < size; i++) payload[i] ^= key[i & 3];
      }
      at += head + size;
      this.frame(b0 & 0x80, b0 & 0x0f, payload);
    }
    if (at < total && this.state === OPEN) this.buf = data.subarray(at);
  }

  frame(fin, opcode, payload) {
    if (opcode === 9) { this.socket.write(frame(10, payload)); return; }
    if (opcode === 10) return;
    if (opcode === 8) {
      this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      this.state = CLOSING;
      this.socket.end(frame(8, payload.subarray(0, 2)));
      this.timer = setTimeout(() => this.socket.destroy(), CLOSE_WAIT_MS);
      this.timer.unref();
      return;
    }
    if (opcode > 2) { this.fail(new Error(`unknown opcode ${opcode}`)); return; }
    if (opcode !== 0) this.fragments = fin ? null : [payload];
    else if (this.fragments !== null) this.fragments.push(payload);
    else { this.fail(new Error('continuation frame without a start')); return; }
    if (!fin) return;
    if (opcode === 0) {
      payload = Buffer.concat(this.fragments);
      this.fragments = null;
    }
    this.emit('message', payload);
  }

  fail(err) {
    if (this.closed || this.state === CLOSING) return;
    this.state = CLOSING;
    this.emit('error', err);
    this.socket.destroy();
  }
}

module.exports = { RawWebSocket };
