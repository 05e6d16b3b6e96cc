// Baseline: Node `ws` broadcast (the reference). Same frames as the Python baselines.
//
//   node bench/baselines/ws_node.js --port 8104 [--procs N]
//
// `POST /publish/<channel>` is its HTTP-publish baseline. With --procs N the cluster module
// shares the port between N workers (each under the 20,000 open-files limit).
'use strict';

const cluster = require('cluster');
const http = require('http');
const WebSocket = require('ws');

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const port = Number(opt('--port', '8104'));
const host = opt('--host', '127.0.0.1');
const procs = Number(opt('--procs', '1'));

if (procs > 1 && cluster.isPrimary) {
  for (let i = 0; i < procs; i++) cluster.fork();
  process.on('SIGTERM', () => { for (const w of Object.values(cluster.workers)) w.kill(); process.exit(0); });
  console.log(`ready on ${port}`);
} else {
  const channels = new Map();
  const reply = (id, result) => JSON.stringify({ op: 'reply', id, ok: true, result: result || {} });

  function broadcast(channel, type, data) {
    const subs = channels.get(channel);
    if (!subs) return;
    const frame = JSON.stringify({ op: 'event', channel, type, data });
    for (const ws of subs) ws.send(frame);
  }

  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url.startsWith('/publish/')) {
      const channel = decodeURIComponent(req.url.slice('/publish/'.length));
      let body = '';
      req.setEncoding('utf8');
      req.on('data', (c) => { body += c; });
      req.on('end', () => {
        const msg = JSON.parse(body);
        broadcast(channel, msg.type, msg.data);
        res.writeHead(201, { 'content-type': 'application/json' });
        res.end('{"ok":true}');
      });
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocket.WebSocketServer({ server, perMessageDeflate: false });
  wss.on('connection', (ws) => {
    const mine = [];
    ws.isAlive = true;
    ws.on('pong', () => { ws.isAlive = true; });
    ws.on('message', (buf) => {
      const cmd = JSON.parse(buf);
      if (cmd.op === 'subscribe') {
        if (!channels.has(cmd.channel)) channels.set(cmd.channel, new Set());
        channels.get(cmd.channel).add(ws);
        mine.push(cmd.channel);
        ws.send(reply(cmd.id));
      } else if (cmd.op === 'publish') {
        broadcast(cmd.channel, cmd.type, cmd.data);
        ws.send(reply(cmd.id));
      } else if (cmd.op === 'connect') {
        ws.send(reply(cmd.id, { type: 'connection.established' }));
      }
    });
    ws.on('close', () => { for (const c of mine) channels.get(c).delete(ws); });
  });
  // Heartbeats on, like the other servers: a ping every 20 s, drop the silent.
  setInterval(() => {
    for (const ws of wss.clients) {
      if (!ws.isAlive) { ws.terminate(); continue; }
      ws.isAlive = false;
      ws.ping();
    }
  }, 20000).unref();
  server.listen(port, host, () => { if (procs === 1) console.log(`ready on ${port}`); });
  process.on('SIGTERM', () => process.exit(0));
}
