// A new TLS connection for every request, as a cron job calling curl makes them: no keep-alive, no
// session resumption (agent: false keeps no session cache). Closed loop with C requests in flight.
// usage: node handshakes.js URL CONCURRENCY SECONDS CA CERT KEY
// prints one JSON line: {"rps", "p50", "p99" (ms), "errors", "non2xx", "total"}
const https = require('https');
const tlsLib = require('tls');
const fs = require('fs');
const [url, c, d, ca, cert, key] = process.argv.slice(2);
// one context, parsed once: only the handshake is repeated, as a client with its key loaded does
const tls = { secureContext: tlsLib.createSecureContext(
  { ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key) }) };
const until = Date.now() + 1000 * +d;
const latencies = [];
let errors = 0, non2xx = 0;
function one(done) {
  if (Date.now() >= until) return done();
  const started = process.hrtime.bigint();
  const req = https.request(url, { ...tls, agent: false, headers: { Connection: 'close' } }, (res) => {
    res.resume();
    res.on('end', () => {
      if (res.statusCode < 200 || res.statusCode >= 300) non2xx++;
      latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
      one(done);
    });
  });
  req.on('socket', (s) => s.setNoDelay(true));
  req.on('error', () => { errors++; one(done); });
  req.end();
}
let running = +c;
const start = Date.now();
for (let i = 0; i < +c; i++) one(() => {
  if (--running) return;
  latencies.sort((a, b) => a - b);
  const at = (p) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : 0;
  const seconds = (Date.now() - start) / 1000;
  console.log(JSON.stringify({ rps: latencies.length / seconds, p50: at(0.5), p99: at(0.99), errors, non2xx,
    total: latencies.length }));
});
