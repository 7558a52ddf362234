// Latency at a fixed request rate (open loop, evenly spaced), over keep-alive mTLS connections.
// usage: node paced.js URL CONNECTIONS SECONDS CA CERT KEY RATE
// prints one JSON line: {"rps", "p50", "p99" (ms), "errors", "non2xx", "total"}
const https = require('https');
const fs = require('fs');
const [url, c, d, ca, cert, key, rate] = process.argv.slice(2);
const agent = new https.Agent({ keepAlive: true, maxSockets: +c, ca: fs.readFileSync(ca),
  cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
const latencies = [];
let errors = 0, non2xx = 0, inflight = 0;
const interval = 1000 / +rate;
let start, end, next;
function fire() {
  const now = Date.now();
  while (next <= now && next < end) {
    next += interval;
    const t = process.hrtime.bigint();
    inflight++;
    const req = https.get(url, { agent }, (res) => {
      res.resume();
      res.on('end', () => {
        inflight--;
        if (res.statusCode < 200 || res.statusCode >= 300) non2xx++;
        latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
      });
    });
    req.on('socket', (s) => s.setNoDelay(true));
    req.on('error', () => { inflight--; errors++; });
  }
  if (next < end) setTimeout(fire, Math.max(0, next - Date.now()));
  else finish();
}
function finish() {
  if (inflight > 0) return setTimeout(finish, 10);
  latencies.sort((a, b) => a - b);
  const at = (p) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : 0;
  console.log(JSON.stringify({ rps: latencies.length / +d, p50: at(0.5), p99: at(0.99), errors, non2xx,
    total: latencies.length }));
  agent.destroy();
}
// open the connections first (their handshakes are not what is measured), then pace the requests
let warm = +c;
for (let i = 0; i < +c; i++) {
  https.get(url, { agent }, (res) => { res.resume(); res.on('end', () => { if (--warm === 0) go(); }); })
    .on('error', () => { errors++; if (--warm === 0) go(); });
}
function go() { start = Date.now(); end = start + 1000 * +d; next = start; fire(); }
