// Interop check: MQTT.js in a real headless Chromium page (Debian's chromium, driven by
// playwright-core) against a broker's ws:// listener.
//
// Usage: node browser_check.mjs WS-URL RUN SCREENSHOT.png   (WS-URL: ws:// or wss://)
//
// Serves browser_page.html and MQTT.js's browser bundle on a loopback port, opens the page,
// which subscribes to browser/RUN/in and publishes "hello from chromium" on browser/RUN/out.
// Whoever runs this answers on browser/RUN/in (the test, through its own client); once the
// page lists that message, the DOM is checked, a screenshot taken, and `ok: page received
// <topic> <payload>` printed. Fails (exit 1, `FAIL:` on stderr) after 30 s.
import { chromium } from 'playwright-core';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const [broker, run, screenshot] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const bundle = readFileSync(join(dirname(require.resolve('mqtt/package.json')), 'dist', 'mqtt.min.js'));
const page = readFileSync(join(here, 'browser_page.html'));

const fail = (why) => { console.error(`FAIL: ${why}`); process.exit(1); };
setTimeout(() => fail('overall timeout of 30 s'), 30000).unref();

const server = createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/mqtt.min.js') { res.writeHead(200, { 'content-type': 'text/javascript' }); return res.end(bundle); }
  if (path === '/') { res.writeHead(200, { 'content-type': 'text/html' }); return res.end(page); }
  // (The favicon and anything else: nothing, quietly.)
  res.writeHead(204); res.end();
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  // As root (CI), Chromium needs --no-sandbox; the broker's certificate is self-signed (for
  // wss://); the rest keeps Chromium off the (closed) network.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--ignore-certificate-errors'],
});
try {
  const tab = await browser.newPage();
  tab.on('console', (m) => console.log(`console: ${m.text()}`));
  await tab.goto(`${origin}/?broker=${encodeURIComponent(broker)}&run=${encodeURIComponent(run)}`);
  await tab.waitForFunction(() => document.getElementById('status').textContent === 'subscribed', null, { timeout: 10000 })
    .catch(async () => fail(`page status: ${await tab.textContent('#status')}`));
  console.log('page subscribed');
  const item = tab.locator('#got li').first();
  await item.waitFor({ timeout: 15000 }).catch(() => fail('the page received nothing'));
  const text = await item.textContent();
  await tab.screenshot({ path: screenshot });
  console.log(`ok: page received ${text}`);
} finally {
  await browser.close();
  server.close();
}
process.exit(0);
