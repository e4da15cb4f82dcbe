// StrokeWatch FHIR R4 sandbox: Medplum's FhirRouter over an in-memory store, served by node:http or node:https.
//
//   node server.mjs --port 8080 --host 127.0.0.1 [--base-path /fhir] [--omit-total]
//                   [--auth-basic user:pass] [--auth-bearer TOKEN]
//                   [--oauth-client id:secret ...] [--oauth-token-ttl SECONDS]
//                   [--smart-client CLIENT_ID=PATH_TO_JWKS_JSON[:scopes] ...]
//                   [--enable-test-controls] [--verbose]
//                   [--tls-cert CERT.pem --tls-key KEY.pem [--tls-client-ca CA.pem]]
//                   [--state-file STATE.json]
//
// With --tls-cert/--tls-key it serves HTTPS (node:https, TLS 1.2+); with --tls-client-ca it also requires a client
// certificate issued by that CA (mutual TLS) and refuses the connection without one.
// Prints "ready http(s)://HOST:PORT/fhir" once listening (--port 0 picks a free port). No persistence, except that
// with --state-file a SIGTERM/SIGINT writes the resources there (after in-flight requests finish) and the next start
// loads them, so a restart keeps ids and content (bench/soak.py restarts the EHR this way).
import './node-compat.mjs'; // must come before any @medplum import
import { OperationOutcomeError, getStatus, isOk, normalizeOperationOutcome } from '@medplum/core';
import { FhirRouter } from '@medplum/fhir-router';
import http from 'node:http';
import https from 'node:https';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Auth, requiredScopes } from './auth.mjs';
import { capabilityStatement, smartConfiguration } from './capability.mjs';
import { SandboxRepository, loadR4Definitions } from './repository.mjs';

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const MAX_TOKEN_BODY_BYTES = 64 * 1024;
const VERSION = JSON.parse(readFileSync(new URL('./package.json', import.meta.url))).version;

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: '8080' },
    host: { type: 'string', default: '127.0.0.1' },
    'base-path': { type: 'string', default: '/fhir' },
    'omit-total': { type: 'boolean', default: false },
    'default-count': { type: 'string', default: '20' },
    'max-count': { type: 'string', default: '1000' },
    'auth-basic': { type: 'string' },
    'auth-bearer': { type: 'string' },
    'oauth-client': { type: 'string', multiple: true, default: [] },
    'smart-client': { type: 'string', multiple: true, default: [] },
    'oauth-token-ttl': { type: 'string', default: '3600' },
    'enable-test-controls': { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
    'tls-client-ca': { type: 'string' },
    'state-file': { type: 'string' },
  },
});
const basePath = '/' + opts['base-path'].replace(/^\/+|\/+$/g, '');
const auth = new Auth({
  basic: opts['auth-basic'],
  bearer: opts['auth-bearer'],
  oauthClients: opts['oauth-client'],
  smartClients: opts['smart-client'],
  tokenTtl: Number(opts['oauth-token-ttl']),
});

const resourceTypes = new Set(loadR4Definitions());
const router = new FhirRouter();
let repo; // created once the port, and so the base URL, is known
let origin;
let capability;

// Fault injection (--enable-test-controls only): the next `remaining` requests are delayed and/or
// answered with `status` (+ Retry-After), or have their connection dropped.
let fault = null;
const stats = { requests: 0, faulted: 0 };

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function outcome(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

async function readBody(req, limit = MAX_BODY_BYTES) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('request body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`Invalid JSON body: ${err.message}`), { status: 400 });
  }
}

function formToQuery(text) {
  const query = {};
  for (const [key, value] of new URLSearchParams(text)) {
    query[key] = key in query ? [].concat(query[key], value) : value;
  }
  return query;
}

async function handle(req, res) {
  const url = new URL(req.url, origin);
  const path = url.pathname;
  const inBase = path === basePath || path.startsWith(basePath + '/');
  const local = inBase ? path.slice(basePath.length).replace(/^\/+/, '') : path.replace(/^\/+/, '');

  if (opts['enable-test-controls'] && local.startsWith('$test/')) {
    return testControl(req, res, local.slice('$test/'.length));
  }
  stats.requests++;
  if (fault && (!fault.path || path.includes(fault.path))) {
    const current = fault;
    if (--current.remaining <= 0) fault = null;
    stats.faulted++;
    if (current.delayMs) await new Promise((resolve) => setTimeout(resolve, current.delayMs));
    if (current.drop) return req.socket.destroy();
    if (current.status) {
      const headers = current.retryAfter !== undefined ? { 'Retry-After': String(current.retryAfter) } : {};
      const code = current.status === 429 ? 'throttled' : 'transient';
      return send(res, current.status, outcome(code, `injected fault ${current.status}`), headers);
    }
  }

  if (!inBase && path === '/oauth/token' && auth.oauthEnabled) {
    if (req.method !== 'POST') return send(res, 405, outcome('not-supported', 'use POST'));
    const form = new URLSearchParams(await readBody(req, MAX_TOKEN_BODY_BYTES));
    const result = auth.token(form, req.headers.authorization, `${origin}/oauth/token`);
    const text = JSON.stringify(result.body);
    res.writeHead(result.status, { 'Content-Type': 'application/json', ...result.headers });
    return res.end(text);
  }
  if (!inBase) {
    return send(res, 404, outcome('not-found', `not found; the FHIR base is ${origin}${basePath}`));
  }
  if (req.method === 'GET' && local === 'metadata') {
    return send(res, 200, capability);
  }
  if (req.method === 'GET' && local === '.well-known/smart-configuration' && auth.oauthEnabled) {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    return res.end(JSON.stringify(smartConfiguration(`${origin}/oauth/token`, auth.tokenAuthMethods)));
  }
  const refusal = auth.refusal(req.headers.authorization);
  if (refusal) {
    return send(res, 401, outcome('login', refusal), { 'WWW-Authenticate': auth.challenge(refusal) });
  }
  const type = local.split('/')[0];
  if (type && !type.startsWith('$') && !type.startsWith('_') && !resourceTypes.has(type)) {
    return send(res, 404, outcome('not-supported', `Unknown resource type: ${type}`));
  }

  const text = ['POST', 'PUT', 'PATCH'].includes(req.method) ? await readBody(req) : '';
  const isForm = (req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded');
  let body;
  if (isForm) {
    body = formToQuery(text);
  } else if (text) {
    body = parseJson(text);
  } else if (req.method === 'POST' || req.method === 'PUT') {
    return send(res, 400, outcome('invalid', 'Missing request body'));
  }
  const shortfall = auth.insufficientScope(req.headers.authorization, requiredScopes(req.method, local, body));
  if (shortfall) {
    const challenge = `Bearer realm="fhir", error="insufficient_scope"`;
    return send(res, 403, outcome('forbidden', shortfall), { 'WWW-Authenticate': challenge });
  }

  const fhirRequest = {
    method: req.method,
    url: local + url.search,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
  };
  const isTransaction = req.method === 'POST' && local === '' && body?.type === 'transaction';
  const [result, resource] = isTransaction
    ? await transaction(fhirRequest)
    : await router.handleRequest(fhirRequest, repo);
  const status = getStatus(result);
  if (status >= 500 || opts.verbose) {
    console.error(`${req.method} ${req.url} -> ${status} ${isOk(result) ? '' : JSON.stringify(result.issue)}`);
  }
  respond(req, res, status, result, resource);
}

/**
 * Medplum's own transaction mode (config.transactions) refuses bundles with more than 8 entries
 * when any is conditional, and more than 50 updates: production limits that no FHIR server shares.
 * So a transaction runs as Medplum's batch (same entry order, same urn:uuid and conditional
 * reference resolution) inside the repository's all-or-nothing withTransaction, and the first
 * failing entry fails the whole bundle, which rolls it back.
 */
async function transaction(fhirRequest) {
  try {
    return await repo.withTransaction(async () => {
      const batch = { ...fhirRequest, body: { ...fhirRequest.body, type: 'batch' } };
      const [result, response] = await router.handleRequest(batch, repo);
      if (!isOk(result)) {
        throw new OperationOutcomeError(result);
      }
      const failed = (response.entry ?? []).findIndex((entry) => !entry?.response?.status?.startsWith('2'));
      if (failed >= 0) {
        const entryOutcome = response.entry[failed]?.response?.outcome ?? outcome('processing', 'entry failed');
        for (const issue of entryOutcome.issue ?? []) {
          issue.diagnostics = `Bundle.entry[${failed}] failed; the transaction was rolled back`;
        }
        throw new OperationOutcomeError(entryOutcome);
      }
      return [result, { ...response, type: 'transaction-response' }];
    });
  } catch (err) {
    return [normalizeOperationOutcome(err)];
  }
}

function respond(req, res, status, result, resource) {
  if (!resource) {
    return send(res, status, result);
  }
  if (resource.type === 'batch-response' || resource.type === 'transaction-response') {
    // Absolute fullUrl and a versioned location on each entry, as R4 http.html#transaction-response asks.
    for (const entry of resource.entry ?? []) {
      const written = entry?.resource;
      if (written?.id && written.meta?.versionId && entry.response?.location) {
        entry.fullUrl = repo.fullUrl(written);
        entry.response.location = `${written.resourceType}/${written.id}/_history/${written.meta.versionId}`;
        entry.response.etag = `W/"${written.meta.versionId}"`;
        entry.response.lastModified = written.meta.lastUpdated;
      }
    }
  }
  const headers = {};
  const meta = resource.meta ?? {};
  if (resource.resourceType !== 'Bundle' && meta.versionId) {
    headers.ETag = `W/"${meta.versionId}"`;
    if (meta.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
    if (status === 201) {
      headers.Location = `${repo.fullUrl(resource)}/_history/${meta.versionId}`;
    }
  }
  const prefer = String(req.headers.prefer ?? '');
  if (prefer.includes('return=minimal')) {
    return send(res, status, undefined, headers);
  }
  if (prefer.includes('return=OperationOutcome')) {
    return send(res, status, result, headers);
  }
  send(res, status, resource, headers);
}

async function testControl(req, res, action) {
  const json = (status, body) => {
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (action === 'reset' && req.method === 'POST') {
    repo.clear();
    fault = null;
    Object.assign(stats, { requests: 0, faulted: 0 });
    return json(200, { reset: true });
  }
  if (action === 'faults' && req.method === 'POST') {
    const spec = parseJson((await readBody(req)) || '{}');
    const remaining = spec.count ?? 1;
    fault = remaining > 0 ? { ...spec, remaining } : null;
    return json(200, { fault });
  }
  if (action === 'faults' && req.method === 'DELETE') {
    fault = null;
    return json(200, { fault });
  }
  if (action === 'stats' && req.method === 'GET') {
    return json(200, { ...stats, tokensIssued: auth.tokensIssued, tokenRequests: auth.tokenRequests, fault });
  }
  json(404, { error: `unknown test control: ${req.method} ${action}` });
}

function serverOptions() {
  if (!opts['tls-cert'] !== !opts['tls-key']) {
    console.error('--tls-cert and --tls-key go together');
    process.exit(2);
  }
  if (!opts['tls-cert']) {
    if (opts['tls-client-ca']) {
      console.error('--tls-client-ca needs --tls-cert and --tls-key');
      process.exit(2);
    }
    return null;
  }
  const options = {
    cert: readFileSync(opts['tls-cert']),
    key: readFileSync(opts['tls-key']),
    minVersion: 'TLSv1.2',
  };
  if (opts['tls-client-ca']) {
    Object.assign(options, { ca: readFileSync(opts['tls-client-ca']), requestCert: true, rejectUnauthorized: true });
  }
  return options;
}

const tlsOptions = serverOptions();
const scheme = tlsOptions ? 'https' : 'http';
const listener = (req, res) => {
  handle(req, res).catch((err) => {
    const status = err.status ?? 500;
    if (status >= 500) console.error(err);
    if (!res.headersSent) send(res, status, outcome(status >= 500 ? 'exception' : 'invalid', err.message));
    else res.destroy();
  });
};
const server = tlsOptions ? https.createServer(tlsOptions, listener) : http.createServer(listener);
server.keepAliveTimeout = 30_000;

// --state-file: current versions only (history restarts at one version per resource), written atomically.
let inFlight = 0;
server.on('request', (req, res) => {
  inFlight++;
  res.on('close', () => inFlight--);
});

function loadState(path) {
  if (!existsSync(path)) return;
  const state = JSON.parse(readFileSync(path, 'utf8'));
  for (const [type, resources] of Object.entries(state.resources ?? {})) {
    repo.resources.set(type, new Map(resources.map((r) => [r.id, r])));
    repo.history.set(type, new Map(resources.map((r) => [r.id, [r]])));
  }
}

function saveStateAndExit(path) {
  server.close();
  server.closeIdleConnections();
  const deadline = Date.now() + 10_000;
  const finish = () => {
    if (inFlight > 0 && Date.now() < deadline) return setTimeout(finish, 20);
    const resources = {};
    for (const [type, byId] of repo?.resources ?? []) resources[type] = [...byId.values()];
    writeFileSync(path + '.tmp', JSON.stringify({ resources }));
    renameSync(path + '.tmp', path);
    process.exit(0);
  };
  finish();
}

if (opts['state-file']) {
  for (const signal of ['SIGTERM', 'SIGINT']) process.once(signal, () => saveStateAndExit(opts['state-file']));
}

server.listen(Number(opts.port), opts.host, () => {
  const { port } = server.address();
  const host = opts.host === '0.0.0.0' || opts.host === '::' ? '127.0.0.1' : opts.host;
  origin = `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}`;
  repo = new SandboxRepository({
    baseUrl: origin + basePath,
    resourceTypes,
    omitTotal: opts['omit-total'],
    defaultCount: Number(opts['default-count']),
    maxCount: Number(opts['max-count']),
  });
  capability = capabilityStatement({
    baseUrl: origin + basePath,
    resourceTypes,
    version: VERSION,
    tokenUrl: auth.oauthEnabled ? `${origin}/oauth/token` : undefined,
    authModes: auth.modes,
  });
  if (opts['state-file']) loadState(opts['state-file']); // before any request is read (same tick)
  console.log(`ready ${origin}${basePath}`);
});

function shutdown(signal) {
  console.error(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
