// Interop check: MQTT.js (npm `mqtt`) in node against a broker, over any URL MQTT.js takes
// (ws://, wss://, mqtt://).
//
// Usage: node mqttjs_check.mjs URL [--mqtt 5|3.1.1] [--ca CA.pem]
//
// Two clients: one subscribes (QoS 2) and the other publishes QoS 0, 1 and 2 and a retained
// message, which a third client gets on subscribing. Prints `ok: <what>` lines and exits 0, or
// `FAIL: <why>` on stderr and exits 1. Limited to 20 s.
import mqtt from 'mqtt';
import { readFileSync } from 'node:fs';

const args = process.argv.slice(2);
const url = args[0];
const opt = (name) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined; };
const version = opt('--mqtt') ?? '5';
const ca = opt('--ca');
const run = Math.random().toString(16).slice(2, 10);
const topic = (t) => `mqttjs/${run}/${t}`;

const fail = (why) => { console.error(`FAIL: mqtt=${version} ${url}: ${why}`); process.exit(1); };
setTimeout(() => fail('overall timeout of 20 s'), 20000).unref();

function connect(name) {
  const options = {
    protocolVersion: version === '5' ? 5 : 4,
    clientId: `mqttjs-${run}-${name}`,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  };
  if (ca) options.ca = readFileSync(ca);
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, options);
    c.once('connect', () => resolve(c));
    c.once('error', reject);
    c.once('close', () => reject(new Error(`${name}: connection closed before CONNACK`)));
  });
}

try {
  const sub = await connect('sub');
  const got = [];
  sub.on('message', (t, payload, packet) => got.push(`${t}|${payload}|${packet.qos}`));
  await sub.subscribeAsync(topic('qos/#'), { qos: 2 });
  const pub = await connect('pub');
  for (const qos of [0, 1, 2]) {
    await pub.publishAsync(topic(`qos/${qos}`), `payload ${qos}`, { qos });
  }
  const deadline = Date.now() + 5000;
  while (got.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  const want = [0, 1, 2].map((q) => `${topic(`qos/${q}`)}|payload ${q}|${q}`);
  if (JSON.stringify(got.sort()) !== JSON.stringify(want)) fail(`got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  console.log(`ok: qos mqtt=${version}: QoS 0, 1 and 2 published and received`);

  await pub.publishAsync(topic('retained'), 'kept', { qos: 1, retain: true });
  const late = await connect('late');
  const retained = new Promise((resolve) => late.on('message', (t, p, packet) => resolve(`${p}|${packet.retain}`)));
  await late.subscribeAsync(topic('retained'), { qos: 1 });
  const r = await Promise.race([retained, new Promise((res) => setTimeout(() => res('none'), 5000))]);
  if (r !== 'kept|true') fail(`retained message: got ${r}`);
  await pub.publishAsync(topic('retained'), '', { qos: 1, retain: true });
  console.log(`ok: retained mqtt=${version}: a late subscriber got the retained message`);

  await Promise.all([sub.endAsync(), pub.endAsync(), late.endAsync()]);
  console.log(`ok: all mqtt=${version}`);
  process.exit(0);
} catch (e) {
  fail(e.message ?? String(e));
}
