// Closed- or open-loop HTTP/1.1 load with a client certificate, on autocannon (a generator that is
// not the bottleneck: it drives nginx to its real figure on this machine).
// usage: node load.js URL CONNECTIONS SECONDS CA CERT KEY [RATE]
//   RATE       requests a second in all (0: as fast as the target answers)
// prints one JSON line: {"rps", "p50", "p99" (ms), "non2xx", "errors", "timeouts", "total"}
const autocannon = require('autocannon');
const fs = require('fs');
const [url, c, d, ca, cert, key, rate] = process.argv.slice(2);
const opts = {
  url, connections: +c, duration: +d,
  tlsOptions: { ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
};
if (+rate > 0) opts.connectionRate = +rate / +c;  // spread over the connections: no bursts
autocannon(opts, (err, r) => {
  if (err) { console.error(String(err)); process.exit(1); }
  console.log(JSON.stringify({ rps: r.requests.average, p50: r.latency.p50, p99: r.latency.p99,
    non2xx: r.non2xx, errors: r.errors, timeouts: r.timeouts, total: r.requests.total }));
});
