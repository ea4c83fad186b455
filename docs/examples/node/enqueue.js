#!/usr/bin/env node
// Enqueue a Kairos task from Node.js with nothing but amqplib.
//
// Kairos's wire contract (docs/CONTRACT.md) is plain AMQP: publish one
// persistent message whose `type` property is the task name, to `NS.tasks`
// to run it now, or to `NS.delay` with `x-delay-ms` / `x-run-at` to run it
// later. The routing key is the logical queue.
//
//   npm install amqplib
//   node enqueue.js --name kairos.sleep --body '{"ms": 100}' --delay-ms 1500
//
// Prints one JSON line: the task id and when the broker confirmed it.
'use strict';
const amqp = require('amqplib');
const crypto = require('crypto');

function parseArgs(argv) {
  const args = {
    amqpUrl: process.env.KAIROS_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f',
    namespace: process.env.KAIROS_NAMESPACE || 'kairos',
    queue: 'default',
    body: '{}',
    priority: 0,
  };
  const names = {
    '--amqp-url': 'amqpUrl', '--namespace': 'namespace', '--queue': 'queue', '--name': 'name',
    '--id': 'id', '--body': 'body', '--priority': 'priority', '--delay-ms': 'delayMs',
    '--run-at': 'runAt', '--max-retries': 'maxRetries', '--timeout-ms': 'timeoutMs',
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || argv[i + 1] === undefined) throw new Error(`unknown or incomplete argument ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  if (!args.name) throw new Error('--name is required');
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const headers = {};
  if (args.delayMs !== undefined) headers['x-delay-ms'] = Number(args.delayMs);
  if (args.runAt !== undefined) headers['x-run-at'] = Number(args.runAt);
  if (args.maxRetries !== undefined) headers['x-max-retries'] = Number(args.maxRetries);
  if (args.timeoutMs !== undefined) headers['x-timeout-ms'] = Number(args.timeoutMs);
  const delayed = args.delayMs !== undefined || args.runAt !== undefined;
  const exchange = `${args.namespace}.${delayed ? 'delay' : 'tasks'}`;
  const id = args.id || crypto.randomUUID();

  const conn = await amqp.connect(args.amqpUrl);
  const channel = await conn.createConfirmChannel();
  const sentAt = Date.now();
  channel.publish(exchange, args.queue, Buffer.from(args.body), {
    type: args.name,
    messageId: id,
    priority: Number(args.priority),
    persistent: true,
    contentType: 'application/json',
    headers,
    mandatory: !delayed,
  });
  await channel.waitForConfirms(); // throws unless the broker confirmed
  const confirmedAt = Date.now();
  await conn.close();
  console.log(JSON.stringify({ id, exchange, sent_at: sentAt, confirmed_at: confirmedAt }));
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(1);
});
