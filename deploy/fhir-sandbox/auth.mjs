// Optional authentication, so that the engine's auth modes are tested against a real server:
// HTTP Basic, a static bearer token, and OAuth2 client credentials (RFC 6749 section 4.4) whose
// issued tokens expire after a configurable time.
import { randomBytes, timingSafeEqual } from 'node:crypto';

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
   * @param {number} [options.tokenTtl] lifetime of issued tokens, seconds
   */
  constructor({ basic, bearer, oauthClients = [], tokenTtl = 3600 }) {
    this.basic = basic ? splitPair(basic, '--auth-basic') : undefined;
    this.bearer = bearer;
    this.clients = new Map(oauthClients.map((entry) => splitPair(entry, '--oauth-client')));
    this.tokenTtl = tokenTtl;
    this.tokens = new Map(); // access token -> expiry, ms since epoch
    this.tokensIssued = 0;
  }

  get enabled() {
    return Boolean(this.basic || this.bearer || this.clients.size);
  }

  get oauthEnabled() {
    return this.clients.size > 0;
  }

  /** Security service codes for the CapabilityStatement. */
  get modes() {
    const modes = [];
    if (this.basic) modes.push('Basic');
    if (this.bearer) modes.push('Bearer');
    if (this.clients.size) modes.push('SMART-on-FHIR');
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
    if (/^bearer$/i.test(scheme) && (this.bearer || this.clients.size)) {
      if (this.bearer && sameSecret(credentials, this.bearer)) {
        return undefined;
      }
      const expiry = this.tokens.get(credentials);
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
    if (this.bearer || this.clients.size) {
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
   * (client_secret_basic) or by client_id/client_secret form fields (client_secret_post).
   * @param {URLSearchParams} form
   * @param {string|undefined} authorization
   * @returns {{status: number, body: object, headers?: object}}
   */
  token(form, authorization) {
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
    const accessToken = randomBytes(24).toString('base64url');
    this.tokens.set(accessToken, Date.now() + this.tokenTtl * 1000);
    this.tokensIssued++;
    return {
      status: 200,
      body: {
        access_token: accessToken,
        token_type: 'Bearer',
        expires_in: this.tokenTtl,
        scope: form.get('scope') || 'system/*.*',
      },
      headers: { 'Cache-Control': 'no-store', Pragma: 'no-cache' },
    };
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
