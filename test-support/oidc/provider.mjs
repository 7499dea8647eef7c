// A real OpenID Connect provider for fedrelay's tests: npm `oidc-provider` with an issuer of
// http://127.0.0.1:<port>, its clients, resources and users from a JSON file.
//
//   node provider.mjs <port> <config.json>
//
// Prints `listening <port>` on stdout once it answers; test-support's OidcProvider waits for
// that line (src/oidc.rs). The npm packages come from the directory named by
// OIDC_PROVIDER_NODE_MODULES, by default <repository>/.tools/oidc/node_modules, which
// tools/oidc-tools installs from package-lock.json.
//
// The config file (every key but `clients` optional):
//   {
//     "resources": ["urn:fedrelay:api"],     resource indicators a token may be asked for; a
//                                            token for one is a JWT (RS256) with it as `aud`
//     "clients": [{
//       "client_id": "ops-admin", "client_secret": "…",
//       "claims": {"roles": ["admin"]},      added to the client's access tokens
//       "ttl": 600,                          lifetime of its access tokens, in seconds
//       "redirect_uris": ["http://…/cb"]     makes it a web client of the authorization code
//                                            flow (PKCE required) as well
//     }],
//     "users": [{
//       "username": "alice", "password": "…",
//       "claims": {"roles": "domain-admin", "domains": ["a.example"], "email": "…"}
//     }]                                     who may log in on the code flow's login form;
//                                            their claims go into their access tokens and
//                                            (standard ones, by scope) into userinfo
//   }
//
// Client credentials tokens have the client id as `sub`; code flow tokens the username.
// Nothing secret is logged.

import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const [portArg, configPath] = process.argv.slice(2);
const port = Number(portArg);
if (!Number.isInteger(port) || port <= 0 || port > 65535 || !configPath) {
  console.error('usage: node provider.mjs <port> <config.json>');
  process.exit(2);
}

const here = dirname(fileURLToPath(import.meta.url));
const nodeModules = process.env.OIDC_PROVIDER_NODE_MODULES
  || join(here, '..', '..', '.tools', 'oidc', 'node_modules');
let Provider;
let errors;
try {
  const entry = createRequire(join(nodeModules, 'noop.js')).resolve('oidc-provider');
  ({ default: Provider, errors } = await import(pathToFileURL(entry).href));
} catch (e) {
  console.error(`oidc-provider not found in ${nodeModules} (run tools/oidc-tools): ${e.message}`);
  process.exit(3);
}

const config = JSON.parse(readFileSync(configPath, 'utf8'));
const issuer = `http://127.0.0.1:${port}`;
const DEFAULT_TTL = 600;
/** The scope every resource offers; a code flow client asks for it next to `openid`. */
const RESOURCE_SCOPE = 'api';

const resources = new Set(config.resources ?? []);
const clientsById = new Map((config.clients ?? []).map((c) => [c.client_id, c]));
const usersByName = new Map((config.users ?? []).map((u) => [u.username, u]));

function ttlOf(clientId) {
  const ttl = clientsById.get(clientId)?.ttl;
  return Number.isInteger(ttl) && ttl > 0 ? ttl : DEFAULT_TTL;
}

function clientMetadata(c) {
  const web = Array.isArray(c.redirect_uris) && c.redirect_uris.length > 0;
  const metadata = {
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: web ? ['client_credentials', 'authorization_code'] : ['client_credentials'],
    response_types: web ? ['code'] : [],
    redirect_uris: web ? c.redirect_uris : [],
  };
  if (c.post_logout_redirect_uris) {
    metadata.post_logout_redirect_uris = c.post_logout_redirect_uris;
  }
  if (c.token_endpoint_auth_method) {
    metadata.token_endpoint_auth_method = c.token_endpoint_auth_method;
  }
  return metadata;
}

/** Equality of two strings in time independent of where they differ. */
function sameSecret(a, b) {
  const x = crypto.createHash('sha256').update(String(a)).digest();
  const y = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(x, y);
}

// A signing key of its own for every start (with a `kid`, which the relay's verifier needs).
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: crypto.randomBytes(9).toString('base64url'),
  alg: 'RS256',
  use: 'sig',
};

const provider = new Provider(issuer, {
  clients: [...clientsById.values()].map(clientMetadata),
  jwks: { keys: [signingKey] },
  cookies: {
    // Not the provider's defaults (`_session`, …): cookies go to every port of 127.0.0.1,
    // and the relay's portal has its own.
    names: {
      session: 'op_session',
      interaction: 'op_interaction',
      resume: 'op_interaction_resume',
    },
    keys: [crypto.randomBytes(32).toString('base64url')],
  },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
  },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // The code flow's token request may leave out the resource of the authorization.
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resourceIndicator, client) => {
        if (!resources.has(resourceIndicator)) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: RESOURCE_SCOPE,
          audience: resourceIndicator,
          accessTokenTTL: ttlOf(client.clientId),
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    AccessToken: (_ctx, _token, client) => ttlOf(client.clientId),
    ClientCredentials: (_ctx, _token, client) => ttlOf(client.clientId),
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
  },
  extraTokenClaims: (_ctx, token) => {
    if (token.accountId) {
      return { ...(usersByName.get(token.accountId)?.claims ?? {}) };
    }
    return { ...(clientsById.get(token.clientId)?.claims ?? {}) };
  },
  findAccount: (_ctx, id) => {
    const user = usersByName.get(id);
    if (!user) {
      return undefined;
    }
    return {
      accountId: id,
      claims: () => ({ sub: id, preferred_username: id, ...(user.claims ?? {}) }),
    };
  },
  // Consent is given for the client: every scope and resource it asks for.
  loadExistingGrant: async (ctx) => {
    const { oidc } = ctx;
    const grantId = oidc.result?.consent?.grantId
      || oidc.session.grantIdFor(oidc.client.clientId);
    const grant = (grantId && await oidc.provider.Grant.find(grantId))
      || new oidc.provider.Grant({
        clientId: oidc.client.clientId,
        accountId: oidc.session.accountId,
      });
    if (oidc.params.scope) {
      grant.addOIDCScope(oidc.params.scope);
    }
    const requested = oidc.params.resource;
    for (const resource of [requested ?? []].flat()) {
      if (resources.has(resource)) {
        grant.addResourceScope(resource, RESOURCE_SCOPE);
      }
    }
    await grant.save();
    return grant;
  },
  renderError: (ctx, out) => {
    ctx.type = 'text/plain; charset=utf-8';
    ctx.body = `${out.error}: ${out.error_description ?? ''}\n`;
  },
});

// === the login form of the code flow ===

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, failed) {
  const action = `/interaction/${encodeURIComponent(uid)}/login`;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head>
<body>
<h1>Sign in</h1>
${failed ? '<p id="error" role="alert">Wrong username or password.</p>' : ''}
<form id="login" method="post" action="${escapeHtml(action)}">
<label>Username <input id="username" name="username" autocomplete="username" required></label>
<label>Password <input id="password" name="password" type="password" autocomplete="current-password" required></label>
<button id="submit" type="submit">Sign in</button>
</form>
</body></html>
`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, type, body) {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, 'text/plain; charset=utf-8', 'interaction mismatch\n');
    return;
  }
  const prompt = details.prompt.name;
  if (prompt === 'login') {
    if (req.method === 'GET' && action === undefined) {
      send(res, 200, 'text/html; charset=utf-8', loginPage(uid, false));
      return;
    }
    if (req.method === 'POST' && action === 'login') {
      const form = await readForm(req);
      const username = form.get('username') ?? '';
      const user = usersByName.get(username);
      // Compared even for an unknown user, against a value no password equals.
      const ok = sameSecret(form.get('password') ?? '', user?.password ?? crypto.randomUUID())
        && user !== undefined;
      if (!ok) {
        send(res, 401, 'text/html; charset=utf-8', loginPage(uid, true));
        return;
      }
      await provider.interactionFinished(
        req,
        res,
        { login: { accountId: username } },
        { mergeWithLastSubmission: false },
      );
      return;
    }
  } else if (prompt === 'consent') {
    // loadExistingGrant grants everything; a consent prompt left means a new scope or
    // resource in the same session: grant it too.
    const { Grant } = provider;
    const grant = (details.grantId && await Grant.find(details.grantId))
      || new Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    const missing = details.prompt.details;
    if (missing.missingOIDCScope) {
      grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    }
    if (missing.missingOIDCClaims) {
      grant.addOIDCClaims(missing.missingOIDCClaims);
    }
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, {
      mergeWithLastSubmission: true,
    });
    return;
  }
  send(res, 400, 'text/plain; charset=utf-8', `unexpected ${req.method} for prompt ${prompt}\n`);
}

const INTERACTION = /^\/interaction\/([^/]+)(?:\/(login))?$/;
const handle = provider.callback();

const server = http.createServer((req, res) => {
  const path = new URL(req.url, issuer).pathname;
  const m = INTERACTION.exec(path);
  if (!m) {
    handle(req, res);
    return;
  }
  interaction(req, res, decodeURIComponent(m[1]), m[2]).catch((e) => {
    if (!res.headersSent) {
      // SessionNotFound and the like: an expired or foreign interaction.
      send(res, e.statusCode ?? 500, 'text/plain; charset=utf-8', `${e.name}: ${e.message}\n`);
    } else {
      res.destroy();
    }
  });
});

server.on('error', (e) => {
  console.error(`cannot listen on 127.0.0.1:${port}: ${e.code ?? e.message}`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
