// Optional authentication, so that the engine's auth modes are tested against a real server:
// HTTP Basic, a static bearer token, OAuth2 client credentials (RFC 6749 section 4.4) with a client secret,
// and SMART Backend Services (private_key_jwt client assertions verified against a registered JWKS, tokens
// limited to the granted system scopes). Issued tokens expire after a configurable time.
import { createPublicKey, randomBytes, timingSafeEqual, verify } from 'node:crypto';
import { readFileSync } from 'node:fs';

const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const MAX_ASSERTION_CHARS = 16 * 1024;
const MAX_ASSERTION_AHEAD_S = 300; // SMART: exp no more than five minutes in the future
const JTI_CACHE_LIMIT = 10_000; // assertions seen and not yet expired; past it, new ones wait (503)
const DEFAULT_SMART_SCOPES = 'system/*.cruds';
const SIGNING = { RS384: { kty: 'RSA' }, ES384: { kty: 'EC', crv: 'P-384' } };
const PUBLIC_MEMBERS = ['kty', 'n', 'e', 'crv', 'x', 'y'];

function sameSecret(a, b) {
  const [x, y] = [Buffer.from(a), Buffer.from(b)];
  return x.length === y.length && timingSafeEqual(x, y);
}

function splitPair(text, what) {
  const i = text.indexOf(':');
  if (i <= 0) {
    throw new Error(`${what} must look like NAME:SECRET`);
  }
  return [text.slice(0, i), text.slice(i + 1)];
}

export class Auth {
  /**
   * @param {object} options
   * @param {string} [options.basic] "user:pass"
   * @param {string} [options.bearer] a static token
   * @param {string[]} [options.oauthClients] "client_id:secret" entries
   * @param {string[]} [options.smartClients] "client_id=/path/to/jwks.json[:scope scope ...]" entries
   * @param {number} [options.tokenTtl] lifetime of issued tokens, seconds
   */
  constructor({ basic, bearer, oauthClients = [], smartClients = [], tokenTtl = 3600 }) {
    this.basic = basic ? splitPair(basic, '--auth-basic') : undefined;
    this.bearer = bearer;
    this.clients = new Map(oauthClients.map((entry) => splitPair(entry, '--oauth-client')));
    this.smartClients = new Map(smartClients.map(parseSmartClient));
    this.tokenTtl = tokenTtl;
    this.tokens = new Map(); // access token -> { expires: ms since epoch, scopes: granted SMART scopes or undefined }
    this.usedJtis = new Map(); // "client\njti" -> exp, ms since epoch
    this.tokensIssued = 0;
    this.tokenRequests = 0;
  }

  get enabled() {
    return Boolean(this.basic || this.bearer || this.clients.size || this.smartClients.size);
  }

  get oauthEnabled() {
    return this.clients.size > 0 || this.smartClients.size > 0;
  }

  /** What /.well-known/smart-configuration offers. */
  get tokenAuthMethods() {
    return [
      ...(this.clients.size ? ['client_secret_basic', 'client_secret_post'] : []),
      ...(this.smartClients.size ? ['private_key_jwt'] : []),
    ];
  }

  /** Security service codes for the CapabilityStatement. */
  get modes() {
    const modes = [];
    if (this.basic) modes.push('Basic');
    if (this.bearer) modes.push('Bearer');
    if (this.oauthEnabled) modes.push('SMART-on-FHIR');
    return modes;
  }

  /** @returns {string|undefined} why the request is refused, or undefined if it may proceed. */
  refusal(authorization) {
    if (!this.enabled) {
      return undefined;
    }
    const [scheme, credentials = ''] = (authorization ?? '').split(/\s+/, 2);
    if (/^basic$/i.test(scheme) && this.basic) {
      const [user, pass] = splitDecoded(credentials);
      return user !== undefined && sameSecret(user, this.basic[0]) && sameSecret(pass, this.basic[1])
        ? undefined
        : 'invalid username or password';
    }
    if (/^bearer$/i.test(scheme) && (this.bearer || this.oauthEnabled)) {
      if (this.bearer && sameSecret(credentials, this.bearer)) {
        return undefined;
      }
      const expiry = this.tokens.get(credentials)?.expires;
      if (expiry === undefined) {
        return 'invalid token';
      }
      if (expiry <= Date.now()) {
        this.tokens.delete(credentials);
        return 'token expired';
      }
      return undefined;
    }
    return 'authorization required';
  }

  /** The WWW-Authenticate challenge for a 401. */
  challenge(reason) {
    const challenges = [];
    if (this.bearer || this.oauthEnabled) {
      const error = reason.startsWith('token') || reason === 'invalid token' ? ', error="invalid_token"' : '';
      challenges.push(`Bearer realm="fhir"${error}`);
    }
    if (this.basic) {
      challenges.push('Basic realm="fhir"');
    }
    return challenges.join(', ');
  }

  /**
   * Token endpoint: grant_type=client_credentials with the client authenticated by HTTP Basic
   * (client_secret_basic), by client_id/client_secret form fields (client_secret_post), or by a signed
   * client assertion (private_key_jwt, SMART Backend Services).
   * @param {URLSearchParams} form
   * @param {string|undefined} authorization
   * @param {string} tokenUrl this endpoint's URL: the audience a client assertion must name
   * @returns {{status: number, body: object, headers?: object}}
   */
  token(form, authorization, tokenUrl) {
    this.tokenRequests++;
    if (form.has('client_assertion') || form.has('client_assertion_type')) {
      return this.smartToken(form, tokenUrl);
    }
    let [clientId, secret] = [form.get('client_id'), form.get('client_secret')];
    const [scheme, credentials = ''] = (authorization ?? '').split(/\s+/, 2);
    if (/^basic$/i.test(scheme)) {
      // RFC 6749 2.3.1: id and secret are form-urlencoded before base64.
      [clientId, secret] = splitDecoded(credentials).map(formDecode);
    }
    const known = clientId !== undefined && clientId !== null && this.clients.get(clientId);
    if (!known || !secret || !sameSecret(secret, known)) {
      return {
        status: 401,
        body: { error: 'invalid_client', error_description: 'unknown client or wrong secret' },
        headers: { 'WWW-Authenticate': 'Basic realm="oauth"' },
      };
    }
    if (form.get('grant_type') !== 'client_credentials') {
      return { status: 400, body: { error: 'unsupported_grant_type' } };
    }
    return this.issue(form.get('scope') || 'system/*.*', undefined);
  }

  issue(scope, scopes) {
    const accessToken = randomBytes(24).toString('base64url');
    this.tokens.set(accessToken, { expires: Date.now() + this.tokenTtl * 1000, scopes });
    this.tokensIssued++;
    return {
      status: 200,
      body: { access_token: accessToken, token_type: 'Bearer', expires_in: this.tokenTtl, scope },
      headers: { 'Cache-Control': 'no-store', Pragma: 'no-cache' },
    };
  }

  /**
   * SMART Backend Services (RFC 7523 private_key_jwt): the assertion's signature (RS384/ES384) against the key
   * its kid names in the client's registered JWKS, iss = sub = client id, aud = this token URL, exp present, not
   * past and at most five minutes ahead, a jti not seen before. The token carries the requested scopes that the
   * client's registered scopes cover.
   */
  smartToken(form, tokenUrl) {
    const refuse = (error, description, status = 401) => ({ status, body: { error, error_description: description } });
    if (form.get('grant_type') !== 'client_credentials') {
      return refuse('unsupported_grant_type', 'only client_credentials', 400);
    }
    if (form.get('client_assertion_type') !== ASSERTION_TYPE) {
      return refuse('invalid_request', `client_assertion_type must be ${ASSERTION_TYPE}`, 400);
    }
    const assertion = form.get('client_assertion') ?? '';
    if (assertion.length > MAX_ASSERTION_CHARS) {
      return refuse('invalid_request', 'client_assertion is too large', 400);
    }
    const parts = assertion.split('.');
    const [header, claims] = parts.length === 3 ? parts.slice(0, 2).map(jsonPart) : [];
    if (!header || !claims) {
      return refuse('invalid_client', 'client_assertion is not a signed JWT');
    }
    const client = typeof claims.iss === 'string' ? this.smartClients.get(claims.iss) : undefined;
    if (!client) {
      return refuse('invalid_client', 'unknown client (the assertion iss names no registered client)');
    }
    if (claims.sub !== claims.iss) {
      return refuse('invalid_client', 'the assertion sub must equal iss (the client id)');
    }
    if (!SIGNING[header.alg]) {
      return refuse('invalid_client', `assertion alg ${String(header.alg)} is not supported (RS384, ES384)`);
    }
    const registered = typeof header.kid === 'string' ? client.keys.get(header.kid) : undefined;
    if (!registered) {
      return refuse('invalid_client', `no key with kid ${String(header.kid)} is registered for this client`);
    }
    if (registered.alg !== header.alg) {
      return refuse('invalid_client', `key ${header.kid} is registered for ${registered.alg}, not ${header.alg}`);
    }
    const key = header.alg === 'ES384' ? { key: registered.key, dsaEncoding: 'ieee-p1363' } : registered.key;
    const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
    if (!verify('sha384', signed, key, Buffer.from(parts[2], 'base64url'))) {
      return refuse('invalid_client', `the assertion signature does not verify against registered key ${header.kid}`);
    }
    const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!audiences.includes(tokenUrl)) {
      return refuse('invalid_client', `the assertion aud must be this token URL, ${tokenUrl}`);
    }
    const now = Date.now() / 1000;
    if (typeof claims.exp !== 'number') {
      return refuse('invalid_client', 'the assertion has no exp');
    }
    if (claims.exp <= now) {
      return refuse('invalid_client', `the assertion has expired: exp is ${Math.ceil(now - claims.exp)} s in the past`);
    }
    if (claims.exp > now + MAX_ASSERTION_AHEAD_S) {
      const ahead = Math.floor(claims.exp - now);
      return refuse('invalid_client', `the assertion exp is ${ahead} s ahead; at most ${MAX_ASSERTION_AHEAD_S} s`);
    }
    if (typeof claims.jti !== 'string' || !claims.jti || claims.jti.length > 256) {
      return refuse('invalid_client', 'the assertion needs a jti (at most 256 characters)');
    }
    const seen = `${claims.iss}\n${claims.jti}`;
    this.forgetExpiredJtis();
    if (this.usedJtis.has(seen)) {
      return refuse('invalid_client', 'the assertion jti was used before (replayed assertion)');
    }
    if (this.usedJtis.size >= JTI_CACHE_LIMIT) {
      return refuse('temporarily_unavailable', 'too many assertions in flight; retry later', 503);
    }
    this.usedJtis.set(seen, claims.exp * 1000);
    const requested = (form.get('scope') ?? '').split(/\s+/).filter(Boolean);
    const granted = requested.length
      ? requested.filter((wanted) => client.scopes.some((have) => scopeCovers(have, wanted)))
      : client.scopes;
    if (granted.length === 0) {
      return refuse('invalid_scope', 'none of the requested scopes is registered for this client', 400);
    }
    return this.issue(granted.join(' '), granted);
  }

  forgetExpiredJtis() {
    const now = Date.now();
    for (const [seen, expires] of this.usedJtis) {
      if (expires <= now) this.usedJtis.delete(seen);
    }
  }

  /**
   * For a SMART token: why its scopes do not allow this request (a 403), or undefined. Other credentials are
   * not scoped.
   * @param {{type: string, perm: string}[]} needs from requiredScopes()
   */
  insufficientScope(authorization, needs) {
    const [scheme, credentials = ''] = (authorization ?? '').split(/\s+/, 2);
    const scopes = /^bearer$/i.test(scheme) ? this.tokens.get(credentials)?.scopes : undefined;
    if (!scopes) {
      return undefined;
    }
    const missing = needs.filter(({ type, perm }) => !scopes.some((scope) => scopeAllows(scope, type, perm)));
    const names = [...new Set(missing.map(({ type, perm }) => `system/${type}.${perm}`))];
    return names.length ? `insufficient scope: the token lacks ${names.join(' ')}` : undefined;
  }
}

/**
 * The SMART permissions a request needs: [{type, perm}] with perm one of c r u d s; type '*' for
 * system-level interactions. A transaction or batch needs what each entry needs.
 */
export function requiredScopes(method, local, body) {
  const [type = '', id = ''] = local.split('?')[0].split('/');
  if (!type) {
    if (method === 'POST' && Array.isArray(body?.entry)) {
      return body.entry.flatMap((entry) => {
        const request = entry?.request ?? {};
        const method = String(request.method ?? 'GET').toUpperCase();
        return requiredScopes(method, String(request.url ?? ''), entry?.resource);
      });
    }
    return method === 'GET' ? [{ type: '*', perm: 's' }] : [];
  }
  if (type.startsWith('$') || type.startsWith('_')) {
    return [{ type: '*', perm: method === 'GET' ? 'r' : 'c' }];
  }
  if (method === 'GET' || method === 'HEAD') {
    return [{ type, perm: !id || id === '_history' || id === '_search' ? 's' : 'r' }];
  }
  if (method === 'POST') {
    return [{ type, perm: id === '_search' ? 's' : id.startsWith('$') ? 'r' : 'c' }];
  }
  const perm = { PUT: 'u', PATCH: 'u', DELETE: 'd' }[method];
  return perm ? [{ type, perm }] : [{ type, perm: 'r' }];
}

const SCOPE = /^(patient|user|system)\/(\*|[A-Za-z]+)\.(\*|read|write|[cruds]+)$/;
const V1_PERMISSIONS = { read: 'rs', write: 'cud', '*': 'cruds' };

function parseScope(text) {
  const match = SCOPE.exec(text);
  return match && { context: match[1], type: match[2], perms: new Set(V1_PERMISSIONS[match[3]] ?? match[3]) };
}

/** Whether a granted scope allows everything a wanted scope asks (SMART v1 and v2 syntax). */
function scopeCovers(granted, wanted) {
  if (granted === wanted) return true;
  const [g, w] = [parseScope(granted), parseScope(wanted)];
  if (!g || !w || g.context !== w.context || (g.type !== '*' && g.type !== w.type)) return false;
  return [...w.perms].every((p) => g.perms.has(p));
}

function scopeAllows(scope, type, perm) {
  const parsed = parseScope(scope);
  if (!parsed || parsed.context !== 'system') return false;
  return (parsed.type === '*' || parsed.type === type) && parsed.perms.has(perm);
}

/** "client=/path/jwks.json[:scopes]" -> [client, {keys: Map(kid -> {alg, key}), scopes: [...]}]. */
function parseSmartClient(entry) {
  const eq = entry.indexOf('=');
  if (eq <= 0) {
    throw new Error('--smart-client must look like CLIENT_ID=PATH_TO_JWKS_JSON[:scopes]');
  }
  const rest = entry.slice(eq + 1);
  const colon = rest.indexOf(':');
  const [path, scopeText] = colon < 0 ? [rest, DEFAULT_SMART_SCOPES] : [rest.slice(0, colon), rest.slice(colon + 1)];
  const jwks = JSON.parse(readFileSync(path, 'utf8'));
  const keys = new Map();
  for (const jwk of jwks.keys ?? []) {
    const alg = jwk.alg ?? (jwk.kty === 'RSA' ? 'RS384' : jwk.crv === 'P-384' ? 'ES384' : undefined);
    const wanted = SIGNING[alg];
    if (!jwk.kid || !wanted || jwk.kty !== wanted.kty || (wanted.crv && jwk.crv !== wanted.crv)) {
      throw new Error(`${path}: each key needs a kid and must be RSA (RS384) or EC P-384 (ES384)`);
    }
    const members = Object.fromEntries(PUBLIC_MEMBERS.filter((m) => m in jwk).map((m) => [m, jwk[m]]));
    keys.set(jwk.kid, { alg, key: createPublicKey({ key: members, format: 'jwk' }) });
  }
  if (keys.size === 0) {
    throw new Error(`${path}: the JWKS has no keys`);
  }
  return [entry.slice(0, eq), { keys, scopes: scopeText.split(/\s+/).filter(Boolean) }];
}

function jsonPart(part) {
  try {
    const value = JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
    return value && typeof value === 'object' && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

function formDecode(part) {
  try {
    return part === undefined ? undefined : decodeURIComponent(part.replace(/\+/g, ' '));
  } catch {
    return undefined;
  }
}

function splitDecoded(base64) {
  const text = Buffer.from(base64, 'base64').toString('utf8');
  const i = text.indexOf(':');
  return i < 0 ? [undefined, undefined] : [text.slice(0, i), text.slice(i + 1)];
}
